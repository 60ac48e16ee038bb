"""The sparse fast path of the SAE loss and its gradients: after the encoder, only active latents are touched.

TopK has exactly `k` active latents per token, and a trained ReLU SAE about L0
(63 of 32768 for the release). Only the encoder's forward product
`x @ W_enc` ([B, D] x [D, N]) must be dense. The rest works on the [B, K]
active pairs (latent index, pre-activation): decoding gathers K decoder rows
per token and W_dec's gradient is a scatter-add into those rows, both
O(B·K·D) instead of O(B·N·D). W_enc's gradient, by `encoder_grad`: "scatter"
adds x_b * g into the K active columns (O(B·K·D), beside dW_dec in the same
scatter, then one transpose into W_enc's [D, N] layout); "matmul", the
default, is the one GEMM x^T @ dpre with the sparse dpre written out. On CPU
XLA's scatter and that transpose cost more than the GEMM they save
(bench/sae_step.py); `bench/gpu.sh` measures both on a GPU.

ReLU: the `k_max` largest pre-activations of a token hold all its positive
ones whenever it has at most `k_max`; a batch where some token has more is
differentiated densely instead (`lax.cond`), so the path is exact either way.
A fresh ReLU SAE has about N/2 active latents, so early training runs dense.

`sparse_value_and_grad` returns what `jax.value_and_grad(loss.sae_loss,
has_aux=True)` returns, up to float32 summation order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae_jax.loss import LossParts, matmul, sae_loss, squared_error
from sae_jax.sae import Forward, SAEParams, SAESpec

# What the sparse branches differentiate: SAEParams' arrays, W_enc as the encoder
# gradient's mode lays it out (see `_active`).
Wrt = tuple  # (W_enc [D, N] ("matmul") or W_enc^T [N, D] ("scatter"), b_enc [N], W_dec [N, D], b_dec [D])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _active(x, W_enc, b_enc, W_dec, pre, idx, encoder_grad):
    """x: [B, D], pre: [B, N] (= x @ W_enc + b_enc, computed once), idx: [B, K] -> (pre at idx [B, K], W_dec rows [B, K, D]).

    W_enc and b_enc enter only through their gradient; `pre` carries none.
    dW_dec is a scatter-add of the rows' gradients. dW_enc, by `encoder_grad`:
    "scatter" takes W_enc as W_enc^T [N, D] and scatters x_b * g into row idx
    beside dW_dec's (O(B*K*D)); "matmul" takes W_enc [D, N] and forms
    x^T @ dpre with the sparse [B, N] dpre written out (one O(B*N*D) GEMM, but
    no scatter and no transpose; faster on CPU, see bench/sae_step.py).
    """
    return jnp.take_along_axis(pre, idx, axis=-1), jnp.take(W_dec, idx, axis=0, mode="clip")  # idx from top_k: in range


def _active_fwd(x, W_enc, b_enc, W_dec, pre, idx, encoder_grad):
    return _active(x, W_enc, b_enc, W_dec, pre, idx, encoder_grad), (x, idx, W_dec)  # W_dec only for its shape


def _active_bwd(encoder_grad, res, cot):
    """(g_vals [B, K], g_rows [B, K, D]) -> (None, dW_enc, db_enc [N], dW_dec [N, D], None, None)."""
    x, idx, W_dec = res
    g_vals, g_rows = cot
    (N, D), flat = W_dec.shape, idx.reshape(-1)
    x = x.astype(jnp.float32)
    db_enc = jnp.zeros((N,), jnp.float32).at[flat].add(g_vals.reshape(-1))
    if encoder_grad == "matmul":
        dpre = jnp.put_along_axis(jnp.zeros((x.shape[0], N), jnp.float32), idx, g_vals, axis=-1, inplace=False)
        dW_dec = jnp.zeros((N, D), jnp.float32).at[flat].add(g_rows.reshape(-1, D).astype(jnp.float32))
        return None, x.T @ dpre, db_enc, dW_dec, None, None
    # One scatter of [2, D] windows: row n of dW_dec and of dW_enc^T side by side.
    upd = jnp.stack([g_rows.astype(jnp.float32), g_vals[..., None] * x[:, None, :]], axis=2)
    both = jnp.zeros((N, 2, D), jnp.float32).at[flat].add(upd.reshape(-1, 2, D))
    return None, both[:, 1], db_enc, both[:, 0], None, None


_active.defvjp(_active_fwd, _active_bwd)


def fits_sparse(pre: jax.Array, k_max: int) -> jax.Array:
    """pre: [B, N] -> [] bool: no token has more than k_max positive pre-activations (relu's sparse path is exact)."""
    return jnp.max(jnp.sum(pre > 0, axis=-1)) <= k_max


def dense_codes(idx: jax.Array, a: jax.Array, n: int) -> jax.Array:
    """idx, a: [B, K] -> f: [B, N], zero outside idx."""
    return jnp.put_along_axis(jnp.zeros((a.shape[0], n), a.dtype), idx, a, axis=-1, inplace=False)


def _decode(a: jax.Array, rows: jax.Array, dtype) -> jax.Array:
    """a: [B, K], rows: [B, K, D] -> sum_k a_k rows_k [B, D] float32."""
    return jnp.einsum("bk,bkd->bd", a.astype(dtype), rows.astype(dtype), preferred_element_type=jnp.float32)


def _loss(wrt: Wrt, spec, x, pre, idx, *, l1_coefficient, dead, auxk_k, auxk_coefficient, dtype, with_auxk, encoder_grad):
    """The loss from the active set idx [B, K] of pre [B, N]; x: [B, D] float32 -> (loss, (Forward, LossParts))."""
    W_enc, b_enc, W_dec, b_dec = wrt
    vals, rows = _active(x, W_enc, b_enc, W_dec, pre, idx, encoder_grad)
    a = jax.nn.relu(vals)
    x_hat = _decode(a, rows, dtype) + b_dec
    recon = squared_error(x, x_hat)
    zero = jnp.zeros((), jnp.float32)
    if spec.architecture == "relu":
        # sum_i f_i |W_dec,i| over the active set only: f is zero elsewhere.
        norms = jnp.sqrt(jnp.sum(jnp.square(rows.astype(jnp.float32)), axis=-1))
        sparsity = jnp.mean(jnp.sum(a * norms, axis=-1))
        parts = LossParts(recon + l1_coefficient * sparsity, recon, sparsity, zero)
    else:
        aux = _auxk(wrt, x, pre, jax.lax.stop_gradient(x - x_hat), dead, auxk_k, dtype, encoder_grad) if with_auxk else zero
        parts = LossParts(recon + auxk_coefficient * aux, recon, zero, aux)
    return parts.loss, (Forward(x_hat, dense_codes(idx, a, spec.n_latents), pre), parts)


def _auxk(wrt: Wrt, x, pre, residual, dead, k, dtype, encoder_grad):
    """`loss.auxk_error` over the k largest dead pre-activations only: O(B·k·D). Assumes some latent is dead."""
    W_enc, b_enc, W_dec, _ = wrt
    top, idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), min(k, pre.shape[-1]))
    vals, rows = _active(x, W_enc, b_enc, W_dec, pre, idx, encoder_grad)
    v = jnp.where(jnp.isfinite(top), jax.nn.relu(vals), 0.0)
    return squared_error(residual, _decode(v, rows, dtype))


def _transposed(a: jax.Array) -> jax.Array:
    """a: [N, D] -> a.T [D, N], materialised row-major once.

    Left to itself XLA makes the transpose a layout change and reads the
    gradient strided in each optimizer pass (and, behind a cond, converts it
    twice). A 1-D array has one layout only, and the barrier keeps XLA from
    folding the reshapes away.
    """
    return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(a.shape[::-1])


def sparse_value_and_grad(
    params: SAEParams,
    spec: SAESpec,
    x: jax.Array,
    *,
    l1_coefficient: jax.Array | float,
    dead: jax.Array,
    auxk_k: int,
    auxk_coefficient: float,
    k_max: int = 128,
    compute_dtype: str = "float32",
    encoder_grad: str = "matmul",
) -> tuple[tuple[jax.Array, tuple[Forward, LossParts]], SAEParams]:
    """x: [B, D] scaled -> ((loss, (forward, parts)), grads), the values of differentiating `loss.sae_loss`.

    One `lax.cond` picks between two whole differentiated computations (a cond
    inside the differentiated function would make each branch carry the other's
    residuals). relu: sparse, or dense when a token has more than `k_max` active
    latents. topk: without AuxK while no latent is dead, with it otherwise.
    `encoder_grad`: "scatter" or "matmul", as `_active` describes.
    """
    dtype = jnp.dtype(compute_dtype)
    x = x.astype(jnp.float32)
    pre = jax.lax.stop_gradient(matmul(x, params.W_enc, dtype) + params.b_enc.astype(jnp.float32))
    kw = dict(l1_coefficient=l1_coefficient, dead=dead, auxk_k=auxk_k, auxk_coefficient=auxk_coefficient)
    scatter = encoder_grad == "scatter"
    # W_enc.T is never computed: the sparse loss reads W_enc only through `pre`.
    wrt = (params.W_enc.T if scatter else params.W_enc, params.b_enc, params.W_dec, params.b_dec)

    def sparse(idx, with_auxk):
        f = lambda w: _loss(w, spec, x, pre, idx, **kw, dtype=dtype, with_auxk=with_auxk, encoder_grad=encoder_grad)
        out, (dW_enc, db_enc, dW_dec, db_dec) = jax.value_and_grad(f, has_aux=True)(wrt)
        return out, SAEParams(_transposed(dW_enc) if scatter else dW_enc, db_enc, dW_dec, db_dec)

    if spec.architecture == "topk":
        idx = jax.lax.top_k(pre, spec.k)[1]
        return jax.lax.cond(jnp.any(dead), lambda: sparse(idx, True), lambda: sparse(idx, False))
    k_max = min(k_max, spec.n_latents)
    dense = lambda: jax.value_and_grad(lambda p: sae_loss(p, spec, x, **kw, compute_dtype=compute_dtype), has_aux=True)(params)
    return jax.lax.cond(fits_sparse(pre, k_max), lambda: sparse(jax.lax.top_k(pre, k_max)[1], False), dense)
