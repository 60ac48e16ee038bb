"""The training state and one jitted, donated training step.

The state is a pytree that moves in and out of the step explicitly. Inputs
arrive raw; the step multiplies them by `scale` (the factor that makes their
mean norm sqrt(D)), so params live in scaled units until export folds the
factor back (`sae.fold_input_scale`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sae_jax import adam, arch, sharding, sparse
from sae_jax.arch import matryoshka
from sae_jax.config import Config, SAEConfig, TrainConfig
from sae_jax.loss import sae_loss
from sae_jax.sae import SAEParams, SAESpec, explained_variance


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: SAEParams
    opt_state: optax.OptState
    step: jax.Array  # [] int32, steps taken
    key: jax.Array  # [2] uint32, raw PRNG key data
    since_fired: jax.Array  # [N] int32, tokens since each latent last fired, capped at dead_tokens
    skipped: jax.Array  # [] int32, steps whose loss, gradients or inputs were non-finite
    first_bad: jax.Array  # [2] int32, (step, what) of the first non-finite step; (-1, 0) if none


def spec_from_config(cfg: Config) -> SAESpec:
    """The training-time spec: params in scaled units, so input_scale is 1; the recipe's inference architecture."""
    s = cfg.sae
    inference = arch.get(s.architecture).inference
    k = s.k if inference == "topk" else None
    return SAESpec(
        inference, s.d_in, s.n_latents, k, s.hook_layer, s.hook_site, apply_b_dec_to_input=s.pre_encoder_bias
    )


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, constant, linear decay to 0 over the last `lr_decay_frac` of training."""
    decay_start = max(int(round(t.steps * (1 - t.lr_decay_frac))), t.lr_warmup_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, t.lr, max(t.lr_warmup_steps, 1)),
            optax.constant_schedule(t.lr),
            optax.linear_schedule(t.lr, 0.0, max(t.steps - decay_start, 1)),
        ],
        boundaries=[t.lr_warmup_steps, decay_start],
    )


def l1_schedule(t: TrainConfig, step: jax.Array) -> jax.Array:
    """lambda at `step`: linear warm-up from 0 over `l1_warmup_frac` of training."""
    warm = t.l1_warmup_frac * t.steps
    ramp = jnp.minimum(1.0, step / warm) if warm > 0 else 1.0
    return t.l1_coefficient * ramp


def optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """The optimizer the step applies: Adam on `lr_schedule`, after clipping to `grad_clip` (`adam.fused_adam`)."""
    return adam.fused_adam(lr_schedule(t), b1=t.adam_b1, b2=t.adam_b2, clip=t.grad_clip)


def apply_optimizer(tx: optax.GradientTransformation, grads: SAEParams, opt_state, params: SAEParams, ok: jax.Array):
    """`tx.update` then `optax.apply_updates`; where `ok` ([] bool) is false, params and state stay as they were.

    -> (params, opt_state). Any optax transformation works (`adam.masking`); `adam.fused_adam` masks in its own
    pass, so the donated moments are updated in place.
    """
    updates, new_state = adam.masking(tx).update(grads, opt_state, params, ok=ok)
    new_params = jax.tree.map(lambda p, q: jnp.where(ok, p, q), optax.apply_updates(params, updates), params)
    return new_params, new_state


def init_state(cfg: Config) -> TrainState:
    """The state at step 0, created already sharded over `cfg.mesh` (`sharding.state_shardings`; 1x1 by default)."""
    mesh = sharding.make_mesh(cfg)
    # Jitted with out_shardings, each device computes only its own shard: the full SAE never exists on one device.
    out = sharding.state_shardings(mesh, jax.eval_shape(lambda: _init_state(cfg)))
    return jax.jit(lambda: _init_state(cfg), out_shardings=out)()


def abstract_state(cfg: Config) -> TrainState:
    """`init_state`'s shapes and dtypes as ShapeDtypeStructs with its shardings: what a checkpoint restores into."""
    shapes = jax.eval_shape(lambda: _init_state(cfg))
    placed = sharding.state_shardings(sharding.make_mesh(cfg), shapes)
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p), shapes, placed)


def _init_state(cfg: Config) -> TrainState:
    spec = spec_from_config(cfg)
    key = jax.random.key(cfg.train.seed)
    init_key, key = jax.random.split(key)
    params = arch.init(init_key, spec, cfg.sae)
    return TrainState(
        params=params,
        opt_state=optimizer(cfg.train).init(params),
        step=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(key),
        since_fired=jnp.zeros((spec.n_latents,), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        first_bad=jnp.array([-1, 0], jnp.int32),
    )


# What went non-finite, as recorded in TrainState.first_bad[1].
NONFINITE = {1: "input activations", 2: "loss", 3: "gradients"}


# `train.kernel: auto` takes the sparse kernel when N is at least this many times its per-token budget
# (relu, batchtopk, matryoshka: sparse_k_max; topk: k). Measured on a 2-core CPU with a trained SAE's activation
# pattern (bench/sae_step.py, README): at N = 32768 sparse was 1.2x (relu, N/k_max = 256) and 1.4x (topk with AuxK,
# N/k = 512) dense; at N = 8192 (N/k_max = 64, N/k = 128) dense was 1.3-1.4x faster than sparse. batchtopk and
# matryoshka (k = 64, 10% dead, loaded machine): sparse 1.1-1.6x dense at N = 32768 in 5 of 6 runs, dense 1.4x
# sparse at N = 8192.
AUTO_SPARSE_RATIO = 256


def kernel(spec: SAESpec, t: TrainConfig, s: SAEConfig | None = None) -> str:
    """The kernel the step compiles: 'dense' or 'sparse' (`train.kernel`, with 'auto' resolved from the shape).

    A recipe beyond plain relu/topk (`sae_jax.arch`, see `_needs_recipe`) runs dense unless the kernel covers it
    (`_sparse_recipe`: batchtopk, matryoshka), where 'auto' uses relu's rule (budget sparse_k_max).
    """
    if s is not None and _needs_recipe(s):
        if not _sparse_recipe(s):
            return "dense"
        if t.kernel != "auto":
            return t.kernel
        return "sparse" if spec.n_latents >= AUTO_SPARSE_RATIO * t.sparse_k_max else "dense"
    if t.kernel != "auto":
        return t.kernel
    budget = {"relu": t.sparse_k_max, "topk": spec.k}.get(spec.architecture)
    return "sparse" if budget and spec.n_latents >= AUTO_SPARSE_RATIO * budget else "dense"


def loss_and_grads(state: TrainState, x: jax.Array, spec: SAESpec, t: TrainConfig, s: SAEConfig | None = None):
    """x: [B, D] scaled -> ((loss, (forward, parts)), grads): what the step differentiates.

    kernel 'dense' differentiates `loss.sae_loss` (the reference); 'sparse'
    computes the same values with `sparse.sparse_value_and_grad`. `s`: the recipe (`sae_jax.arch`; sparse only
    for batchtopk and matryoshka, `_sparse_recipe`) for anything beyond plain relu/topk; unset, the spec's relu or
    topk.
    """
    dead = state.since_fired >= t.dead_tokens
    kw = dict(dead=dead, auxk_k=t.auxk_k, auxk_coefficient=t.auxk_coefficient, compute_dtype=t.compute_dtype)
    sparse_kw = dict(k_max=t.sparse_k_max, encoder_grad=t.sparse_encoder_grad)
    if s is not None and _needs_recipe(s):
        if kernel(spec, t, s) == "dense":
            return arch.value_and_grad(state.params, spec, x, arch.LossContext(state.step, dead, s, t))
        prefixes = matryoshka.prefixes(s, spec.n_latents) if s.architecture == "matryoshka" else ()
        out, grads = sparse.sparse_value_and_grad(
            state.params,
            spec,
            x,
            l1_coefficient=0.0,
            **kw,
            **sparse_kw,
            recipe=s.architecture,
            k=s.k,
            prefixes=tuple(prefixes),
            auxk_normalize=s.auxk_normalize,
        )
        return out, (arch.project_grads(state.params, grads) if arch.unit_norm_decoder(s) else grads)
    kw["l1_coefficient"] = l1_schedule(t, state.step)
    if kernel(spec, t) == "sparse":
        return sparse.sparse_value_and_grad(state.params, spec, x, **kw, **sparse_kw)
    return jax.value_and_grad(lambda p: sae_loss(p, spec, x, **kw), has_aux=True)(state.params)


def _needs_recipe(s: SAEConfig) -> bool:
    """Whether `s` trains through its `sae_jax.arch` recipe: all but the plain relu and topk of the sparse kernel."""
    plain = s.architecture in ("relu", "topk") and not (s.pre_encoder_bias or s.auxk_normalize)
    return not plain or arch.unit_norm_decoder(s)


def _sparse_recipe(s: SAEConfig) -> bool:
    """Whether the sparse kernel covers recipe `s`: batchtopk and matryoshka without the pre-encoder bias or the
    per-token phase (`sae.batchtopk_token_topk_frac`)."""
    plain = not (s.pre_encoder_bias or s.batchtopk_token_topk_frac)
    return s.architecture in ("batchtopk", "matryoshka") and plain


# Metrics that metrics.jsonl gives as their mean over the steps since the previous line (run._loop).
STEP_AVERAGED = ("sparse_token_fraction", "dense_fallback", "over_budget_fraction")


def kernel_metrics(codes: jax.Array, spec: SAESpec, t: TrainConfig, s: SAEConfig | None = None) -> dict:
    """codes: [B, N], positive where a latent is active (pre or f) -> which way the step went, as [] float32 metrics.

    kernel_sparse: 1 when the sparse kernel is compiled in. sparse_token_fraction:
    the tokens its sparse path took. relu, batchtopk and matryoshka add dense_fallback
    (1: the whole step ran dense, more than `sparse.dense_rows` tokens were over sparse_k_max)
    and over_budget_fraction (the tokens over sparse_k_max, each handled apart: relu's from its own larger active
    set while it fits `sparse.ROW_BUDGET_FACTOR` * sparse_k_max, densely otherwise).
    Logged, these three are means over the steps since the last line: the fraction
    of tokens that went sparse, of steps that fell back to dense, of tokens over budget.
    """
    on = kernel(spec, t, s) == "sparse"
    m = {"kernel_sparse": jnp.float32(on), "sparse_token_fraction": jnp.float32(on)}
    if on and (spec.architecture == "relu" or (s is not None and _sparse_recipe(s))):
        B, N = codes.shape
        n_rows, k_max = sparse.dense_rows(B), min(t.sparse_k_max, N)
        path, over = sparse.route(codes, k_max, n_rows)
        m.update(
            sparse_token_fraction=sparse.sparse_token_fraction(path, B, n_rows),
            dense_fallback=(path == 2).astype(jnp.float32),
            over_budget_fraction=over.astype(jnp.float32) / B,
        )
    return m


def train_step(
    state: TrainState, x_raw: jax.Array, scale: jax.Array, *, spec: SAESpec, t: TrainConfig, s: SAEConfig | None = None
):
    """x_raw: [B, D] raw activations, scale: [] -> (new state, metrics dict of [] float32). `s`: see loss_and_grads."""
    x = x_raw.astype(jnp.float32) * scale
    (loss, (out, parts)), grads = loss_and_grads(state, x, spec, t, s)
    fired = jnp.any(out.f > 0, axis=0)
    since = jnp.where(fired, 0, jnp.minimum(state.since_fired + x.shape[0], t.dead_tokens))
    grad_norm = optax.tree.norm(grads)  # the expression the clipping computes: XLA computes it once
    metrics = {
        "loss": loss,
        "recon": parts.recon,
        "mse": jnp.mean((out.x_hat - x) ** 2),
        "l0": jnp.mean(sparse.active_counts(out.f)),
        "explained_variance": explained_variance(x, out.x_hat),
        "dead_fraction": jnp.mean(since >= t.dead_tokens),
        "l1_coefficient": jnp.asarray(l1_schedule(t, state.step), jnp.float32),
        "auxk": parts.auxk,
        "sparsity": parts.sparsity,
        "grad_norm": grad_norm,
    }
    metrics.update(kernel_metrics(out.f, spec, t, s))
    what = jnp.where(
        ~jnp.all(jnp.isfinite(x)), 1, jnp.where(~jnp.isfinite(loss), 2, jnp.where(~jnp.isfinite(grad_norm), 3, 0))
    )
    ok = what == 0
    # A non-finite step leaves params and optimizer state as they were; the loop decides what to do.
    params, opt_state = apply_optimizer(optimizer(t), grads, state.opt_state, state.params, ok)
    if s is not None and _needs_recipe(s):  # a recipe's own state (threshold, unit-norm rows), kept on a bad step
        params = jax.tree.map(lambda a, b: jnp.where(ok, a, b), arch.after_update(params, out, s), params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    first = jnp.where((state.first_bad[0] < 0) & ~ok, jnp.stack([state.step, what]), state.first_bad)
    new = TrainState(
        params=params,
        opt_state=opt_state,
        step=state.step + 1,
        key=state.key,
        since_fired=keep(since, state.since_fired),
        skipped=state.skipped + (~ok).astype(jnp.int32),
        first_bad=first.astype(jnp.int32),
    )
    return new, metrics


def make_step(cfg: Config) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """The jitted step with the state donated: its buffers are reused for the new state.

    State and batch are sharded over `cfg.mesh` as `sharding` describes (one device: a 1x1 mesh).
    """
    step = lambda s, x, c: train_step(s, x, c, spec=spec_from_config(cfg), t=cfg.train, s=cfg.sae)
    mesh = sharding.make_mesh(cfg)
    state = sharding.state_shardings(mesh, jax.eval_shape(lambda: _init_state(cfg)))
    rep = sharding.replicated(mesh)
    return jax.jit(
        step, in_shardings=(state, sharding.batch_sharding(mesh), rep), out_shardings=(state, rep), donate_argnums=0
    )
