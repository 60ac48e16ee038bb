"""`train.kernel: auto`: sparse where the shape makes it pay, dense elsewhere; metrics.jsonl says which way steps go."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_run import tiny

from sae_jax import run, sparse
from sae_jax.trainer import AUTO_SPARSE_RATIO, init_state, kernel, make_step, spec_from_config


@pytest.mark.parametrize(
    "arch,expansion,budget,expected",
    [
        ("relu", 4, 128, "dense"),  # N = 32 < 256 * k_max
        ("relu", 64, 2, "sparse"),  # N = 512 = 256 * k_max
        ("relu", 64, 3, "dense"),
        ("topk", 64, 2, "sparse"),  # N = 512 = 256 * k
        ("topk", 64, 3, "dense"),
    ],
)
def test_auto_resolves_from_the_shape(tmp_path, arch, expansion, budget, expected):
    extra = {"sae.expansion": expansion, "train.sparse_k_max": budget}
    if arch == "topk":
        extra.update({"sae.architecture": "topk", "sae.k": budget})
    cfg = tiny(tmp_path, **extra)
    assert cfg.train.kernel == "auto" and AUTO_SPARSE_RATIO == 256
    assert kernel(spec_from_config(cfg), cfg.train) == expected


def test_auto_run_takes_the_sparse_kernel_and_metrics_say_so(tmp_path):
    """topk, N = 512 = 256 k: every logged line says sparse, every token of every step went the sparse way."""
    cfg = tiny(tmp_path, **{"sae.architecture": "topk", "sae.k": 2, "sae.expansion": 64, "train.auxk_k": 16})
    run.train(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(r["kernel_sparse"] == 1.0 and r["sparse_token_fraction"] == 1.0 for r in lines)


def test_auto_relu_goes_sparse_by_token_once_the_codes_are_sparse():
    """relu under auto: a batch whose tokens all have at most k_max = 8 active latents of N = 2048 runs sparse;
    one with 2 tokens over it (sparse.dense_rows(32) = 2) runs the 2 fullest densely and the rest sparse;
    4 over it, the whole step dense."""
    cfg = tiny("unused", **{"sae.expansion": 256, "train.sparse_k_max": 8})
    state = init_state(cfg)
    W = np.asarray(state.params.W_enc)
    # b_enc = -cut; tokens scaled up 4x cross it in many more latents.
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pre = x @ W
    cut = np.max(np.sort(pre, axis=1)[:, -9])  # every unit-norm token has at most 8 pre-activations above it
    b_enc = jnp.full(W.shape[1], -cut, jnp.float32)
    state = dataclasses.replace(state, params=dataclasses.replace(state.params, b_enc=b_enc))
    step = make_step(cfg)
    assert sparse.dense_rows(32) == 2
    for n_up, want in [(0, (1.0, 0.0, 0.0)), (2, (1 - 2 / 32, 0.0, 2 / 32)), (4, (0.0, 1.0, 4 / 32))]:
        xs = x.copy()
        xs[:n_up] *= 4.0
        counts = ((xs @ W - cut) > 0).sum(1)
        assert counts[n_up:].max() <= 8 and (counts[:n_up] > 8).all()
        _, m = step(jax.tree.map(jnp.copy, state), jnp.asarray(xs), jnp.float32(1.0))  # the step donates its state
        assert float(m["kernel_sparse"]) == 1.0
        got = (m["sparse_token_fraction"], m["dense_fallback"], m["over_budget_fraction"])
        assert tuple(map(float, got)) == pytest.approx(want)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_recipes_take_the_sparse_kernel_as_relu_does(tmp_path, arch):
    """auto: relu's rule, sparse at N = 512 = 256 sparse_k_max, dense at sparse_k_max 3; `train.kernel: sparse`
    takes the sparse kernel, but never with sae.pre_encoder_bias, which it does not cover."""
    base = {"sae.architecture": arch, "sae.k": 2, "sae.expansion": 64, "train.sparse_k_max": 2}
    for chosen, extra, want in [
        ("auto", {}, "sparse"),
        ("auto", {"train.sparse_k_max": 3}, "dense"),
        ("auto", {"sae.pre_encoder_bias": True}, "dense"),
        ("dense", {}, "dense"),
        ("sparse", {}, "sparse"),
        ("sparse", {"sae.unit_norm_decoder": True, "sae.auxk_normalize": True}, "sparse"),
        ("sparse", {"sae.pre_encoder_bias": True}, "dense"),
    ]:
        cfg = tiny(tmp_path, **{**base, **extra, "train.kernel": chosen})
        assert kernel(spec_from_config(cfg), cfg.train, cfg.sae) == want, (chosen, extra)


def test_jumprelu_stays_dense_under_kernel_sparse(tmp_path):
    cfg = tiny(tmp_path, **{"sae.architecture": "jumprelu", "train.kernel": "sparse"})
    assert kernel(spec_from_config(cfg), cfg.train, cfg.sae) == "dense"


def test_sparse_batchtopk_run_logs_its_routing(tmp_path):
    """batchtopk on the sparse kernel end to end (k = 2 of N = 32, sparse_k_max = 4): each logged line says sparse,
    with the per-token routing's metrics: every token either sparse or in the dense rows, and the run trains."""
    extra = {"sae.architecture": "batchtopk", "sae.k": 2, "train.kernel": "sparse", "train.sparse_k_max": 4}
    result = run.train(tiny(tmp_path, **extra), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(r["kernel_sparse"] == 1.0 for r in lines)
    for r in lines:
        assert 0.0 <= r["dense_fallback"] <= 1.0 and 0.0 <= r["over_budget_fraction"] <= 1.0
        assert r["l0"] == pytest.approx(2.0)  # B*k kept over the batch: k per token on average
    assert lines[-1]["loss"] < lines[0]["loss"] and float(result.state.params.threshold[0]) > 0
