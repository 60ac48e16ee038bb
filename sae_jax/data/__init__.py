"""Activation sources: iterators of [B, D] float32 batches with a saveable position."""

from sae_jax.data.source import Source

__all__ = ["Source"]
