"""Training losses, on inputs already scaled so their mean norm is sqrt(D).

relu (Anthropic, April 2024): |x - x_hat|^2 + lambda * sum_i f_i |W_dec,i|.
topk (OpenAI, 2024): |x - x_hat|^2 + alpha * AuxK, where AuxK lets the
`auxk_k` most active *dead* latents reconstruct the residual x - x_hat.
The squared error is summed over D and averaged over the batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.sae import Forward, SAEParams, SAESpec, activate, forward_params
from sae_jax.sums import add_bias, tree_sum


class LossParts(NamedTuple):
    loss: jax.Array  # [] the total that is differentiated
    recon: jax.Array  # [] squared error, summed over D, mean over B
    sparsity: jax.Array  # [] lambda-free sum_i f_i |W_dec,i|, mean over B (relu)
    auxk: jax.Array  # [] AuxK error (topk; 0 for relu)


def squared_error(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """x, x_hat: [B, D] -> [] squared error summed over D, averaged over B."""
    return jnp.mean(jnp.sum((x_hat - x) ** 2, axis=-1))


def weighted_l1(params: SAEParams, f: jax.Array) -> jax.Array:
    """f: [B, N] -> [] mean over B of sum_i f_i * |W_dec row i|, as sum_i (sum_b f_bi) |W_dec row i| / B."""
    dec_norms = jnp.linalg.norm(params.W_dec.astype(jnp.float32), axis=1)
    # Not f @ dec_norms: no float32 product over [B, N] under bfloat16. The batch sum first (`sums.tree_sum`):
    # neither direction then reduces over [B, N] (the gradient wrt the norms is that sum / B).
    return jnp.sum(tree_sum(f, 0) * dec_norms) / f.shape[0]


def matmul(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """a [M, K] @ b [K, N] -> [M, N] float32, with the inputs cast to `dtype` and the products accumulated in float32.

    Below float32 the backward's two products take `dtype` inputs too (JAX's own
    rule would multiply the float32 cotangent in float32).
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.matmul(a, b) if jnp.dtype(dtype) == jnp.float32 else _low_matmul(a, b, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_matmul(a, b, dtype):
    """a, b float32 -> a @ b float32 from `dtype` inputs."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _low_matmul_fwd(a, b, dtype):
    return _low_matmul(a, b, dtype), (a.astype(dtype), b.astype(dtype))


def _low_matmul_bwd(dtype, res, g):
    a, b = res
    g = g.astype(dtype)
    return jnp.matmul(g, b.T, preferred_element_type=jnp.float32), jnp.matmul(
        a.T, g, preferred_element_type=jnp.float32
    )


_low_matmul.defvjp(_low_matmul_fwd, _low_matmul_bwd)


def forward_in(params: SAEParams, spec: SAESpec, x: jax.Array, compute_dtype: str = "float32") -> Forward:
    """`sae.forward_params` with both matmuls in `compute_dtype` (float32: forward_params). Needs input_scale 1."""
    if compute_dtype == "float32":
        return forward_params(params, spec, x)
    x = x - params.b_dec.astype(jnp.float32) if spec.apply_b_dec_to_input else x
    pre = add_bias(matmul(x, params.W_enc, compute_dtype), params.b_enc.astype(jnp.float32))
    f = activate(spec, pre, params.threshold)
    return Forward(add_bias(matmul(f, params.W_dec, compute_dtype), params.b_dec.astype(jnp.float32)), f, pre)


def normalized_by_variance(err: jax.Array, residual: jax.Array) -> jax.Array:
    """err [] over the residual's [B, D] variance, sum_d mean_B (r - mean_B r)^2: OpenAI's normalized MSE."""
    return err / jnp.maximum(squared_error(residual, jnp.mean(residual, axis=0)), 1e-12)


def auxk_error(
    params: SAEParams,
    pre: jax.Array,
    residual: jax.Array,
    dead: jax.Array,
    k: int,
    compute_dtype: str = "float32",
    normalize: bool = False,
) -> jax.Array:
    """pre: [B, N], residual: [B, D] (no gradient), dead: [N] bool -> [] AuxK squared error.

    The k largest pre-activations among dead latents, ReLU'd, decoded without
    bias, should reconstruct the residual. 0 when no latent is dead.
    `normalize`: divided by the residual's variance, sum_d mean_B (r - mean_B r)^2 (OpenAI's
    normalized MSE), so its size does not fall as the main reconstruction improves.
    """
    k = min(k, pre.shape[-1])
    masked = jnp.where(dead, pre, -jnp.inf)
    vals, idx = jax.lax.top_k(masked, k)
    vals = jnp.where(jnp.isfinite(vals), jax.nn.relu(vals), 0.0)
    f_aux = jnp.put_along_axis(jnp.zeros_like(pre), idx, vals, axis=-1, inplace=False)
    e_hat = matmul(f_aux, params.W_dec, compute_dtype)
    err = squared_error(residual, e_hat)
    if normalize:
        err = normalized_by_variance(err, residual)
    return jnp.where(jnp.any(dead), err, 0.0)


def sae_loss(
    params: SAEParams,
    spec: SAESpec,
    x: jax.Array,
    *,
    l1_coefficient: jax.Array | float,
    dead: jax.Array,
    auxk_k: int,
    auxk_coefficient: float,
    compute_dtype: str = "float32",
    auxk_normalize: bool = False,
) -> tuple[jax.Array, tuple[Forward, LossParts]]:
    """x: [B, D] scaled inputs -> (loss, (forward, parts)). `spec.input_scale` must be 1.

    `compute_dtype` "bfloat16": the matmuls take bfloat16 inputs and accumulate
    in float32; params, gradients and the loss stay float32.
    """
    out = forward_in(params, spec, x, compute_dtype)
    x = x.astype(jnp.float32)
    recon = squared_error(x, out.x_hat)
    zero = jnp.zeros((), jnp.float32)
    if spec.architecture == "relu":
        sparsity = weighted_l1(params, out.f)
        parts = LossParts(recon + l1_coefficient * sparsity, recon, sparsity, zero)
    else:
        aux = auxk_error(
            params, out.pre, jax.lax.stop_gradient(x - out.x_hat), dead, auxk_k, compute_dtype, auxk_normalize
        )
        parts = LossParts(recon + auxk_coefficient * aux, recon, zero, aux)
    return parts.loss, (out, parts)
