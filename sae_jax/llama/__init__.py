"""Llama-3 in Flax NNX, read straight from Hugging Face checkpoints.

model = load("path/to/Llama-3.2-1B-Instruct")          # or dtype="bfloat16" / jnp.bfloat16
x = residual(model, input_ids, 9)                       # [B, T, D], entering layer 9
y = logits(model, input_ids, attention_mask=mask)       # [B, T, V] float32
y = logits(model, input_ids, edit=Edit(params, 9, "input", fn))   # with the residual there replaced
"""

from sae_jax.llama.config import LlamaConfig, LlamaLoadError, RopeScaling, load_config
from sae_jax.llama.generate import generate
from sae_jax.llama.load import load
from sae_jax.llama.model import Edit, Llama, logits, logits_from, residual, residuals, run_layers, site_index
from sae_jax.llama.tiny import write_tiny_checkpoint

__all__ = [
    "Edit",
    "Llama",
    "LlamaConfig",
    "LlamaLoadError",
    "RopeScaling",
    "generate",
    "load",
    "load_config",
    "logits",
    "logits_from",
    "residual",
    "residuals",
    "run_layers",
    "site_index",
    "write_tiny_checkpoint",
]
