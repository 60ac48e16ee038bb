"""sae-jax: sparse autoencoders on Llama-3 activations in JAX."""

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

__all__ = [
    "SAE",
    "SAEParams",
    "SAESpec",
    "decode",
    "encode",
    "explained_variance",
    "forward",
    "init_params",
]
