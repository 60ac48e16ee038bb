"""sae-jax: sparse autoencoders on Llama-3 activations in JAX.

The public surface: the SAE (spec, params, encode/decode/forward), reading and
writing it in every supported format, and the typed training config. Models,
data, evaluation and steering live in their own modules (`sae_jax.llama`,
`sae_jax.data`, ...).
"""

from sae_jax.config import Config, ConfigError, load_config
from sae_jax.evaluate import Evaluation, evaluate, quick_eval
from sae_jax.formats import FORMATS, SAEFormatError, load_sae, save_sae
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
from sae_jax.steer import steer, steering_edit
from sae_jax.inspect_features import chat_features, top_contexts

__all__ = [
    "Evaluation",
    "FORMATS",
    "SAE",
    "Config",
    "ConfigError",
    "SAEFormatError",
    "SAEParams",
    "SAESpec",
    "chat_features",
    "decode",
    "encode",
    "evaluate",
    "explained_variance",
    "forward",
    "init_params",
    "load_config",
    "load_sae",
    "quick_eval",
    "save_sae",
    "steer",
    "steering_edit",
    "top_contexts",
]
