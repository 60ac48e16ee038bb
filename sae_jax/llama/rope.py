"""Rotary position embeddings with Llama-3's `llama3` frequency scaling.

Uses Hugging Face's half-split layout (rotate the first H/2 dims against the
last H/2), which is the layout HF checkpoints' q/k projections are permuted for.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.llama.config import LlamaConfig


def inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """[H/2] float32 angular frequencies, as transformers' `_compute_llama3_parameters` gives them."""
    H = cfg.head_dim
    # float32 throughout, in transformers' order, so the angles agree to the last bit where possible.
    freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, H, 2, dtype=np.float32) / np.float32(H)))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s is None:
        return freq
    old = s.original_max_position_embeddings
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old / s.low_freq_factor, freq / s.factor, freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < old / s.high_freq_factor) & ~(wavelen > old / s.low_freq_factor)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions: [B, T] int -> (cos, sin), each [B, T, H/2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, ..., H] rotated by cos, sin: [B, T, H/2]; same dtype as x."""
    heads = tuple(range(2, x.ndim - 1))  # head axes between T and H
    cos = jnp.expand_dims(cos, heads).astype(x.dtype)
    sin = jnp.expand_dims(sin, heads).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
