"""Llama-3 in Flax NNX and its one forward, `run_layers`: layers [start, stop) with an optional edit and cache.

A site is a (layer, "input" | "output") pair; `site_index` turns it into the
number of layers run before it, so the input of layer L and the output of layer
L-1 are the same residual, index L. An `Edit` replaces the residual at its site
with `fn(params, x)`; `fn` and the site are static under jit, `params` is
traced, so a new alpha or feature reuses the compiled step. Residual reads,
logits, evaluation splicing, steering and cached generation all run
`run_layers`, so a read at layer 9 runs layers 0..8 and no others.

Shapes: `B` batch, `T` tokens, `S` cache slots, `D` width, `KV` key/value
heads, `H` head dim, `V` vocab, `L` layers.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sae_jax.llama.config import LlamaConfig, dtype_name
from sae_jax.llama.layers import Block, LayerCache, RMSNorm, random_weight
from sae_jax.sae import SITES

COMPUTE_DTYPES = ("float32", "bfloat16")
PARAM_DTYPES = ("float32", "bfloat16", "float16")


class Llama(nnx.Module):
    """The decoder. `load` builds one from a HF folder; the constructor gives random weights (zeros with rngs=None).

    dtype: the compute dtype; param_dtype: the random weights' dtype (`load` keeps the file's).
    Either may be a string, a numpy or a JAX dtype.
    """

    def __init__(self, cfg: LlamaConfig, *, dtype="float32", param_dtype="bfloat16", rngs: nnx.Rngs | None):
        dt = jnp.dtype(dtype_name(dtype, COMPUTE_DTYPES))
        pdt = jnp.dtype(dtype_name(param_dtype, PARAM_DTYPES, "param_dtype"))
        kw = dict(dtype=dt, param_dtype=pdt)
        self.config = cfg
        self.dtype = dt  # compute dtype; weights stay in their own dtype
        self.embed = random_weight(rngs, (cfg.vocab_size, cfg.hidden_size), pdt)  # [V, D]
        self.layers = nnx.List([Block(cfg, **kw, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        untied = not cfg.tie_word_embeddings
        self.lm_head = random_weight(rngs, (cfg.vocab_size, cfg.hidden_size), pdt) if untied else None

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, T] int -> [B, T, D], the residual entering layer 0."""
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)

    def head(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] the last layer's output -> logits [B, T, V] float32: final norm, then the unembedding."""
        w = self.embed if self.lm_head is None else self.lm_head  # tied: the embedding, as the checkpoint says
        return jnp.einsum("btd,vd->btv", self.norm(x), w[...].astype(self.dtype), preferred_element_type=jnp.float32)


def site_index(cfg: LlamaConfig, layer: int, site: str) -> int:
    """The layers run before the residual at (layer, site), 0..L; a bad request is a one-line ValueError."""
    if site not in SITES:
        raise ValueError(f"site: expected one of {SITES}, found {site!r}")
    if not (isinstance(layer, numbers.Integral) and 0 <= layer < cfg.num_layers):
        n = cfg.num_layers
        raise ValueError(f"layer: expected 0 <= layer <= {n - 1} (the model has {n} layers), found {layer!r}")
    return int(layer) if site == "input" else int(layer) + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace the residual x [B, T, D] at (layer, site) with fn(params, x) [B, T, D], at every position."""

    params: Any  # a pytree, traced under jit
    layer: int = dataclasses.field(metadata=dict(static=True))
    site: str = dataclasses.field(metadata=dict(static=True))
    fn: Callable[[Any, jax.Array], jax.Array] = dataclasses.field(metadata=dict(static=True))

    def index(self, cfg: LlamaConfig) -> int:
        return site_index(cfg, self.layer, self.site)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(self.params, x).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's keys and values over S slots per row; `run_layers` fills T slots from `index` on."""

    k: tuple[jax.Array, ...]  # per layer [B, S, KV, H], rotated keys
    v: tuple[jax.Array, ...]  # per layer [B, S, KV, H]
    valid: jax.Array  # [B, S] bool: the slot holds a real (not pad) token
    index: jax.Array  # [] int32: slots filled so far; the next write starts here

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, size: int, dtype) -> KVCache:
        """A cache of `size` slots per row, none filled."""
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # distinct buffers: donated
        return cls(zeros(), zeros(), jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))

    def admit(self, token_mask: jax.Array) -> tuple[KVCache, jax.Array]:
        """token_mask: [B, T] bool (False on pads) -> (this cache with the T new slots marked, mask [B, T, S]).

        The new tokens take slots index..index+T-1; slot s is attended by the
        new token in slot t when s <= t and slot s holds a real token.
        """
        T, S = token_mask.shape[1], self.valid.shape[1]
        valid = jax.lax.dynamic_update_slice_in_dim(self.valid, token_mask, self.index, axis=1)
        slots = self.index + jnp.arange(T)
        mask = (jnp.arange(S)[None, :] <= slots[:, None])[None] & valid[:, None, :]
        return dataclasses.replace(self, valid=valid), mask

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.index)


def run_layers(
    model: Llama,
    x: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    start: int = 0,
    stop: int | None = None,
    *,
    edit: Edit | None = None,
    cache: KVCache | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """x: [B, T, D] the residual after `start` layers -> (the residual after `stop` (all when None), cache).

    Layers outside [start, stop) are never called, so they cost nothing.
    `edit` replaces the residual at its site, which must lie in [start, stop].
    positions: [B, T]; mask: [B|1, T, S] bool (`positions_and_mask`, or
    `KVCache.admit` with a cache). With `cache`, each layer writes its keys and
    values into it and attends over its slots; the cache comes back with them
    and its index advanced by T.
    """
    stop = model.config.num_layers if stop is None else stop
    at = None if edit is None else edit.index(model.config)
    if at is not None and not start <= at <= stop:
        raise ValueError(f"edit: expected a site in residuals {start}..{stop} (the layers run), found {at}")
    k, v = (list(cache.k), list(cache.v)) if cache is not None else ([], [])
    for i in range(start, stop):
        if i == at:
            x = edit(x)
        x, layer_cache = model.layers[i](x, positions, mask, None if cache is None else cache.layer(i))
        if cache is not None:
            k[i], v[i] = layer_cache.k, layer_cache.v
    if stop == at:
        x = edit(x)
    if cache is not None:
        cache = dataclasses.replace(cache, k=tuple(k), v=tuple(v), index=cache.index + x.shape[1])
    return x, cache


def positions_and_mask(shape: tuple[int, int], attention_mask=None, positions=None) -> tuple[jax.Array, jax.Array]:
    """(positions [B, T], mask [B|1, T, T] bool) for a forward of `shape` (B, T) tokens without a cache.

    The causal mask is built for the T tokens at hand only. `attention_mask`
    [B, T] (1 real, 0 pad; left or right padding) hides pad keys. Default
    positions are 0..T-1 in every row, pads included, exactly as transformers 5's
    LlamaModel numbers them when given an attention_mask and no position_ids.
    """
    B, T = shape
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask: expected shape {[B, T]}, found {list(attention_mask.shape)}")
        mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, :]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    elif tuple(positions.shape) != (B, T):
        raise ValueError(f"positions: expected shape {[B, T]}, found {list(positions.shape)}")
    return jnp.asarray(positions), mask


def _embed(model: Llama, input_ids, attention_mask, positions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(the residual entering layer 0 [B, T, D], positions [B, T], mask [B|1, T, T]) of input_ids [B, T]."""
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [B, T], found {list(ids.shape)}")
    return model.embed_tokens(ids), *positions_and_mask(ids.shape, attention_mask, positions)


def residual(
    model: Llama, input_ids, layer: int, site: str = "input", attention_mask=None, positions=None
) -> jax.Array:
    """The residual stream at decoder layer `layer`: [B, T, D] in the compute dtype.

    site "input": entering the layer (transformers' hidden_states[layer]; runs
    layers 0..layer-1). site "output": leaving it, before any final norm (runs
    layers 0..layer). input_ids: [B, T] int; attention_mask: [B, T] of 0/1;
    positions: [B, T], default 0..T-1. Under jit, pass layer and site as static.
    """
    x, positions, mask = _embed(model, input_ids, attention_mask, positions)
    return run_layers(model, x, positions, mask, 0, site_index(model.config, layer, site))[0]


def residuals(
    model: Llama, input_ids, indices: Sequence[int], attention_mask=None, positions=None
) -> dict[int, jax.Array]:
    """{i: [B, T, D] residual after i layers} for each i in `indices` (0..L), in one pass up to the largest."""
    want = sorted(set(int(i) for i in indices))
    if want and not 0 <= want[0] <= want[-1] <= model.config.num_layers:
        raise ValueError(f"indices: expected 0..{model.config.num_layers}, found {want}")
    x, positions, mask = _embed(model, input_ids, attention_mask, positions)
    out, done = {}, 0
    for i in want:
        (x, _), done = run_layers(model, x, positions, mask, done, i), i
        out[i] = x
    return out


def logits(model: Llama, input_ids, attention_mask=None, positions=None, *, edit: Edit | None = None) -> jax.Array:
    """input_ids: [B, T] -> next-token logits [B, T, V] float32, with `edit` applied at its site when given."""
    x, positions, mask = _embed(model, input_ids, attention_mask, positions)
    return model.head(run_layers(model, x, positions, mask, edit=edit)[0])


def logits_from(
    model: Llama, x: jax.Array, layer: int, site: str, attention_mask=None, positions=None, *, edit: Edit | None = None
) -> jax.Array:
    """x: [B, T, D] a residual at (layer, site) -> logits [B, T, V] float32 of the rest of the model on it.

    `edit` applies at its site, which must be (layer, site) or later.
    """
    positions, mask = positions_and_mask(x.shape[:2], attention_mask, positions)
    return model.head(run_layers(model, x, positions, mask, site_index(model.config, layer, site), edit=edit)[0])
