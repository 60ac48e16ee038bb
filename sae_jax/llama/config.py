"""The Llama config: a frozen dataclass parsed from a Hugging Face `config.json`.

Reads both layouts of the rope settings: transformers 4.45 (as on the hub for
Llama-3.2) writes top-level `rope_theta` and `rope_scaling`; transformers 5
writes the same values under `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so np.dtype("bfloat16") resolves
import numpy as np

from sae_jax import typed


class LlamaLoadError(ValueError):
    """A checkpoint folder that cannot be read as a Llama; the message is one line."""


def dtype_name(dtype: Any, allowed: tuple[str, ...], what: str = "dtype") -> str:
    """The name of `dtype` (a string, numpy or JAX dtype) if it is in `allowed`; else a one-line ValueError."""
    try:
        name = None if dtype is None else np.dtype(dtype).name  # np.dtype(None) would be float64
    except TypeError:
        name = None
    if name not in allowed:
        found = dtype if isinstance(dtype, str) or name is None else name  # "float16", not "<class 'jax...float16'>"
        raise ValueError(f"{what}: expected one of {allowed}, found {found!r}")
    return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """`llama3` rope scaling: long wavelengths divided by `factor`, a smooth band between."""

    factor: float  # 32 for Llama-3.2
    low_freq_factor: float  # wavelengths above original_max / low_freq_factor are scaled fully
    high_freq_factor: float  # wavelengths below original_max / high_freq_factor are untouched
    original_max_position_embeddings: int  # 8192, the pre-extension context length


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Everything about a Llama that is not a weight. Hashable, so jit-static."""

    hidden_size: int  # D
    num_layers: int  # L, decoder layers
    num_heads: int  # N, query heads
    num_kv_heads: int  # KV, key/value heads; each serves G = N // KV query heads
    head_dim: int  # H
    intermediate_size: int  # F, SwiGLU width
    vocab_size: int  # V
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None  # None: plain rope
    tie_word_embeddings: bool = True  # logits use the embedding matrix; no lm_head.weight
    max_position_embeddings: int = 131072
    dtype: str = "bfloat16"  # the checkpoint's declared storage dtype (informational)

    def __post_init__(self):
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive integer, found {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, found {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (rope rotates pairs), found {self.head_dim}")

    @property
    def groups(self) -> int:
        """G, query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


def _get(d: dict, key: str, kind: type, where: str, default: Any = typed.MISSING) -> Any:
    """d[key] as `kind` (`typed.get`); a missing or mistyped value is a one-line LlamaLoadError."""
    return typed.get(d, key, kind, where, default, LlamaLoadError)


def _rope(d: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either config.json layout."""
    if isinstance(d.get("rope_parameters"), dict):  # transformers 5
        params, prefix = d["rope_parameters"], "rope_parameters"
        theta = _get(params, "rope_theta", float, f"{where}: {prefix}", 10000.0)
    else:  # transformers 4.x: top-level theta, optional scaling dict
        params, prefix = d.get("rope_scaling") or {}, "rope_scaling"
        theta = _get(d, "rope_theta", float, where, 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise LlamaLoadError(f"{where}: {prefix}.rope_type: expected 'llama3' or 'default', found {rope_type!r}")
    w = f"{where}: {prefix}"
    return theta, RopeScaling(
        factor=_get(params, "factor", float, w),
        low_freq_factor=_get(params, "low_freq_factor", float, w),
        high_freq_factor=_get(params, "high_freq_factor", float, w),
        original_max_position_embeddings=_get(params, "original_max_position_embeddings", int, w),
    )


def config_from_dict(d: dict, where: str = "config.json") -> LlamaConfig:
    """Parse a HF Llama config dict; `where` names the source in error messages."""
    if d.get("model_type", "llama") != "llama":
        raise LlamaLoadError(f"{where}: model_type: expected 'llama', found {d['model_type']!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise LlamaLoadError(f"{where}: hidden_act: expected 'silu', found {d['hidden_act']!r}")
    for key in ("attention_bias", "mlp_bias"):  # Llama-3 has no biases; refuse rather than drop them
        if d.get(key, False):
            raise LlamaLoadError(f"{where}: {key}: expected false, found {d[key]!r}")
    hidden = _get(d, "hidden_size", int, where)
    heads = _get(d, "num_attention_heads", int, where)
    theta, scaling = _rope(d, where)
    try:
        return LlamaConfig(
            hidden_size=hidden,
            num_layers=_get(d, "num_hidden_layers", int, where),
            num_heads=heads,
            num_kv_heads=_get(d, "num_key_value_heads", int, where, heads),
            head_dim=_get(d, "head_dim", int, where, hidden // heads),
            intermediate_size=_get(d, "intermediate_size", int, where),
            vocab_size=_get(d, "vocab_size", int, where),
            rms_norm_eps=_get(d, "rms_norm_eps", float, where, 1e-6),  # transformers' default
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=_get(d, "tie_word_embeddings", bool, where, False),  # transformers' default
            max_position_embeddings=_get(d, "max_position_embeddings", int, where, 2048),
            dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
        )
    except LlamaLoadError:
        raise
    except ValueError as e:
        raise LlamaLoadError(f"{where}: {e}") from None


def load_config(path: str | Path) -> LlamaConfig:
    """The config of the HF folder `path` (its `config.json`)."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise LlamaLoadError(f"{path}: not a directory (expected a Hugging Face model folder)")
    if not file.is_file():
        raise LlamaLoadError(f"{file}: no such file (expected the model's config.json)")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LlamaLoadError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise LlamaLoadError(f"{file}: expected a JSON object, found {type(d).__name__}")
    return config_from_dict(d, str(file))
