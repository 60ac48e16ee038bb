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
    sets = [f"sae.d_in={D}", f"sae.expansion={EXPANSION}", f"data.batch_size={B}", f"train.kernel={kernel}",
            f"train.compute_dtype={dtype}", "train.lr=1e-3", "train.lr_warmup_steps=0", "train.steps=100"]
    if arch == "topk":
        sets += ["sae.architecture=topk", "sae.k=16"]
    return load_config(None, sets)


def batch(seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, D)).astype(np.float32))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def bf16_rounded(tree):
    return jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), tree)


RUNS = [("relu", "dense"), ("topk", "dense"), ("topk", "sparse")]


@pytest.mark.parametrize("arch,kernel", RUNS)
def test_bf16_matches_float32_on_the_same_bf16_inputs(arch, kernel):
    x, out = batch(0), {}
    state = init_state(config(arch, kernel, "float32"))
    for dtype, s, xs in [("bfloat16", state, x), ("float32", dataclasses.replace(state, params=bf16_rounded(state.params)), bf16_rounded(x))]:
        cfg = config(arch, kernel, dtype)
        out[dtype] = jax.jit(lambda s, x: loss_and_grads(s, x, spec_from_config(cfg), cfg.train))(s, xs)
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
    dist = lambda a, b: np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    assert 0 < dist(p16, p32) <= 0.25 * dist(p32, start)


# bf16 products in the lowered step. relu dense: the encoder's and decoder's forward and the
# three backward products (the matrix-vector products of the decoder-norm penalty stay
# float32). topk dense: those five and AuxK's decode, forward and two backward. topk sparse:
# the encoder's forward and the active-row decodes (main and AuxK, forward and the codes' gradient).
BF16_DOTS = {("relu", "dense"): 5, ("topk", "dense"): 8, ("topk", "sparse"): 4}


@pytest.mark.parametrize("arch,kernel", RUNS)
def test_bf16_step_multiplies_in_bf16(arch, kernel):
    """The lowered step's matmuls: bf16 inputs and float32 results under bfloat16, none under float32."""
    found = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config(arch, kernel, dtype)
        text = make_step(cfg).lower(init_state(cfg), batch(0), jnp.float32(1.0)).as_text()
        dots = re.findall(r"stablehlo\.dot_general .*?: \((tensor<[^)]*)\) -> (tensor<[^>]*>)", text)
        found[dtype] = [out for ins, out in dots if "bf16" in ins]
    assert found["float32"] == []
    assert len(found["bfloat16"]) == BF16_DOTS[(arch, kernel)]
    assert all(out.endswith("xf32>") for out in found["bfloat16"])
