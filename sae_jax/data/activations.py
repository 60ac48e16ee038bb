"""Residual activations of text, harvested by a model and shuffled across many sequences.

The token stream is cut into halves: each refill reads text batches until at
least C/2 kept tokens have been harvested. A seeded coin sends each token of
half k to round k or round k + 1; round k is the deferred tokens of half k - 1
plus the rest of half k, in a seeded random order, and batches are read off
the rounds in turn. So a batch mixes tokens from about C tokens of text;
about 3C/4 tokens are held between refills (up to ~1.5C during one); and
round k is a pure function of (seed, k, the text position where half k - 1
starts). `state()` is that position, k and the offset into round k; `restore`
re-harvests halves k - 1 and k, about C tokens, to rebuild the buffer exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from sae_jax.data.text import TextSource

# harvest(input_ids [S, T] int32, attention_mask [S, T] int32) -> activations [S, T, D]
Harvest = Callable[[np.ndarray, np.ndarray], Any]


def llama_harvest(model, layer: int, site: str = "input") -> Harvest:
    """A jitted harvest: the residual [S, T, D] of a `sae_jax.llama` model at (layer, site)."""
    import jax
    from flax import nnx

    from sae_jax.llama import residual

    graphdef, params = nnx.split(model)
    run = jax.jit(lambda params, ids, mask: residual(nnx.merge(graphdef, params), ids, layer, site, mask))
    return lambda input_ids, attention_mask: run(params, input_ids, attention_mask)


class ActivationSource:
    """A `Source` of [B, D] float32 activations of kept tokens, shuffled over a C-token buffer."""

    def __init__(
        self,
        text: TextSource,
        harvest: Harvest,
        d_in: int,
        batch_size: int,
        seed: int,
        buffer_tokens: int | None = None,
    ):
        """`buffer_tokens` (C) defaults to `text.cfg.buffer_tokens`."""
        buffer_tokens = text.cfg.buffer_tokens if buffer_tokens is None else buffer_tokens
        if buffer_tokens < 2:
            raise ValueError(f"buffer_tokens: expected >= 2, found {buffer_tokens}")
        self.text, self.harvest, self.seed = text, harvest, seed
        self.d_in, self.batch_size, self.half = d_in, batch_size, buffer_tokens // 2
        self.round, self.offset = -1, 0  # the round in `_served` (-1: none yet), tokens of it served
        self._served: np.ndarray | None = None  # [n, D] round `round` in serving order
        self._deferred = np.zeros((0, d_in), np.float32)  # [m, D] tokens of half `round` left to the next round
        self._starts: tuple = (None, None)  # text positions where halves round-1 and round start

    def next_batch(self) -> np.ndarray:
        """[B, D] float32."""
        parts, need = [], self.batch_size
        while need:
            if self._served is None or self.offset == len(self._served):
                self._build(self.round + 1)
            part = self._served[self.offset : self.offset + need]
            self.offset += len(part)
            need -= len(part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def state(self) -> dict[str, Any]:
        """{"round", "offset", "text"}: a few integers, never the buffer."""
        if self.round < 0:
            return {"round": 0, "offset": 0, "text": self.text.state()}
        if self._served is None or self.offset == len(self._served):
            return {"round": self.round + 1, "offset": 0, "text": self._starts[1]}
        return {"round": self.round, "offset": self.offset, "text": self._starts[0 if self.round else 1]}

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild round `state["round"]` by re-harvesting halves round-1 and round (about C tokens)."""
        k = int(state["round"])
        self.text.restore(state["text"])
        self._deferred, self._starts = np.zeros((0, self.d_in), np.float32), (None, None)
        if k > 0:
            self._starts = (None, self.text.state())
            half = self._harvest_half()
            self._deferred = half[~self._coins(k - 1, len(half))]
        self._build(k)
        self.offset = int(state["offset"])

    # --- internals --------------------------------------------------------------------

    def _build(self, k: int) -> None:
        """Round k from the deferred tokens of half k-1 and the next half harvested, which is half k."""
        start, self._served = self.text.state(), None  # free the spent round first
        half = self._harvest_half()
        now = self._coins(k, len(half))
        pool = np.concatenate([self._deferred, half[now]])
        np.random.default_rng([self.seed, k, 1]).shuffle(pool)  # in place: rows of [n, D]
        self._served, self._deferred, self._starts = pool, half[~now], (self._starts[1], start)
        self.round, self.offset = k, 0

    def _coins(self, k: int, n: int) -> np.ndarray:
        """[n] bool: True for tokens of half k served in round k, False for those left to round k + 1."""
        return np.random.default_rng([self.seed, k, 0]).random(n) < 0.5

    def _harvest_half(self) -> np.ndarray:
        """[n, D] float32, n >= C/2: kept-token activations of the next text batches, in text order."""
        chunks, total, pending = [], 0, None
        while total < self.half:
            batch = self.text.next_batch()
            total += int(batch.keep.sum())  # the half's extent depends on the text only
            out = self.harvest(batch.input_ids, batch.attention_mask)  # async under JAX: overlaps the next tokenizing
            if pending is not None:
                chunks.append(self._gather(*pending))
            pending = (out, batch.keep)
        chunks.append(self._gather(*pending))
        return np.concatenate(chunks)

    def _gather(self, acts, keep: np.ndarray) -> np.ndarray:
        acts = np.asarray(acts)
        if acts.shape != (*keep.shape, self.d_in):
            raise ValueError(
                f"harvest: expected activations of shape {[*keep.shape, self.d_in]}, found {list(acts.shape)}"
            )
        return acts[keep].astype(np.float32, copy=False)
