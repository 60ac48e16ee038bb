"""Rope frequencies against transformers' own `llama3` and default computations."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.llama import LlamaConfig, RopeScaling, rope

LLAMA_3_2_1B = LlamaConfig(
    hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
    vocab_size=128256, rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
)  # fmt: skip


def transformers_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    from transformers import LlamaConfig as HFConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    s = cfg.rope_scaling
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if s is not None:
        params.update(rope_type="llama3", **dataclasses.asdict(s))
    hf = HFConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, rope_parameters=params)  # fmt: skip
    return LlamaRotaryEmbedding(hf).inv_freq.numpy()


@pytest.mark.parametrize("scaled", [True, False])
def test_inv_freq_equals_transformers(scaled):
    cfg = LLAMA_3_2_1B if scaled else dataclasses.replace(LLAMA_3_2_1B, rope_scaling=None)
    ours, theirs = rope.inv_freq(cfg), transformers_inv_freq(cfg)
    assert ours.dtype == np.float32 and ours.shape == (32,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


def test_llama3_scaling_divides_long_wavelengths_by_factor_and_keeps_short_ones():
    scaled = rope.inv_freq(LLAMA_3_2_1B)
    plain = rope.inv_freq(dataclasses.replace(LLAMA_3_2_1B, rope_scaling=None))
    wavelen = 2 * np.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 32, rtol=1e-6)
    between = ~short & ~long
    assert between.any() and np.all((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 32))


def test_rotation_keeps_norms_and_is_relative():
    """A rotation per pair: norms unchanged, and q.k depends only on the position difference."""
    cfg = LLAMA_3_2_1B
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32) for _ in range(2))

    def at(x, p):
        cos, sin = rope.cos_sin(cfg, jnp.array([[p]]))
        return rope.apply(x, cos, sin)

    np.testing.assert_allclose(jnp.linalg.norm(at(q, 37)), jnp.linalg.norm(q), rtol=1e-6)
    dot = lambda i, j: float(jnp.sum(at(q, i) * at(k, j)))
    np.testing.assert_allclose(dot(10, 3), dot(107, 100), rtol=1e-5)
