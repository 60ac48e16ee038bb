"""Training checkpoints through orbax's CheckpointManager.

A checkpoint holds the TrainState pytree (params, optimizer state, step, RNG
key, dead-latent counters) and a JSON `meta` (the data source's position and
the input scale). Orbax writes each step to a temporary directory and renames
it on success, so a crash mid-write leaves no checkpoint that looks complete;
the temporary directories a crash leaves are removed when the next run opens
the directory. `meta` also carries a fingerprint of the state and of itself:
orbax checksums its array files, but nothing checks that `meta` (plain JSON)
or the tree read back is what was saved. A checkpoint that fails to read or to
match its fingerprint is named in a warning, renamed `<step>.unreadable` (out
of orbax's sight, so the step can be saved again) and the one before is tried.

With several processes every one saves and restores (each its own shards);
they agree on each checkpoint: one any process cannot read is set aside by
all, renamed by process 0 alone, and every process then tries the same one
before it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sae_jax.errors import cause, first_line
from sae_jax.sharding import to_host

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint"
UNREADABLE = ".unreadable"
BARRIERS = "sae_jax"  # orbax names its barriers f"{BARRIERS}_{name}"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable one could be read."""


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int, leaf_bytes: int | None = None):
        """`leaf_bytes`: the state's largest leaf in bytes; saves then write one such leaf at a time
        (`one_leaf_at_a_time`), else every leaf at once."""
        self.directory = Path(directory).absolute()
        self._pending: int | None = None  # the step of the save that may still be in flight
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=BARRIERS),
        )
        if self.directory.exists() and not self.directory.is_dir():  # orbax would fail only at the first save
            raise CheckpointError(f"{self.directory}: expected a checkpoint directory, found a file")
        # The state's own handler; meta's is orbax's default (registered at the first save).
        state = ocp.StandardCheckpointHandler(**one_leaf_at_a_time(leaf_bytes)) if leaf_bytes else None
        registry = ocp.handlers.create_default_handler_registry(state=state) if state else None
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        except Exception as e:  # orbax raises what the file system says, wrapped or not
            raise CheckpointError(f"{self.directory}: cannot open the checkpoint directory ({cause(e)})") from None

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an async save of `state` and `meta` at `step`; returns once the arrays are copied off.

        A failure of the previous save surfaces here (or in `wait`) as a CheckpointError.
        """
        meta = {**meta, FINGERPRINT: fingerprint(state, meta)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.wait()
        self._pending = step
        with self._failure(step):
            self.manager.save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, or None if there is none.

        A checkpoint that fails to read or to match its fingerprint is named in a
        warning, set aside as `<step>.unreadable`, and the one before is tried.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            error, restored = None, None
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
                restored = self.manager.restore(step, args=args)
            except Exception as e:  # orbax and tensorstore raise many types for damaged files
                error = e
                _meet_restore_barrier()
            if _everywhere(error is None):  # each process read its own shards; the check below is collective
                try:
                    meta = _checked(restored.state, restored.meta, abstract_state)
                except Exception as e:
                    error = e
                if _everywhere(error is None):
                    return step, restored.state, meta
            path = self.directory / str(step)
            why = first_line(error) if error is not None else "another process could not read it"
            aside = self._set_aside(path)
            log.warning("checkpoint %s is unreadable (%s); moved to %s, trying the one before", path, why, aside.name)
        return None

    def _set_aside(self, path: Path) -> Path:
        """Rename `path` to `<step>.unreadable` (on process 0 of several; the others wait) and reload the step list."""
        aside = path.with_name(path.name + UNREADABLE)
        if jax.process_index() == 0:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        ocp.multihost.sync_global_processes(f"{BARRIERS}_set_aside_{path.name}")
        self.manager.reload()
        return aside

    def wait(self) -> None:
        """Block until the save in flight is on disk; CheckpointError if it failed."""
        with self._failure(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    @contextlib.contextmanager
    def _failure(self, step: int | None):
        try:
            yield
        except Exception as e:  # tensorstore reports I/O errors as ValueError, orbax adds its own types
            self._pending = None
            where = self.directory / str(step) if step is not None else self.directory
            raise CheckpointError(
                f"checkpoint {where} could not be written ({cause(e)}); "
                "the checkpoints before it are kept, rerun to resume"
            ) from None

    def close(self) -> None:
        self.manager.close()


def one_leaf_at_a_time(leaf_bytes: int) -> dict:
    """StandardCheckpointHandler's options that let one leaf of `leaf_bytes` (the largest) be written at a time.

    Orbax starts every leaf's write at once by default, and what the writes in flight hold adds to the peak
    (a release-size state's save, 2-core CPU, kept allocator of sae_jax/malloc.py: +0.22 GB over the state
    at once, +0.00 GB a leaf at a time; with the system allocator +0.5 GB either way). Its byte limit (orbax
    0.12: `save_concurrent_gb`, times 1e9 bytes) admits a leaf while the bytes in flight are under it and
    refuses a leaf of the limit or more, so the largest leaf plus 1 MB lets that leaf in alone and small leaves
    beside it.
    """
    return dict(save_concurrent_gb=(leaf_bytes + 2**20) / 1e9)


def largest_leaf_bytes(tree: Any) -> int:
    """The bytes of the largest array in `tree` (arrays or ShapeDtypeStructs)."""
    return max((int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)), default=0)


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective with several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _meet_restore_barrier() -> None:
    """After a failed `manager.restore`, wait at the barrier that ends orbax's restore.

    A read can fail on one process only (a damaged shard only it reads) while
    the others finished theirs and wait at that barrier (f"{BARRIERS}_Checkpointer:restore"
    in orbax 0.12); a failure on every process meets there too, so each
    process passes it once per attempt whatever happened.
    """
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"{BARRIERS}_Checkpointer:restore")


def fingerprint(state: Any, meta: dict) -> str:
    """Hex digest of every bit of `state` (reduced on its device) and of `meta` as canonical JSON."""
    sums = np.asarray(to_host(_state_sums(jax.tree.leaves(state))), np.uint32)
    text = json.dumps({k: v for k, v in meta.items() if k != FINGERPRINT}, sort_keys=True)
    return hashlib.sha256(sums.tobytes() + text.encode()).hexdigest()


# Elements per block of `_state_sums`: each block's words, weights and products are its only temporaries
# (a few times 4 MB), where whole leaves took 8 bytes per word (3.2 GB for a release-size state of 1.6 GB).
SUM_BLOCK = 1 << 20


@functools.partial(jax.jit, static_argnames="block")
def _state_sums(leaves: list[jax.Array], block: int = SUM_BLOCK) -> jax.Array:
    """[2 * leaves] uint32: two position-weighted sums of each leaf's bits (wrapping), `block` elements at a time.

    Word i of a leaf's bits (`_bits`, raveled) is weighted 2i + 1 in the first sum, and (i * 0x9E3779B1) | 1 in
    the second, which sums u ^ (u >> 16). The weights are odd, so changing any one word always changes the
    first sum. Wrapping sums do not depend on the order of the terms, so the blocks give the sums of the whole.
    """
    out = []
    for a in leaves:
        out.extend(_leaf_sums(_flat(a), block))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def _leaf_sums(flat: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """flat: [S] one leaf's elements -> its two uint32 sums, `block` elements at a time."""
    size = flat.shape[0]
    if size <= block:
        return _block_sums(flat, jnp.uint32(0))

    def body(b, sums):
        # The last block starts early enough to stay inside the leaf and leaves out what was summed already.
        start = jnp.minimum(b * block, size - block)
        part = jax.lax.dynamic_slice_in_dim(flat, start, block)
        s1, s2 = _block_sums(part, start.astype(jnp.uint32), skip=b * block - start)
        return sums[0] + s1, sums[1] + s2

    return jax.lax.fori_loop(0, -(-size // block), body, (jnp.uint32(0), jnp.uint32(0)))


def _block_sums(part: jax.Array, start: jax.Array, skip: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """part: [b] a leaf's elements from element `start` ([] uint32) on -> the two sums of their words,
    the first `skip` elements left out."""
    u = _bits(part)
    per = u.size // part.shape[0]  # words per element: 2 for 8-byte elements, else 1
    u = u.ravel()
    j = jnp.arange(u.size, dtype=jnp.uint32)
    if not isinstance(skip, int):
        u = jnp.where(j >= skip.astype(jnp.uint32) * per, u, 0)  # a zero word adds nothing to either sum
    i = start * jnp.uint32(per) + j
    s1 = jnp.sum(u * (2 * i + 1), dtype=jnp.uint32)
    s2 = jnp.sum((u ^ (u >> 16)) * (i * jnp.uint32(0x9E3779B1) | 1), dtype=jnp.uint32)
    return s1, s2


def _flat(a: jax.Array) -> jax.Array:
    """A leaf as a 1-D array of its elements (a PRNG key as its raw data)."""
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return a.ravel()


def _bits(a: jax.Array) -> jax.Array:
    """The raw bits of `a` as uint32, one word per element (two for an 8-byte element, in a last axis)."""
    if a.dtype == jnp.bool_:
        return a.astype(jnp.uint32)
    size = jnp.dtype(a.dtype).itemsize
    if size >= 4:  # an 8-byte element becomes two words
        return jax.lax.bitcast_convert_type(a, jnp.uint32)
    return jax.lax.bitcast_convert_type(a, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _checked(state: Any, meta: Any, abstract: Any) -> dict:
    """`meta` without its fingerprint, once shapes, dtypes and the fingerprint match."""
    got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), state)
    want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract)
    if got != want:
        raise CheckpointError("restored state does not match the config's shapes")
    if not isinstance(meta, dict) or FINGERPRINT not in meta:
        raise CheckpointError(f"meta: expected a JSON object with a {FINGERPRINT!r}, found {str(meta)[:80]}")
    meta = dict(meta)
    stored = meta.pop(FINGERPRINT)
    if fingerprint(state, meta) != stored:
        raise CheckpointError("state or meta differs from what was saved (fingerprint mismatch)")
    return meta
