"""Activation sources: iterators of [B, D] float32 batches with a saveable position."""

from __future__ import annotations

from sae_jax.config import Config
from sae_jax.data.source import Source


def make_source(cfg: Config) -> Source:
    """The source named by `cfg.data.source`, at its start."""
    d = cfg.data
    if d.source == "synthetic":
        from sae_jax.data.synthetic import SyntheticSource

        return SyntheticSource(d.synthetic, cfg.sae.d_in, d.batch_size, d.seed)
    if d.source == "disk":
        from sae_jax.data.disk import DiskSource

        return DiskSource(d.disk, cfg.sae.d_in, d.batch_size, d.seed)
    raise ValueError(f"data.source: unknown source {d.source!r}")


__all__ = ["Source", "make_source"]
