"""Mixed precision (train.compute_dtype: bfloat16): bf16 matmuls, float32 master weights and Adam state.

References. (1) float32 on the same bf16-rounded params and batch: the
selection of active latents must be identical, and what remains is the
rounding of the other matmul inputs (codes, cotangents) to bf16, 2^-9
relative each. Measured at D = 64, N = 512, B = 256: losses within 6e-5
relative, gradients within 2.5e-3 of their largest entry; asserted 2e-4 and
1e-2. (2) A float32 run from the same init for 5 steps: losses within 8e-6
relative (asserted 1e-4); the params' distance to it is <= 9% of their
distance travelled (asserted 25%): Adam divides each gradient entry by its
own scale, so entries near zero move by about lr whatever their rounding.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.config import load_config
from sae_jax.trainer import init_state, loss_and_grads, make_step, spec_from_config

D, EXPANSION, B = 64, 8, 256


def config(arch, kernel, dtype):
    sets = [
        f"sae.d_in={D}",
        f"sae.expansion={EXPANSION}",
        f"data.batch_size={B}",
        f"train.kernel={kernel}",
        f"train.compute_dtype={dtype}",
        "train.lr=1e-3",
        "train.lr_warmup_steps=0",
        "train.steps=100",
    ]
    if arch != "relu":
        sets += [f"sae.architecture={arch}", "sae.k=16"]
    return load_config(None, sets)


def batch(seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, D)).astype(np.float32))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def bf16_rounded(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), tree)


RUNS = [("relu", "dense"), ("relu", "sparse"), ("topk", "dense"), ("topk", "sparse")]
RUNS += [("batchtopk", "dense"), ("batchtopk", "sparse"), ("matryoshka", "dense"), ("matryoshka", "sparse")]


@pytest.mark.parametrize("arch,kernel", RUNS)
def test_bf16_matches_float32_on_the_same_bf16_inputs(arch, kernel):
    x, out = batch(0), {}
    state = init_state(config(arch, kernel, "float32"))
    for dtype, s, xs in [
        ("bfloat16", state, x),
        ("float32", dataclasses.replace(state, params=bf16_rounded(state.params)), bf16_rounded(x)),
    ]:
        cfg = config(arch, kernel, dtype)
        out[dtype] = jax.jit(lambda s, x: loss_and_grads(s, x, spec_from_config(cfg), cfg.train, cfg.sae))(s, xs)
    ((l16, (f16, _)), g16), ((l32, (f32, _)), g32) = out["bfloat16"], out["float32"]
    np.testing.assert_array_equal(np.asarray(f16.f) > 0, np.asarray(f32.f) > 0)
    assert float(l16) == pytest.approx(float(l32), rel=2e-4)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(g16, name), getattr(g32, name)
        assert a.dtype == jnp.float32 and rel(a, b) <= 1e-2, name


@pytest.mark.parametrize("arch,kernel", RUNS)
def test_bf16_training_keeps_float32_master_weights_and_adam_state(arch, kernel):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(arch, kernel, dtype)
        state, step = init_state(cfg), make_step(cfg)
        start, losses = jax.device_get(state.params), []
        for i in range(5):
            state, m = step(state, batch(i), jnp.float32(1.0))
            losses.append(float(m["loss"]))
        adam = state.opt_state[1][0]
        assert {a.dtype for a in jax.tree.leaves((state.params, adam.mu, adam.nu))} == {jnp.dtype(jnp.float32)}
        runs[dtype] = (jax.device_get(state.params), losses)
    (p32, l32), (p16, l16) = runs["float32"], runs["bfloat16"]
    assert l16 == pytest.approx(l32, rel=1e-4)
    dist = lambda a, b: np.sqrt(
        sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    )
    assert 0 < dist(p16, p32) <= 0.25 * dist(p32, start)


# Products in the lowered step (every branch of a cond counted). relu dense: the encoder's and
# decoder's forward and the three backward products. topk dense: those five and AuxK's decode,
# forward and two backward. relu sparse, 19: the encoder's forward, then per path (all sparse; the
# fullest rows dense; all dense; the fullest rows from their own larger active set) the active-row
# decode's forward and codes' gradient, the dense rows' three products, the fullest rows' own decode
# forward and codes' gradient, and one x^T @ dpre. topk sparse, 9: the encoder's forward, then per branch
# (no dead latent; AuxK) the decodes' forwards and codes' gradients and one x^T @ dpre. batchtopk dense: topk's
# eight; matryoshka dense: four more for its second group (prefixes N/2, N). batchtopk sparse, 33: the encoder's
# forward, then relu's three paths (3, 6 and 4: the all-dense path has no active-row decode), each again with
# AuxK's decode (2 more). matryoshka sparse, 53: the same with every decode and dense-row product once per group.
DOTS = {("relu", "dense"): 5, ("relu", "sparse"): 19, ("topk", "dense"): 8, ("topk", "sparse"): 9}
DOTS |= {("batchtopk", "dense"): 8, ("batchtopk", "sparse"): 33, ("matryoshka", "dense"): 12}
DOTS |= {("matryoshka", "sparse"): 53}


@pytest.mark.parametrize("arch,kernel", RUNS)
def test_bf16_step_multiplies_in_bf16(arch, kernel):
    """The lowered step's matmuls: under bfloat16 every one takes bf16 inputs (none over [B, N] or anything else in
    float32) and returns float32; under float32 none takes bf16."""
    found = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(arch, kernel, dtype)
        text = make_step(cfg).lower(init_state(cfg), batch(0), jnp.float32(1.0)).as_text()
        found[dtype] = re.findall(r"stablehlo\.dot_general .*?: \((tensor<[^)]*)\) -> (tensor<[^>]*>)", text)
    assert len(found["float32"]) == len(found["bfloat16"]) == DOTS[(arch, kernel)]
    assert not any("bf16" in ins for ins, _ in found["float32"])
    for ins, out in found["bfloat16"]:
        assert ins.count("xbf16>") == 2 and "f32" not in ins and out.endswith("xf32>"), (ins, out)


def relu_grads_float64(p, x, lam):
    """The relu loss's gradients in float64 numpy, written out by hand: the reference both bf16 kernels are measured from."""
    p = {k: np.asarray(getattr(p, k), np.float64) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x = np.asarray(x, np.float64)
    pre = x @ p["W_enc"] + p["b_enc"]
    f = np.maximum(pre, 0)
    norms = np.linalg.norm(p["W_dec"], axis=1)
    dx_hat = 2 * (f @ p["W_dec"] + p["b_dec"] - x) / len(x)
    dpre = (dx_hat @ p["W_dec"].T + lam * norms / len(x)) * (pre > 0)
    dW_dec = f.T @ dx_hat + lam * (f.sum(0) / len(x) / norms)[:, None] * p["W_dec"]
    return {"W_enc": x.T @ dpre, "b_enc": dpre.sum(0), "W_dec": dW_dec, "b_dec": dx_hat.sum(0)}


def test_bf16_sparse_gradients_as_close_to_float64_as_dense_bf16():
    """relu, on a state where some tokens exceed sparse_k_max: each bf16 kernel's gradient error against float64.

    Both kernels multiply the same bf16 inputs, so their errors match to float32 summation order: measured
    equal to 3 digits (of each gradient's largest entry: W_enc 0.32 and b_enc 0.28, where bf16 rounding of
    the pre-activations moves latents across 0 at this small-norm init; W_dec 5.3e-3; b_dec 2.5e-5; float32
    for comparison <= 9e-7); asserted within 10%.
    """
    x, err = batch(0), {}
    for kernel in ("dense", "sparse"):
        cfg = config("relu", kernel, "bfloat16")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sparse_k_max=24, l1_warmup_frac=0.0))
        state = init_state(cfg)
        state = dataclasses.replace(state, params=dataclasses.replace(state.params, b_enc=state.params.b_enc - 0.2))
        (_, (out, _)), g = jax.jit(lambda s, x: loss_and_grads(s, x, spec_from_config(cfg), cfg.train))(state, x)
        counts = np.asarray(jnp.sum(out.f > 0, axis=-1))
        assert 0 < (counts > 24).sum() <= 16 and counts.min() > 0  # the sparse kernel's path 1: both ways in one batch
        ref = relu_grads_float64(state.params, x, cfg.train.l1_coefficient)
        err[kernel] = {k: rel(getattr(g, k), ref[k]) for k in ref}
    for k in err["dense"]:
        assert 0 < err["sparse"][k] <= 1.1 * err["dense"][k], (k, err)
