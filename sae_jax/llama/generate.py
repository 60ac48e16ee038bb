"""Greedy generation with a fixed-size KV cache, optionally with an `Edit` at one site.

    tokens = generate(model, input_ids, 40)                       # [B, <=40] new token ids
    tokens = generate(model, input_ids, 40, edit=steering_edit(sae, 123, 8.0))

The prompt is run once (prefill), then one token per jitted decode step. The
cache holds S slots for every layer, S = prompt + new tokens rounded up to
`CACHE_MULTIPLE`, so the decode step compiles once per (B, S) and never grows.
Rows may be left-padded: positions are counted over real tokens only
(`cumsum(attention_mask) - 1`, as transformers' `generate` does) and pad slots
are never attended, so a padded row generates what it would alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.llama.model import Edit, KVCache, Llama, logits, run_layers

CACHE_MULTIPLE = 128  # cache sizes are rounded up to this, so prompts of similar length share one decode compile


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _step(graphdef, state, input_ids, positions, token_mask, cache: KVCache, edit: Edit | None):
    """T new tokens against the cache -> (greedy next token [B] int32, the cache holding their keys and values).

    input_ids, positions: [B, T]; token_mask: [B, T] bool (False on pads).
    """
    model = nnx.merge(graphdef, state)
    cache, mask = cache.admit(token_mask)
    x, cache = run_layers(model, model.embed_tokens(input_ids), positions, mask, edit=edit, cache=cache)
    return jnp.argmax(model.head(x[:, -1:])[:, 0], axis=-1).astype(jnp.int32), cache


def cache_size(n: int, multiple: int = CACHE_MULTIPLE) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def generate(
    model: Llama,
    input_ids,
    max_new_tokens: int,
    *,
    attention_mask=None,
    edit: Edit | None = None,
    eos_ids: Sequence[int] = (),
    pad_id: int | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    """Greedy continuation of input_ids [B, T] -> new tokens [B, n] int32, n <= max_new_tokens.

    attention_mask: [B, T] 0/1, left padding only. A row stops at its first
    token in `eos_ids` (kept) and is filled with `pad_id` (default eos_ids[0])
    after; generation ends when every row has stopped. `use_cache=False`
    recomputes the full logits every step (the reference the cache is tested against).
    """
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected shape [B, T] with T >= 1, found {list(ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, found {max_new_tokens}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask: expected shape {list(ids.shape)}, found {list(mask.shape)}")
    if not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
        raise ValueError("attention_mask: expected left padding (each row's pads before its tokens, last token real)")
    eos = np.asarray(list(eos_ids), np.int32)
    pad = int(pad_id if pad_id is not None else (eos[0] if eos.size else 0))
    step = (
        _cached_steps(model, ids, mask, edit, max_new_tokens)
        if use_cache
        else _uncached_steps(model, ids, mask, edit, max_new_tokens)
    )
    out, done = [], np.zeros(ids.shape[0], bool)
    for _ in range(max_new_tokens):
        tok = np.where(done, pad, next(step))
        out.append(tok)
        done |= np.isin(tok, eos)
        if done.all():
            break
    step.close()
    return np.stack(out, axis=1).astype(np.int32)


def _positions(mask: np.ndarray) -> np.ndarray:
    """[B, T] positions over real tokens only (pads get 0), as transformers' generate numbers them."""
    return np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def _cached_steps(model: Llama, ids: np.ndarray, mask: np.ndarray, edit: Edit | None, max_new_tokens: int):
    """Yield greedy tokens [B]: prefill, then one jitted decode step per token."""
    graphdef, state = nnx.split(model)
    B, T = ids.shape
    cache = KVCache.empty(model.config, B, cache_size(T + max_new_tokens), model.dtype)
    prompt_positions, prompt_real = jnp.asarray(_positions(mask)), jnp.asarray(mask > 0)
    tok, cache = _step(graphdef, state, jnp.asarray(ids), prompt_positions, prompt_real, cache, edit)
    pos = jnp.asarray(mask.sum(axis=1, keepdims=True), jnp.int32)  # [B, 1] the next position of each row
    real = jnp.ones((B, 1), bool)
    while True:
        yield np.asarray(tok)
        tok, cache = _step(graphdef, state, tok[:, None], pos, real, cache, edit)
        pos = pos + 1


@functools.partial(jax.jit, static_argnums=0)
def _full_step(graphdef, state, input_ids, attention_mask, positions, edit, last):
    """Greedy token [B] int32 at position `last` from the full logits of input_ids [B, T]."""
    out = logits(nnx.merge(graphdef, state), input_ids, attention_mask, positions, edit=edit)
    return jnp.argmax(out[:, last], axis=-1).astype(jnp.int32)


def _uncached_steps(model: Llama, ids: np.ndarray, mask: np.ndarray, edit: Edit | None, max_new_tokens: int):
    """Yield greedy tokens [B], each from the full logits of the whole sequence so far, no cache.

    The sequence sits in a buffer of T + max_new_tokens right-padded slots; causal
    attention keeps the pads from touching earlier positions, and one compile serves every step.
    """
    graphdef, state = nnx.split(model)
    B, T = ids.shape
    ids = np.concatenate([ids, np.zeros((B, max_new_tokens), np.int32)], 1)
    mask = np.concatenate([mask, np.zeros((B, max_new_tokens), np.int32)], 1)
    for last in range(T - 1, T - 1 + max_new_tokens):
        tok = np.asarray(
            _full_step(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(_positions(mask)), edit, last)
        )
        yield tok
        if last + 1 < ids.shape[1]:
            ids[:, last + 1], mask[:, last + 1] = tok, 1
