"""Activations stored on disk: `.npy` or `.safetensors` shards, each [T, D].

Shards are read in name order, tokens optionally shuffled within a shard by a
permutation seeded by (seed, epoch, shard), and the stream wraps around at the
end. The position is (epoch, shard, offset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from sae_jax.config import DiskConfig

SUFFIXES = (".npy", ".safetensors")


class DataError(ValueError):
    """A bad activation file: the message names the file, what was expected and what was found."""


def list_shards(path: str | Path) -> list[Path]:
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{p}: expected .npy or .safetensors shards, found none")
    for f in files:
        if f.suffix not in SUFFIXES:
            raise DataError(f"{f}: expected a .npy or .safetensors file, found suffix {f.suffix!r}")
    return files


def open_shard(file: Path, key: str, d_in: int) -> np.ndarray:
    """The shard's [T, D] array (memory-mapped for .npy), its shape and dtype checked."""
    try:
        if file.suffix == ".npy":
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        else:
            with safe_open(str(file), framework="flax") as st:
                if key not in st.keys():
                    raise DataError(f"{file}: expected tensor {key!r}, found {sorted(st.keys())}")
                arr = np.asarray(st.get_tensor(key).astype("float32"))
    except DataError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        raise DataError(
            f"{file}: unreadable activation shard ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if arr.ndim != 2 or arr.shape[1] != d_in or arr.shape[0] == 0:
        raise DataError(f"{file}: expected shape [T, {d_in}] with T > 0, found {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{file}: expected floating activations, found dtype {arr.dtype}")
    return arr


class DiskSource:
    def __init__(self, cfg: DiskConfig, d_in: int, batch_size: int, seed: int):
        self.cfg, self.d_in, self.batch_size, self.seed = cfg, d_in, batch_size, seed
        self.files = list_shards(cfg.path)
        self.lengths = [open_shard(f, cfg.key, d_in).shape[0] for f in self.files]
        self.epoch = self.shard = self.offset = 0
        self._cached: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def _current(self) -> tuple[np.ndarray, np.ndarray]:
        key = (self.epoch, self.shard)
        if self._cached is None or self._cached[0] != key:
            arr = open_shard(self.files[self.shard], self.cfg.key, self.d_in)
            n = arr.shape[0]
            order = (
                np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(n)
                if self.cfg.shuffle
                else np.arange(n)
            )
            self._cached = (key, arr, order)
        return self._cached[1], self._cached[2]

    def next_batch(self) -> np.ndarray:
        """[B, D] float32."""
        parts, need = [], self.batch_size
        while need:
            arr, order = self._current()
            take = min(need, arr.shape[0] - self.offset)
            idx = order[self.offset : self.offset + take]
            parts.append(np.asarray(arr[idx], np.float32))
            self.offset += take
            need -= take
            if self.offset == arr.shape[0]:
                self.offset, self.shard = 0, self.shard + 1
                if self.shard == len(self.files):
                    self.shard, self.epoch = 0, self.epoch + 1
        return np.concatenate(parts)

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset}

    def restore(self, state: dict) -> None:
        self.epoch, self.shard, self.offset = int(state["epoch"]), int(state["shard"]), int(state["offset"])
