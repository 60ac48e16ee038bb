"""Training recipes: how each SAE architecture is trained, and what it exports as.

A recipe is one small module in this package holding a `RECIPE`: its loss (the
math and its penalty), its init, and what runs after each optimizer update
(decoder renormalisation, a running threshold). Its inference rule is the
`sae.SAESpec.architecture` it exports as ("relu", "topk", "jumprelu"), so
evaluation, conversion and the formats see only those three. `RECIPES` below is
the one registry; adding an architecture is a module plus one line here.

All losses see inputs already scaled to mean norm sqrt(D) (the trainer's units)
and return `(loss, (Forward, LossParts))`, as `loss.sae_loss` does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.loss import matmul
from sae_jax.sae import SAEParams, SAESpec, init_params
from sae_jax.sums import add_bias

if TYPE_CHECKING:
    from sae_jax.config import SAEConfig, TrainConfig


class LossContext(NamedTuple):
    """What a recipe's loss reads besides params and inputs."""

    step: jax.Array  # [] int32, steps taken before this one
    dead: jax.Array  # [N] bool, latents that have not fired over train.dead_tokens
    s: "SAEConfig"
    t: "TrainConfig"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    inference: str  # the SAESpec.architecture it trains and exports as
    loss: Callable  # (params, spec, x [B, D], ctx) -> (loss, (Forward, LossParts))
    needs_k: bool = False  # sae.k is its sparsity (topk family)
    unit_norm_default: bool = False  # sae.unit_norm_decoder when unset
    init_threshold: Callable | None = None  # SAEConfig -> float: the threshold param's start (jumprelu inference)
    update: Callable | None = None  # (params [after the optimizer], forward, s) -> params: non-gradient state


def _recipes() -> dict[str, Recipe]:
    from sae_jax.arch import batchtopk, jumprelu, matryoshka, relu, topk

    return {m.RECIPE.name: m.RECIPE for m in (relu, topk, batchtopk, jumprelu, matryoshka)}


NAMES = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")


def get(name: str) -> Recipe:
    recipes = _recipes()
    if name not in recipes:
        raise ValueError(f"sae.architecture: expected one of {sorted(recipes)}, found {name!r}")
    return recipes[name]


# --- pieces the recipes share ------------------------------------------------------


def ramp(coefficient: float, frac: float, steps: int, step: jax.Array) -> jax.Array:
    """coefficient at `step`, warmed up linearly from 0 over `frac` of `steps` (`trainer.l1_schedule`'s formula)."""
    warm = frac * steps
    r = jnp.minimum(1.0, step / warm) if warm > 0 else 1.0
    return coefficient * r


def opening_phase(frac: float, ctx) -> jax.Array | bool:
    """[] bool: the step lies in the first `frac` of training (a per-token phase), or False when frac is 0."""
    return ctx.step < frac * ctx.t.steps if frac > 0 else False


def pre_activations(params: SAEParams, spec: SAESpec, x: jax.Array, dtype: str = "float32") -> jax.Array:
    """x: [B, D] scaled -> [B, N] float32; the pre-encoder bias (x - b_dec) when the spec asks for it."""
    x = x.astype(jnp.float32)
    if spec.apply_b_dec_to_input:
        x = x - params.b_dec.astype(jnp.float32)
    return add_bias(matmul(x, params.W_enc, dtype), params.b_enc.astype(jnp.float32))


def decode(params: SAEParams, f: jax.Array, dtype: str = "float32") -> jax.Array:
    """f: [B, N] -> x_hat [B, D] float32."""
    return add_bias(matmul(f, params.W_dec, dtype), params.b_dec.astype(jnp.float32))


def batch_topk(pre: jax.Array, k: int) -> jax.Array:
    """pre: [B, N] -> f [B, N]: the B*k largest of relu(pre) over the whole batch kept, the rest 0 (Bussmann 2024).

    Ties broken by flat index (jax.lax.top_k). Where fewer than B*k are positive, the kept zeros stay 0.
    """
    B, N = pre.shape
    flat = jax.nn.relu(pre).reshape(-1)
    vals, idx = jax.lax.top_k(flat, min(B * k, B * N))
    return jnp.zeros_like(flat).at[idx].set(vals).reshape(B, N)


def unit_norm_decoder(s: "SAEConfig") -> bool:
    """sae.unit_norm_decoder, or the recipe's default when unset."""
    return get(s.architecture).unit_norm_default if s.unit_norm_decoder is None else s.unit_norm_decoder


def init(key: jax.Array, spec: SAESpec, s: "SAEConfig") -> SAEParams:
    """The April-2024 init (`sae.init_params`); unit-norm rows for unit-norm recipes; jumprelu's threshold."""
    recipe = get(s.architecture)
    params = init_params(key, spec, 1.0 if unit_norm_decoder(s) else s.dec_init_norm)
    if spec.architecture == "jumprelu":
        params = dataclasses.replace(
            params, threshold=jnp.full((spec.n_latents,), recipe.init_threshold(s), jnp.float32)
        )
    return params


def project_grads(params: SAEParams, grads: SAEParams) -> SAEParams:
    """Remove from each decoder row's gradient its component along the row (OpenAI 2024, Bussmann 2024).

    With rows kept at unit norm, the step then moves them along the sphere; renormalising after it only corrects
    second-order drift.
    """
    W = params.W_dec.astype(jnp.float32)
    unit = W / jnp.linalg.norm(W, axis=1, keepdims=True)
    g = grads.W_dec - jnp.sum(grads.W_dec * unit, axis=1, keepdims=True) * unit
    return dataclasses.replace(grads, W_dec=g.astype(grads.W_dec.dtype))


def renormalise(params: SAEParams) -> SAEParams:
    """Decoder rows back to unit norm."""
    W = params.W_dec
    return dataclasses.replace(params, W_dec=(W / jnp.linalg.norm(W, axis=1, keepdims=True)).astype(W.dtype))


def after_update(params: SAEParams, out, s: "SAEConfig") -> SAEParams:
    """What follows the optimizer's update: the recipe's own state, then unit-norm rows where asked."""
    recipe = get(s.architecture)
    if recipe.update is not None:
        params = recipe.update(params, out, s)
    return renormalise(params) if unit_norm_decoder(s) else params


def value_and_grad(params: SAEParams, spec: SAESpec, x: jax.Array, ctx: LossContext):
    """((loss, (forward, parts)), grads) of the recipe `ctx.s.architecture`, dense, decoder gradients projected."""
    recipe = get(ctx.s.architecture)
    out, grads = jax.value_and_grad(lambda p: recipe.loss(p, spec, x, ctx), has_aux=True)(params)
    return out, (project_grads(params, grads) if unit_norm_decoder(ctx.s) else grads)


__all__ = ["LossContext", "Recipe", "NAMES", "get", "init", "value_and_grad", "after_update", "unit_norm_decoder"]
