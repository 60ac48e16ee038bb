"""Training checkpoints through orbax's CheckpointManager.

A checkpoint holds the TrainState pytree (params, optimizer state, step, RNG
key, dead-latent counters) and a JSON `meta` (the data source's position and
the input scale). Orbax writes each step to a temporary directory and renames
it on success, so a crash mid-write leaves no checkpoint that looks complete;
one that is damaged anyway is skipped with a warning at restore.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable one could be read."""


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an async save of `state` and `meta` at `step`; returns once the arrays are copied off."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, or None if there is none.

        A checkpoint that fails to read is named in a warning and the one before it is tried.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
                restored = self.manager.restore(step, args=args)
                _check_like(restored.state, abstract_state)
                return step, restored.state, dict(restored.meta)
            except Exception as e:  # orbax and tensorstore raise many types for damaged files
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("checkpoint %s is unreadable (%s: %s); trying the one before", self.directory / str(step), type(e).__name__, first[:200])
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _check_like(state: Any, abstract: Any) -> None:
    got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), state)
    want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract)
    if got != want:
        raise CheckpointError("restored state does not match the config's shapes")
