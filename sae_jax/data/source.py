"""The one interface every activation source implements."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Source(Protocol):
    """An endless stream of activation batches.

    `state()` is a small JSON-serialisable dict; a fresh source built from the
    same config and given `restore(state)` yields exactly the batches the
    original would have yielded next. The trainer saves it in every checkpoint.
    """

    d_in: int  # D
    batch_size: int  # B

    def next_batch(self) -> np.ndarray:
        """The next batch: [B, D] float32, host memory."""
        ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...
