"""sae-jax: sparse autoencoders on Llama-3 activations in JAX.

The public surface: the SAE (spec, params, encode/decode/forward), reading and
writing it in every supported format, the typed training config, evaluation,
inspection and steering. Models, data and the trainer live in their own modules
(`sae_jax.llama`, `sae_jax.data`, `sae_jax.trainer`). `import sae_jax` loads the
SAE and the config only; the names below that need orbax, flax or transformers
are imported when first used.
"""

import importlib

from sae_jax.config import Config, load_config
from sae_jax.errors import ConfigError, SAEFormatError
from sae_jax.sae import (
    SAE,
    SAEParams,
    SAESpec,
    decode,
    encode,
    explained_variance,
    forward,
    init_params,
)

# name -> the module that defines it, imported on first use
_LAZY = {
    "FORMATS": "sae_jax.formats",
    "load_sae": "sae_jax.formats",
    "save_sae": "sae_jax.formats",
    "quick_eval": "sae_jax.metrics",
    "Evaluation": "sae_jax.evaluate",
    "evaluate": "sae_jax.evaluate",
    "steer": "sae_jax.steer",
    "steering_edit": "sae_jax.steer",
    "chat_features": "sae_jax.inspect_features",
    "top_contexts": "sae_jax.inspect_features",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_jax' has no attribute {name!r}")


__all__ = [
    "SAE",
    "Config",
    "ConfigError",
    "SAEFormatError",
    "SAEParams",
    "SAESpec",
    "decode",
    "encode",
    "explained_variance",
    "forward",
    "init_params",
    "load_config",
    *_LAZY,
]
