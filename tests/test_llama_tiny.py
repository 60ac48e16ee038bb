"""The tiny checkpoint writer: deterministic, torch-free, and shaped like Llama-3.2-1B-Instruct."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
from safetensors import safe_open

from sae_jax.llama import write_tiny_checkpoint


def digest(folder) -> str:
    return hashlib.sha256(
        (folder / "model.safetensors").read_bytes() + (folder / "config.json").read_bytes()
    ).hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(num_hidden_layers=2, vocab_size=256)
    a = write_tiny_checkpoint(tmp_path / "a", seed=3, **kw)
    b = write_tiny_checkpoint(tmp_path / "b", seed=3, **kw)
    c = write_tiny_checkpoint(tmp_path / "c", seed=4, **kw)
    assert digest(a) == digest(b) != digest(c)


def test_default_has_the_real_model_features(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "d")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rope_parameters"] == {
        "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3", "rope_theta": 500000.0,
    }  # fmt: skip
    assert (cfg["vocab_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["num_attention_heads"]) == (
        128256,
        12,
        2,
        4,
    )
    assert (cfg["tie_word_embeddings"], cfg["rms_norm_eps"], cfg["bos_token_id"], cfg["dtype"]) == (
        True,
        1e-5,
        128000,
        "bfloat16",
    )
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and len(keys) == 2 + 9 * 12
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        embed = f.get_tensor("model.embed_tokens.weight").astype(np.float32)
        norm = f.get_tensor("model.layers.0.input_layernorm.weight").astype(np.float32)
    assert embed.shape == (128256, 64) and abs(embed.std() - 0.02) < 1e-3
    assert abs(norm.mean() - 1) < 0.05 and norm.std() > 0.05  # not the identity


def test_old_format_writes_top_level_rope_keys(tmp_path):
    cfg = json.loads(
        (
            write_tiny_checkpoint(tmp_path / "o", num_hidden_layers=1, vocab_size=64, old_format=True) / "config.json"
        ).read_text()
    )
    assert (
        "rope_parameters" not in cfg and cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    )
    assert cfg["torch_dtype"] == "bfloat16"


def test_writer_runs_with_torch_unimportable(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from sae_jax.llama.tiny import write_tiny_checkpoint\n"
        f"write_tiny_checkpoint({str(tmp_path / 'nt')!r}, num_hidden_layers=1, vocab_size=64)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "nt" / "model.safetensors").is_file()
