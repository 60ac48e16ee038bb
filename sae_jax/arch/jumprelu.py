"""jumprelu (Rajamanoharan et al. 2024, Gemma Scope): f_i = pre_i if pre_i > theta_i else 0, theta [N] trained.

The step has no gradient, so theta learns through straight-through pseudo-derivatives with a rectangle
kernel K(u) = 1{|u| < 1/2} of bandwidth eps (`sae.jumprelu_bandwidth`):
  d f_i / d pre_i = 1{pre_i > theta_i},   d f_i / d theta_i = -(theta_i / eps) K((pre_i - theta_i) / eps),
  d H(pre_i - theta_i) / d theta_i = -(1 / eps) K((pre_i - theta_i) / eps),   d H / d pre_i = 0.
Loss |x - x_hat|^2 + lambda S + lambda_p P, lambda = `sae.l0_coefficient` warmed up over
`sae.l0_warmup_frac` of training. S, by `sae.jumprelu_sparsity`: "l0", sum_i H(pre_i - theta_i) (the paper);
"tanh", sum_i tanh(c f_i |W_dec,i|) (Anthropic, January 2025; c = `sae.jumprelu_tanh_scale`).
P = sum_i relu(theta_i - pre_i) |W_dec,i| (Anthropic's pre-activation loss, `sae.jumprelu_pre_act_coefficient`):
it pulls up latents that never reach their threshold, which revives dead ones. theta is a parameter itself,
not log-theta (SAELens: log-theta barely moves under Adam), kept >= 0 after each step. Defaults follow
SAELens's (theta_0 0.01, eps 0.05) for inputs at mean norm sqrt(D), the units this trainer uses.

`sae.jumprelu_token_topk_frac` (not in the literature; off by default) codes the first fraction of training per
token instead, each token's `sae.k` largest with AuxK, as topk, while theta learns to separate each latent's kept
pre-activations from its dropped ones; jumprelu's loss takes over after it. Trained as jumprelu throughout, a weak
feature's latent stays under its own theta, seldom fires and never learns its feature; coded per token first it
does, as batchtopk's phase lets its latents (configs/realistic.yaml, seeds 0 / 1: 0.85 / 0.86 recovered at lambda
1 and pre-act 3e-3, 0.92 / 0.93 with the phase at lambda 0.5 and no pre-act loss, L0 4.9-5.0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sae_jax.arch import Recipe, decode, opening_phase, pre_activations, ramp
from sae_jax.loss import LossParts, auxk_error, squared_error
from sae_jax.sae import Forward, topk_code


def rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump(pre: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """pre: [B, N], theta: [N] -> f [B, N] = pre * H(pre - theta), with the straight-through gradients above."""
    return jnp.where(pre > theta, pre, 0.0)


def _jump_fwd(pre, theta, eps):
    return jump(pre, theta, eps), (pre, theta)


def _jump_bwd(eps, res, g):
    pre, theta = res
    d_theta = jnp.sum(-(theta / eps) * rectangle((pre - theta) / eps) * g, axis=0)
    return jnp.where(pre > theta, g, 0.0), d_theta


jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(pre: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """pre: [B, N], theta: [N] -> H(pre - theta) [B, N] float32; gradient to theta only."""
    return (pre > theta).astype(jnp.float32)


def _step_fwd(pre, theta, eps):
    return step(pre, theta, eps), (pre, theta)


def _step_bwd(eps, res, g):
    pre, theta = res
    return jnp.zeros_like(pre), jnp.sum(-(1.0 / eps) * rectangle((pre - theta) / eps) * g, axis=0)


step.defvjp(_step_fwd, _step_bwd)


def _jump_loss(params, pre, theta, x, ctx):
    """(|x - x_hat|^2 + lambda S, Forward, recon, S, 0): the jumprelu code and its loss."""
    s, t = ctx.s, ctx.t
    f = jump(pre, theta, s.jumprelu_bandwidth)
    x_hat = decode(params, f, t.compute_dtype)
    recon = squared_error(x, x_hat)
    if s.jumprelu_sparsity == "tanh":
        dec_norms = jnp.linalg.norm(params.W_dec.astype(jnp.float32), axis=1)
        sparsity = jnp.mean(jnp.sum(jnp.tanh(s.jumprelu_tanh_scale * f * dec_norms), axis=-1))
    else:
        sparsity = jnp.mean(jnp.sum(step(pre, theta, s.jumprelu_bandwidth), axis=-1))
    total = recon + ramp(s.l0_coefficient, s.l0_warmup_frac, t.steps, ctx.step) * sparsity
    return total, Forward(x_hat, f, pre), recon, sparsity, jnp.zeros((), jnp.float32)


def _per_token_loss(params, pre, theta, x, ctx):
    """The per-token phase: (|x - x_hat|^2 + alpha AuxK + T, Forward, recon, L0 of jumprelu at theta, AuxK).

    W and b learn from each token's k largest pre-activations, as topk does; theta learns the threshold that
    separates each latent's kept pre-activations from its dropped ones, T = mean_b sum_i (relu(theta_i - pre_i) where
    kept, relu(pre_i - theta_i) where dropped), pre held fixed, so jumprelu starts from about this code at the switch.
    """
    s, t = ctx.s, ctx.t
    f = topk_code(pre, s.k)
    x_hat = decode(params, f, t.compute_dtype)
    recon = squared_error(x, x_hat)
    residual = jax.lax.stop_gradient(x - x_hat)
    aux = auxk_error(params, pre, residual, ctx.dead, t.auxk_k, t.compute_dtype, s.auxk_normalize)
    held = jax.lax.stop_gradient(pre)
    miss = jnp.where(f > 0, jax.nn.relu(theta - held), jax.nn.relu(held - theta))
    total = recon + t.auxk_coefficient * aux + jnp.mean(jnp.sum(miss, axis=-1))
    l0 = jnp.mean(jnp.sum((held > theta).astype(jnp.float32), axis=-1))
    return total, Forward(x_hat, f, pre), recon, l0, aux


def loss(params, spec, x, ctx):
    s, t = ctx.s, ctx.t
    pre = pre_activations(params, spec, x, t.compute_dtype)
    theta = params.threshold.astype(jnp.float32)
    x = x.astype(jnp.float32)
    phase = opening_phase(s.jumprelu_token_topk_frac, ctx)  # the per-token phase, or False
    if phase is False:
        total, out, recon, sparsity, aux = _jump_loss(params, pre, theta, x, ctx)
    else:
        total, out, recon, sparsity, aux = jax.lax.cond(
            phase,
            lambda: _per_token_loss(params, pre, theta, x, ctx),
            lambda: _jump_loss(params, pre, theta, x, ctx),
        )
    if s.jumprelu_pre_act_coefficient > 0:
        dec_norms = jnp.linalg.norm(params.W_dec.astype(jnp.float32), axis=1)
        total = total + s.jumprelu_pre_act_coefficient * jnp.mean(jax.nn.relu(theta - pre) @ dec_norms)
    parts = LossParts(total, recon, sparsity, aux)
    return parts.loss, (out, parts)


def clamp_threshold(params, out, s):
    """theta >= 0: a negative threshold would pass negative codes."""
    return dataclasses.replace(params, threshold=jnp.maximum(params.threshold, 0.0))


RECIPE = Recipe(
    name="jumprelu",
    inference="jumprelu",
    loss=loss,
    init_threshold=lambda s: s.jumprelu_init_threshold,
    update=clamp_threshold,
)
