"""The sparse kernel against the dense reference (`loss.sae_loss` differentiated by JAX); the fused Adam against optax.

Reference: kernel "dense", the same params and batch. Tolerance: both compute
in float32 and differ only in summation order (the sparse path sums K active
terms where the dense matmuls sum N, mostly zeros). Measured: gradients agree
to <= 2e-7 of each gradient's largest entry, params after 8 Adam steps to
<= 1.2e-7 of theirs. TOL = 1e-5 leaves a margin of ~50x; dropping a term moves
them by > 1e-2 (the decoder-norm penalty is checked to matter below).
bfloat16 against dense bfloat16: the same bf16 products, so again summation
order, plus the rare cotangent whose float32 value rounds to the other side of
a bf16 step; measured <= 3e-6, asserted TOL_BF16 = 1e-4.

Batches: "normal" N(0, 1) tokens (at most 7 of N = 128 latents active), and
"mixed", where 3 tokens of 64 have 3x the norm and 20-40 active latents: with
k_max = 12 those go through relu's rows over the budget (from their own
`sparse.ROW_BUDGET_FACTOR` * k_max = 48 largest; "-dense-rows" cases set the
factor to 1, so the same rows go dense) and the rest stays sparse.

batchtopk and matryoshka (prefixes 16, 64, 128) against their recipes
(`sae_jax.arch`, differentiated by JAX), same TOL and TOL_BF16: measured
gradients <= 2.3e-7 of each largest entry (bf16 included), losses equal,
params after 8 steps <= 8.4e-8, the running threshold equal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae_jax import adam, sparse, trainer
from sae_jax.arch import matryoshka
from sae_jax.config import load_config
from sae_jax.trainer import (
    apply_optimizer,
    init_state,
    loss_and_grads,
    lr_schedule,
    make_step,
    optimizer,
    spec_from_config,
)

TOL, TOL_BF16 = 1e-5, 1e-4
D, EXPANSION, B = 16, 8, 64  # N = 128
PREFIXES = (16, 64, 128)  # matryoshka's nested sizes
ROWS = sparse.dense_rows(B)  # 4


def config(arch="relu", kernel="sparse", **extra):
    sets = [
        f"sae.d_in={D}",
        f"sae.expansion={EXPANSION}",
        f"data.batch_size={B}",
        f"train.kernel={kernel}",
        "train.lr=1e-3",
        "train.lr_warmup_steps=0",
        "train.steps=100",
        "train.l1_warmup_frac=0",
    ]
    if arch in ("topk", "batchtopk", "matryoshka"):
        sets += [f"sae.architecture={arch}", "sae.k=6", "train.auxk_k=16"]
    if arch == "matryoshka":
        sets += [f"sae.matryoshka_prefixes={list(PREFIXES[:-1])}"]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])


def state_with(cfg, b_enc=-1.0, dead_every=0, seed=0):
    """A perturbed init with b_enc shifted (so few latents fire) and every `dead_every`-th latent dead."""
    state = init_state(cfg)
    rng = np.random.default_rng(seed)
    p = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), state.params)
    p = dataclasses.replace(p, b_enc=p.b_enc + b_enc)
    since = np.zeros(cfg.sae.n_latents, np.int32)
    if dead_every:
        since[::dead_every] = cfg.train.dead_tokens
    return dataclasses.replace(state, params=p, since_fired=jnp.asarray(since))


def batch(seed=1, mixed=False):
    x = np.random.default_rng(seed).standard_normal((B, D)).astype(np.float32)
    if mixed:
        x[:3] *= 3.0  # three tokens far over k_max = 12, the others under it
    return jnp.asarray(x)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def grads_of(cfg, state, x):
    step = lambda s, x: loss_and_grads(s, x, spec_from_config(cfg), cfg.train, cfg.sae)
    (loss, (out, parts)), g = jax.jit(step)(state, x)
    return float(loss), out, parts, g


CASES = {  # name: (arch, extra config, b_enc shift, dead_every, mixed batch, relu path)
    "relu": ("relu", {"train.sparse_k_max": 32}, -1.0, 0, False, 0),
    "relu-at-cap": ("relu", {}, -1.0, 0, False, 0),  # k_max set to the batch's largest active count below
    "relu-some-over": ("relu", {"train.sparse_k_max": 12}, -1.0, 0, True, 1),
    "relu-some-over-scatter": (
        "relu",
        {"train.sparse_k_max": 12, "train.sparse_encoder_grad": "scatter"},
        -1.0,
        0,
        True,
        1,
    ),
    "relu-many-over": ("relu", {"train.sparse_k_max": 2}, -1.0, 0, False, 2),
    "relu-some-over-bf16": ("relu", {"train.sparse_k_max": 12, "train.compute_dtype": "bfloat16"}, -1.0, 0, True, 1),
    "relu-some-over-dense-rows": ("relu", {"train.sparse_k_max": 12}, -1.0, 0, True, 1),
    "relu-some-over-dense-rows-bf16": (
        "relu",
        {"train.sparse_k_max": 12, "train.compute_dtype": "bfloat16"},
        -1.0,
        0,
        True,
        1,
    ),
    "topk-dead": ("topk", {}, 0.0, 3, True, None),
    "topk-dead-scatter": ("topk", {"train.sparse_encoder_grad": "scatter"}, 0.0, 3, True, None),
    "topk-dead-bf16": ("topk", {"train.compute_dtype": "bfloat16"}, 0.0, 3, True, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_loss_and_gradients_equal_dense(case, monkeypatch):
    arch, extra, shift, dead_every, mixed, path = CASES[case]
    if "dense-rows" in case:
        monkeypatch.setattr(sparse, "ROW_BUDGET_FACTOR", 1)
    x, tol = batch(mixed=mixed), TOL_BF16 if "bf16" in case else TOL
    dense_cfg = config(arch, "dense", **extra)
    state = state_with(dense_cfg, shift, dead_every)
    loss, out, parts, g = grads_of(dense_cfg, state, x)
    counts = np.asarray(jnp.sum(out.f > 0, axis=-1))
    if case == "relu-at-cap":
        extra = {"train.sparse_k_max": int(counts.max())}
    sparse_cfg = config(arch, "sparse", **extra)
    s_loss, s_out, s_parts, s_g = grads_of(sparse_cfg, state, x)
    if arch == "relu":
        k_max = sparse_cfg.train.sparse_k_max
        assert int(sparse.route(out.pre, k_max, ROWS)[0]) == path
        assert 4 <= counts.max() and parts.sparsity > 0
        if path == 1:  # some tokens over the budget, most under it; within the rows' own budget unless dense
            assert 1 <= (counts > k_max).sum() <= ROWS and (counts <= k_max).sum() >= B - ROWS
            assert (counts.max() <= sparse.ROW_BUDGET_FACTOR * k_max) == ("dense-rows" not in case)
        m = trainer.kernel_metrics(out.pre, spec_from_config(sparse_cfg), sparse_cfg.train)
        assert float(m["over_budget_fraction"]) * B == (counts > k_max).sum()
        assert (float(m["dense_fallback"]), float(m["sparse_token_fraction"])) == [(0, 1), (0, 1 - ROWS / B), (1, 0)][
            path
        ]
    if case.startswith("topk-dead"):
        assert float(parts.auxk) > 0 and float(s_parts.auxk) == pytest.approx(float(parts.auxk), rel=tol)
    assert s_loss == pytest.approx(loss, rel=tol)
    for a, b in zip(s_parts, parts):
        assert float(a) == pytest.approx(float(b), rel=tol, abs=1e-30)
    np.testing.assert_array_equal(np.asarray(s_out.f) > 0, np.asarray(out.f) > 0)
    assert rel(s_out.x_hat, out.x_hat) <= tol and rel(s_out.f, out.f) <= tol
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert rel(getattr(s_g, name), getattr(g, name)) <= tol, name


RECIPE_CASES = {  # name: (arch, extra config, relu-style path); k_max "some": the batch's 4th largest kept count
    "batchtopk-some-over": ("batchtopk", {}, 1),
    "batchtopk-some-over-scatter": ("batchtopk", {"train.sparse_encoder_grad": "scatter"}, 1),
    "batchtopk-all-under": ("batchtopk", {"train.sparse_k_max": 64}, 0),
    "batchtopk-many-over": ("batchtopk", {"train.sparse_k_max": 2}, 2),
    "batchtopk-some-over-bf16": ("batchtopk", {"train.compute_dtype": "bfloat16"}, 1),
    "batchtopk-some-over-unit-norm": ("batchtopk", {"sae.unit_norm_decoder": True, "sae.auxk_normalize": True}, 1),
    "matryoshka-some-over": ("matryoshka", {}, 1),
    "matryoshka-all-under": ("matryoshka", {"train.sparse_k_max": 64}, 0),
    "matryoshka-many-over": ("matryoshka", {"train.sparse_k_max": 2}, 2),
    "matryoshka-some-over-bf16": ("matryoshka", {"train.compute_dtype": "bfloat16"}, 1),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_sparse_recipe_loss_and_gradients_equal_dense(case):
    """batchtopk and matryoshka (`sae_jax.arch`, differentiated by JAX) against the sparse kernel, every third latent
    dead so AuxK runs, on the mixed batch: its 3 big tokens hold 20-30 of the B*k kept codes, the others fewer."""
    arch, extra, path = RECIPE_CASES[case]
    x, tol = batch(mixed=True), TOL_BF16 if "bf16" in case else TOL
    dense_cfg = config(arch, "dense", **extra)
    state = state_with(dense_cfg, 0.0, 3)
    loss, out, parts, g = grads_of(dense_cfg, state, x)
    counts = np.sort(np.asarray(jnp.sum(out.f > 0, axis=-1)))
    if path == 1:
        extra = {**extra, "train.sparse_k_max": int(counts[-ROWS])}
    sparse_cfg = config(arch, "sparse", **extra)
    spec, k_max = spec_from_config(sparse_cfg), sparse_cfg.train.sparse_k_max
    assert trainer.kernel(spec, sparse_cfg.train, sparse_cfg.sae) == "sparse"
    assert trainer.kernel(spec, dense_cfg.train, dense_cfg.sae) == "dense"
    assert int(jnp.sum(out.f > 0)) == B * 6 and counts.max() >= 20  # B*k kept; some tokens hold many
    assert int(sparse.route(out.f, k_max, ROWS)[0]) == path
    if path == 1:
        assert 1 <= (counts > k_max).sum() <= ROWS and (counts <= k_max).sum() >= B - ROWS
    m = trainer.kernel_metrics(out.f, spec, sparse_cfg.train, sparse_cfg.sae)
    assert float(m["over_budget_fraction"]) * B == (counts > k_max).sum()
    assert (float(m["dense_fallback"]), float(m["sparse_token_fraction"])) == [(0, 1), (0, 1 - ROWS / B), (1, 0)][path]
    s_loss, s_out, s_parts, s_g = grads_of(sparse_cfg, state, x)
    assert float(parts.auxk) > 0 and float(s_parts.auxk) == pytest.approx(float(parts.auxk), rel=tol)
    if (
        arch == "matryoshka"
    ):  # the prefixes are (16, 64, 128), and their terms count: the loss exceeds recon + alpha AuxK
        assert matryoshka.prefixes(dense_cfg.sae, dense_cfg.sae.n_latents) == list(PREFIXES)
        assert float(parts.loss) > float(parts.recon + dense_cfg.train.auxk_coefficient * parts.auxk) + 1.0
    assert s_loss == pytest.approx(loss, rel=tol)
    for a, b in zip(s_parts, parts):
        assert float(a) == pytest.approx(float(b), rel=tol, abs=1e-30)
    np.testing.assert_array_equal(np.asarray(s_out.f), np.asarray(out.f))
    np.testing.assert_array_equal(np.asarray(s_out.pre), np.asarray(out.pre))
    assert rel(s_out.x_hat, out.x_hat) <= tol
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert rel(getattr(s_g, name), getattr(g, name)) <= tol, name
    np.testing.assert_array_equal(np.asarray(s_g.threshold), np.zeros(sparse_cfg.sae.n_latents))
    np.testing.assert_array_equal(np.asarray(g.threshold), np.zeros(sparse_cfg.sae.n_latents))


def test_decoder_norm_penalty_is_in_the_sparse_gradient():
    """The check above can see a missing term: without lambda the W_dec gradient moves far past TOL."""
    x = batch(mixed=True)
    cfg = config("relu", "sparse", **{"train.sparse_k_max": 12})
    state = state_with(cfg)
    _, _, _, g = grads_of(cfg, state, x)
    _, _, _, g0 = grads_of(
        config("relu", "sparse", **{"train.sparse_k_max": 12, "train.l1_coefficient": 0.0}), state, x
    )
    assert rel(g0.W_dec, g.W_dec) > 1e-2


def test_auxk_and_prefixes_are_in_the_sparse_recipe_gradient():
    """The recipe check above can see a missing term: without AuxK (alpha 0), or without matryoshka's inner
    prefixes (batchtopk's loss), the sparse W_dec gradient moves far past TOL."""
    x, some = batch(mixed=True), {"train.sparse_k_max": 20}
    state = state_with(config("batchtopk", "sparse", **some), 0.0, 3)
    g = {
        name: grads_of(config(arch, "sparse", **some, **extra), state, x)[3]
        for name, arch, extra in [
            ("batchtopk", "batchtopk", {}),
            ("no-auxk", "batchtopk", {"train.auxk_coefficient": 0.0}),
            ("matryoshka", "matryoshka", {}),
        ]
    }
    assert rel(g["no-auxk"].W_dec, g["batchtopk"].W_dec) > 1e-2
    assert rel(g["matryoshka"].W_dec, g["batchtopk"].W_dec) > 1e-2


TRAIN_CASES = {  # name: (arch, extra config)
    "relu-some-over": ("relu", {"train.sparse_k_max": 12}),
    "relu-some-over-bf16": ("relu", {"train.sparse_k_max": 12, "train.compute_dtype": "bfloat16"}),
    "relu-some-over-dense-rows": ("relu", {"train.sparse_k_max": 12}),
    "topk-dead": ("topk", {"train.dead_tokens": 3 * B}),
    "topk-dead-bf16": ("topk", {"train.dead_tokens": 3 * B, "train.compute_dtype": "bfloat16"}),
    "batchtopk-some-over": ("batchtopk", {"train.sparse_k_max": 20, "train.dead_tokens": 3 * B}),
    "batchtopk-some-over-bf16": (
        "batchtopk",
        {"train.sparse_k_max": 20, "train.dead_tokens": 3 * B, "train.compute_dtype": "bfloat16"},
    ),
    "matryoshka-some-over": ("matryoshka", {"train.sparse_k_max": 20, "train.dead_tokens": 3 * B}),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_sparse_training_follows_dense_for_8_steps(case, monkeypatch):
    """Params after 8 steps on mixed batches; topk with dead_tokens = 3 batches, so AuxK switches on from step 4.

    batchtopk and matryoshka: AuxK the same way, k_max = 20 leaves 2-4 tokens over it each step (dense rows), and
    the running threshold (set from the step's code after the update) is compared too."""
    arch, extra = TRAIN_CASES[case]
    if "dense-rows" in case:
        monkeypatch.setattr(sparse, "ROW_BUDGET_FACTOR", 1)
    tol = TOL_BF16 if "bf16" in case else TOL
    params, metrics = {}, {}
    for kernel in ("dense", "sparse"):
        cfg = config(arch, kernel, **extra)
        state, step = state_with(cfg, -1.0 if arch == "relu" else 0.0), make_step(cfg)
        ms = []
        for i in range(8):
            state, m = step(state, batch(10 + i, mixed=True), jnp.float32(1.0))
            ms.append(jax.device_get(m))
        params[kernel], metrics[kernel] = jax.device_get(state.params), ms
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch in ("batchtopk", "matryoshka") else ())
    for name in names:
        assert rel(getattr(params["sparse"], name), getattr(params["dense"], name)) <= tol, name
    if "threshold" in names:  # it moved from its (perturbed) start
        start = state_with(config(arch, "dense", **extra), 0.0).params.threshold
        assert np.abs(np.asarray(params["dense"].threshold - start)).min() > 1e-3
    for a, b in zip(metrics["sparse"], metrics["dense"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=tol) and a["l0"] == b["l0"]
        assert (a["kernel_sparse"], b["kernel_sparse"], b["sparse_token_fraction"]) == (1, 0, 0)
    if arch != "relu":
        assert metrics["dense"][2]["auxk"] == 0 and metrics["dense"][3]["auxk"] > 0
    if arch == "topk":
        assert metrics["dense"][-1]["auxk"] > 0
        assert all(m["sparse_token_fraction"] == 1 for m in metrics["sparse"])
    else:
        # Every step: a few tokens over the budget went dense, the rest sparse, and no step fell back whole.
        assert all(m["dense_fallback"] == 0 and 0 < m["over_budget_fraction"] <= ROWS / B for m in metrics["sparse"])
        assert all(m["sparse_token_fraction"] == 1 - ROWS / B for m in metrics["sparse"])


@pytest.mark.parametrize("grad_clip", [1.0, 1e-3, 0.0])  # clipping off, triggered, disabled
def test_fused_adam_equals_optax(grad_clip):
    """`optimizer()` (adam.fused_adam) against optax.chain(clip_by_global_norm, adam), both applied jitted, over 6 steps.

    Measured <= 1.6e-7 of each array's largest entry (float32 rounding: XLA
    fuses the two differently, and clipping is one factor g * (c / |g|) instead
    of (g / |g|) * c); asserted 1e-6.
    """
    cfg = config(**{"train.grad_clip": grad_clip, "train.lr_warmup_steps": 3})
    t, state = cfg.train, init_state(cfg)
    ref_tx = adam.reference(lr_schedule(t), t.adam_b1, t.adam_b2, clip=t.grad_clip)
    ref = jax.jit(lambda g, o, p: (lambda u, o: (optax.apply_updates(p, u), o))(*ref_tx.update(g, o, p)))
    ours = jax.jit(lambda g, o, p: apply_optimizer(optimizer(t), g, o, p, jnp.bool_(True)))
    p_ref, o_ref, p, o = state.params, state.opt_state, state.params, state.opt_state
    assert jax.tree.structure(o) == jax.tree.structure(ref_tx.init(p))  # checkpoints restore into either
    rng = np.random.default_rng(0)
    for _ in range(6):
        g = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)), p)
        p_ref, o_ref = ref(g, o_ref, p_ref)
        p, o = ours(g, o, p)
    assert jax.tree.structure(o) == jax.tree.structure(o_ref)
    adam_state, adam_ref = (o[1][0], o_ref[1][0]) if grad_clip else (o[0], o_ref[0])
    assert int(adam_state.count) == int(adam_ref.count) == 6
    for a, b in zip(jax.tree.leaves((p, o)), jax.tree.leaves((p_ref, o_ref))):
        assert a.dtype == b.dtype and rel(a, b) <= 1e-6


@pytest.mark.parametrize("which", ["fused", "optax.adamw"])
def test_optimizer_not_ok_changes_nothing(which):
    """ok false: params and optimizer state bit for bit as they were, for the fused Adam (masked in its own pass)
    and for a plain optax transformation (masked by adam.masking)."""
    cfg = config()
    state = init_state(cfg)
    tx = optimizer(cfg.train) if which == "fused" else optax.adamw(1e-3)
    opt_state = tx.init(state.params)
    g = jax.tree.map(jnp.ones_like, state.params)
    p, o = jax.jit(lambda g, o, p: apply_optimizer(tx, g, o, p, jnp.bool_(False)))(g, opt_state, state.params)
    for a, b in zip(jax.tree.leaves((p, o)), jax.tree.leaves((state.params, opt_state))):
        np.testing.assert_array_equal(a, b)


def test_the_step_applies_whatever_optimizer_returns(monkeypatch):
    """Swapping optax.adamw in for `optimizer`: weight decay 0 steps as Adam does (no clipping here), 0.1 moves the params.

    AdamW's update is Adam's minus lr * wd * p, so after 3 steps at lr 1e-3 the params differ by about
    3e-4 * |p|: far above float32 rounding (asserted <= 1e-6 for wd = 0 and >= 1e-5 for wd = 0.1).
    """
    cfg = config("relu", "dense", **{"train.grad_clip": 0.0})
    x = batch()

    def run():
        state, step = state_with(cfg), make_step(cfg)
        for _ in range(3):
            state, _ = step(state, x, jnp.float32(1.0))
        return jax.device_get(state.params)

    adam_params = run()
    for wd, low, high in [(0.0, 0.0, 1e-6), (0.1, 1e-5, 1.0)]:
        monkeypatch.setattr(
            trainer, "optimizer", lambda t, wd=wd: optax.adamw(lr_schedule(t), t.adam_b1, t.adam_b2, weight_decay=wd)
        )
        got = run()
        assert low <= max(rel(getattr(got, n), getattr(adam_params, n)) for n in ("W_enc", "W_dec")) <= high, wd
