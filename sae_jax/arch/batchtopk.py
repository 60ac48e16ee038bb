"""batchtopk (Bussmann, Leask & Nanda 2024): the B*k largest ReLU'd pre-activations of the whole batch are kept.

Loss |x - x_hat|^2 + alpha AuxK, as topk. A token may hold more or fewer than k codes; the batch holds B*k
(fewer where fewer than B*k pre-activations are positive). Inference cannot see the batch, so a global
threshold theta is kept as a running estimate of the smallest positive kept activation,
theta <- (1 - r) theta + r min(kept) after every optimizer step (r = `sae.batchtopk_threshold_lr`, 0.01 as in
SAELens), starting at 0; the SAE exports as jumprelu with that theta for every latent (how SAELens saves it).
theta lives in `params.threshold` (N equal entries): no gradient reaches it, `update_threshold` sets it.
Decoder rows free by default: Bussmann 2024's unit-norm rows (`sae.unit_norm_decoder`) recovered fewer true
features on configs/realistic.yaml (k = 5: 0.69, 79% of latents dead, against 0.87 with free rows).

`sae.batchtopk_token_topk_frac` codes the first fraction of training per token instead (each token's k largest,
as topk), then the batch's B*k. A batch-wide budget gives the places of tokens with few features to the strong
features of crowded ones, so a weak feature's latent rarely fires and never learns to tell its feature from the
interference of the other 127 (configs/realistic.yaml, k = 5, seed 0, batch-coded: on the missed weak features
the nearest latent's pre-activation on the feature's tokens, 90th percentile, is 0.5-0.9 against theta 1.1, and
about what it reaches off them, 99th percentile 0.5-0.9). theta tracks the batch code in both phases, so inference
is the same rule either way; the yaml raises its rate to 0.05 so that it follows the switch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae_jax.arch import Recipe, batch_topk, decode, opening_phase, pre_activations
from sae_jax.loss import LossParts, auxk_error, squared_error
from sae_jax.sae import Forward, topk_code


def forward(params, spec, x, k: int, dtype: str = "float32", per_token=False) -> Forward:
    """x: [B, D] scaled -> Forward with the training code: B*k kept over the batch, or k per token where
    `per_token` ([] bool or a Python bool) is true."""
    pre = pre_activations(params, spec, x, dtype)
    f = batch_topk(pre, k)
    if per_token is not False:
        f = jnp.where(per_token, topk_code(pre, k), f)
    return Forward(decode(params, f, dtype), f, pre)


def per_token_phase(ctx):
    """[] bool: this step codes per token (`sae.batchtopk_token_topk_frac`), or False when the option is off."""
    return opening_phase(ctx.s.batchtopk_token_topk_frac, ctx)


def with_auxk(params, x, out: Forward, recon, ctx) -> tuple[jax.Array, tuple[Forward, LossParts]]:
    """recon + alpha AuxK: the topk family's loss around a reconstruction term `recon` []."""
    t = ctx.t
    residual = jax.lax.stop_gradient(x - out.x_hat)
    aux = auxk_error(params, out.pre, residual, ctx.dead, t.auxk_k, t.compute_dtype, ctx.s.auxk_normalize)
    parts = LossParts(recon + t.auxk_coefficient * aux, squared_error(x, out.x_hat), jnp.zeros((), jnp.float32), aux)
    return parts.loss, (out, parts)


def loss(params, spec, x, ctx):
    out = forward(params, spec, x, ctx.s.k, ctx.t.compute_dtype, per_token_phase(ctx))
    x = x.astype(jnp.float32)
    return with_auxk(params, x, out, squared_error(x, out.x_hat), ctx)


def update_threshold(params, out: Forward, s):
    """theta moved toward the smallest kept activation of this batch's B*k code (unchanged if nothing was kept).

    With `sae.batchtopk_token_topk_frac` the code trained on may be per token, so the batch code is taken again.
    """
    f = batch_topk(out.pre, s.k) if s.batchtopk_token_topk_frac > 0 else out.f
    smallest = jnp.min(jnp.where(f > 0, f, jnp.inf))
    r = s.batchtopk_threshold_lr
    theta = params.threshold
    new = jnp.where(jnp.isfinite(smallest), (1 - r) * theta + r * smallest, theta)
    return dataclasses.replace(params, threshold=new.astype(theta.dtype))


RECIPE = Recipe(
    name="batchtopk",
    inference="jumprelu",
    loss=loss,
    needs_k=True,
    init_threshold=lambda s: 0.0,
    update=update_threshold,
)
