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
    if d.source == "llama":
        return llama_source(cfg)
    raise ValueError(f"data.source: unknown source {d.source!r}")


def llama_source(cfg: Config) -> Source:
    """Text from `data.text` through the Llama at `data.model`, read at the SAE's hook site."""
    from sae_jax import llama
    from sae_jax.config import ConfigError
    from sae_jax.data.activations import ActivationSource, llama_harvest
    from sae_jax.data.text import TextSource

    d, s = cfg.data, cfg.sae
    model = llama.load(d.model.path, dtype=d.model.dtype)
    hidden, layers = model.config.hidden_size, model.config.num_layers
    if s.d_in != hidden:
        raise ConfigError(f"sae.d_in: expected the hidden size of {d.model.path}, {hidden}, found {s.d_in}")
    if not 0 <= s.hook_layer < layers:
        raise ConfigError(
            f"sae.hook_layer: expected 0 <= layer < {layers} (the layers of {d.model.path}), found {s.hook_layer}"
        )
    harvest = llama_harvest(model, s.hook_layer, s.hook_site)
    return ActivationSource(TextSource(d.text), harvest, s.d_in, d.batch_size, d.seed)


__all__ = ["Source", "make_source", "llama_source"]
