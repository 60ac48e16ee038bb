"""Read or replace the residual stream at one site and run the rest of the model.

A site is a (layer, "input" | "output") pair; `site_index` turns it into the
number of layers run before it, so the input of layer L and the output of
layer L-1 are the same index L. An `Edit` replaces the residual there with
`fn(params, x)`; `fn` and the site are static under jit, `params` is traced,
so a new alpha or feature reuses the compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from sae_jax.llama.model import Llama, layers_needed, positions_and_mask

site_index = layers_needed  # (cfg, layer, site) -> layers run before the site, 0..num_layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace the residual x [B, T, D] at (layer, site) with fn(params, x) [B, T, D], at every position."""

    params: Any  # a pytree, traced under jit
    layer: int = dataclasses.field(metadata=dict(static=True))
    site: str = dataclasses.field(metadata=dict(static=True))
    fn: Callable[[Any, jax.Array], jax.Array] = dataclasses.field(metadata=dict(static=True))

    def index(self, model: Llama) -> int:
        return site_index(model.config, self.layer, self.site)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(self.params, x).astype(x.dtype)


def run_layers(model: Llama, x: jax.Array, positions: jax.Array, mask: jax.Array, start: int, stop: int | None = None) -> jax.Array:
    """x: [B, T, D] residual after `start` layers -> [B, T, D] after `stop` (all when None); no cache."""
    for block in model.layers[start : model.config.num_layers if stop is None else stop]:
        x = block(x, positions, mask)
    return x


def head(model: Llama, x: jax.Array) -> jax.Array:
    """x: [B, T, D] the last layer's output -> logits [B, T, V] float32 (final norm, then unembed)."""
    return model.unembed(model.norm(x))


def residuals(model: Llama, input_ids, indices: Sequence[int], attention_mask=None, positions=None) -> dict[int, jax.Array]:
    """{i: [B, T, D] residual after i layers} for each i in `indices` (0..num_layers), in one pass."""
    positions, mask = positions_and_mask(input_ids, attention_mask, positions)
    want = sorted(set(int(i) for i in indices))
    if want and not 0 <= want[0] <= want[-1] <= model.config.num_layers:
        raise ValueError(f"indices: expected 0..{model.config.num_layers}, found {want}")
    x, out, done = model.embed_tokens(input_ids), {}, 0
    for i in want:
        x, done = run_layers(model, x, positions, mask, done, i), i
        out[i] = x
    return out


def logits_from(model: Llama, x: jax.Array, layer: int, site: str, attention_mask=None, positions=None) -> jax.Array:
    """x: [B, T, D] a residual at (layer, site) -> logits [B, T, V] float32 of the rest of the model on it."""
    positions, mask = positions_and_mask(jnp.zeros(x.shape[:2], jnp.int32), attention_mask, positions)
    return head(model, run_layers(model, x, positions, mask, site_index(model.config, layer, site)))


def logits_with_edit(model: Llama, input_ids, edit: Edit | None, attention_mask=None, positions=None) -> jax.Array:
    """input_ids: [B, T] -> logits [B, T, V] float32 with `edit` applied at its site (plain logits when None)."""
    positions, mask = positions_and_mask(input_ids, attention_mask, positions)
    x = model.embed_tokens(input_ids)
    if edit is None:
        return head(model, run_layers(model, x, positions, mask, 0))
    at = edit.index(model)
    x = edit(run_layers(model, x, positions, mask, 0, at))
    return head(model, run_layers(model, x, positions, mask, at))
