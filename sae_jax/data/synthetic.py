"""Synthetic ground truth: sparse non-negative mixtures of a known dictionary.

x = c @ F + noise, with F [n_features, D] random unit directions and c [B,
n_features] Bernoulli(active / n_features) masks times Uniform(0.5, 1.5)
magnitudes. A trained SAE is scored by how many rows of F its decoder finds.
"""

from __future__ import annotations

import numpy as np

from sae_jax.config import SyntheticConfig


def true_dictionary(cfg: SyntheticConfig, d_in: int) -> np.ndarray:
    """[n_features, D] float32 unit rows, fixed by `cfg.dict_seed`."""
    F = np.random.default_rng(cfg.dict_seed).standard_normal((cfg.n_features, d_in))
    return (F / np.linalg.norm(F, axis=1, keepdims=True)).astype(np.float32)


class SyntheticSource:
    """Batch i is a pure function of (seed, i), so the position is one integer."""

    def __init__(self, cfg: SyntheticConfig, d_in: int, batch_size: int, seed: int):
        self.cfg, self.d_in, self.batch_size, self.seed = cfg, d_in, batch_size, seed
        self.dictionary = true_dictionary(cfg, d_in)
        self.index = 0

    def next_batch(self) -> np.ndarray:
        """[B, D] float32."""
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        B, n = self.batch_size, self.cfg.n_features
        on = rng.random((B, n), dtype=np.float32) < self.cfg.active / n
        mags = rng.uniform(0.5, 1.5, (B, n)).astype(np.float32)
        x = (on * mags) @ self.dictionary
        return x + self.cfg.noise * rng.standard_normal((B, self.d_in), dtype=np.float32)

    def state(self) -> dict:
        return {"index": self.index}

    def restore(self, state: dict) -> None:
        self.index = int(state["index"])


def recovered_fraction(dictionary: np.ndarray, W_dec: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of true directions [n, D] whose best-matching decoder row [N, D] has cosine >= threshold."""
    rows = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    best = (dictionary @ rows.T).max(axis=1)
    return float(np.mean(best >= threshold))
