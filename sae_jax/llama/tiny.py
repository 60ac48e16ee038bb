"""A tiny random Llama-3.2 checkpoint in Hugging Face format, written without torch.

It has every feature of `meta-llama/Llama-3.2-1B-Instruct` at a small width:
grouped-query attention, `llama3` rope scaling (factor 32, low 1, high 4,
original max 8192, theta 500000), tied embeddings (no `lm_head.weight`), RMS
eps 1e-5, bfloat16 weights in one `model.safetensors`. The same seed and
arguments give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sae_jax.llama.config import config_from_dict, dtype_name
from sae_jax.llama.weights import weight_table

WEIGHT_DTYPES = ("bfloat16", "float16", "float32")
LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
ROPE_THETA = 500000.0
BOS, EOS = 128000, [128001, 128008, 128009]  # the real Llama-3 special tokens, when the vocab holds them


def tiny_config(
    *,
    num_hidden_layers: int,
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int | None,
    vocab_size: int,
    tie_word_embeddings: bool,
    old_format: bool,
    dtype: str,
) -> dict:
    """The config.json dict, laid out as the hub's (transformers 4.45) or as transformers 5 writes it."""
    real_vocab = vocab_size > max(EOS)
    d = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS if real_vocab else None,
        "eos_token_id": EOS if real_vocab else None,
        "head_dim": head_dim or hidden_size // num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if old_format:
        d.update(
            rope_scaling=dict(LLAMA3_ROPE), rope_theta=ROPE_THETA, torch_dtype=dtype, transformers_version="4.45.0.dev0"
        )
    else:
        d.update(rope_parameters={**LLAMA3_ROPE, "rope_theta": ROPE_THETA}, dtype=dtype, transformers_version="5.0.0")
    return dict(sorted(d.items()))


def write_tiny_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    num_hidden_layers: int = 12,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 128256,
    tie_word_embeddings: bool = True,
    old_format: bool = False,
    dtype="bfloat16",
    init_std: float = 0.02,
) -> Path:
    """Write config.json and model.safetensors into folder `path` (created if needed); return the folder.

    Matrices are N(0, init_std); RMSNorm gains are 1 + N(0, 0.1), so the norms
    are not the identity. Larger `init_std` (e.g. 0.2) gives peaked attention,
    which tests want so that mask and position errors show. `dtype` (the
    weights') may be a string, a numpy or a JAX dtype.
    """
    dtype = dtype_name(dtype, WEIGHT_DTYPES)
    d = tiny_config(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        old_format=old_format,
        dtype=dtype,
    )
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, spec in weight_table(config_from_dict(d)).items():
        if len(spec.shape) == 1:  # RMSNorm gain
            w = 1.0 + 0.1 * rng.standard_normal(spec.shape, dtype=np.float32)
        else:
            w = init_std * rng.standard_normal(spec.shape, dtype=np.float32)
        tensors[key] = w.astype(dtype)  # numpy knows "bfloat16" once ml_dtypes is imported (config.py does)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})  # transformers requires "pt"
    (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    return folder
