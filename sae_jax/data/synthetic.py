"""Synthetic ground truth: sparse non-negative mixtures of a known dictionary.

x = c @ F + noise, with F [n_features, D] random unit directions and c [B,
n_features] firing masks times magnitudes. By default each feature fires
independently with probability active / n_features and magnitude
Uniform(0.5, 1.5). `data.synthetic` adds what a model's residual stream has:
Zipf-like firing frequencies, correlated features, hierarchies (a child fires
only with its parent), varied magnitudes, and far more features than D.
A trained SAE is scored against F by `sae_jax.groundtruth`.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from sae_jax.config import SyntheticConfig


def true_dictionary(cfg: SyntheticConfig, d_in: int) -> np.ndarray:
    """[n_features, D] float32 unit rows, fixed by `cfg.dict_seed`."""
    F = np.random.default_rng(cfg.dict_seed).standard_normal((cfg.n_features, d_in))
    return (F / np.linalg.norm(F, axis=1, keepdims=True)).astype(np.float32)


def is_plain(cfg: SyntheticConfig) -> bool:
    """No realistic option set: the original generator, batch for batch."""
    return not (cfg.zipf_exponent or cfg.correlation or cfg.hierarchy_parents or cfg.magnitude_spread)


def parents(cfg: SyntheticConfig) -> np.ndarray:
    """[n_features] int: each child's parent feature, -1 for features without one."""
    P, C = cfg.hierarchy_parents, cfg.hierarchy_children
    out = np.full(cfg.n_features, -1)
    out[P : P + P * C] = np.repeat(np.arange(P), C)
    return out


def firing_probs(cfg: SyntheticConfig) -> np.ndarray:
    """[n_features] float64: each feature's probability of firing on a token, `active` of them on average.

    A feature without a parent fires with min(1, g (i + 1)^-a); a child with its parent's probability times
    hierarchy_child_prob; g is found by bisection (the expected count grows with it).
    """
    w = (np.arange(cfg.n_features) + 1.0) ** -cfg.zipf_exponent
    up = parents(cfg)
    child = up >= 0

    def probs(g):
        p = np.minimum(1.0, g * w)
        p[child] = p[up[child]] * cfg.hierarchy_child_prob
        return p

    lo, hi = 0.0, cfg.active / w.min()
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if probs(mid).sum() < cfg.active else (lo, mid)
    return probs(hi)


def typical_magnitudes(cfg: SyntheticConfig) -> np.ndarray:
    """[n_features] float32: exp(N(0, spread^2)), fixed by dict_seed."""
    r = np.random.default_rng([cfg.dict_seed, 1])
    return np.exp(cfg.magnitude_spread * r.standard_normal(cfg.n_features)).astype(np.float32)


def mix(c: np.ndarray, dictionary: np.ndarray) -> np.ndarray:
    """c: [B, n] codes, dictionary: [n, D] -> c @ dictionary [B, D] float32, from each token's nonzero codes only.

    Each token's sum runs over its nonzero codes in index order, as np.einsum("bn,nd->bd") sums all n of them
    (a zero code adds an exact zero): the same bits (tests/test_groundtruth.py), without einsum's O(B n D) work
    on codes that are mostly zero (D = 2048, B = 256, 8 of 512 active: 9-15 against 50 ms a batch, one core).
    einsum, not @: a product this small is slower through multithreaded BLAS on a busy CPU.
    """
    rows, cols = np.nonzero(c)  # row-major: each token's nonzero codes together, in index order
    counts = np.bincount(rows, minlength=c.shape[0])
    rank = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]  # each code's place among its token's
    x = np.zeros((c.shape[0], dictionary.shape[1]), np.float32)
    for k in range(int(counts.max(initial=0))):
        at = rank == k
        r, j = rows[at], cols[at]
        x[r] += c[r, j, None] * dictionary[j]
    return x


class SyntheticSource:
    """Batch i is a pure function of (seed, i), so the position is one integer."""

    def __init__(self, cfg: SyntheticConfig, d_in: int, batch_size: int, seed: int):
        self.cfg, self.d_in, self.batch_size, self.seed = cfg, d_in, batch_size, seed
        self.dictionary = true_dictionary(cfg, d_in)
        self.index = 0
        if not is_plain(cfg):
            self.probs, self.parents, self.scales = firing_probs(cfg), parents(cfg), typical_magnitudes(cfg)
            self.cut = np.array([NormalDist().inv_cdf(min(max(q, 1e-12), 1 - 1e-12)) for q in self.probs], np.float32)

    def next_batch(self) -> np.ndarray:
        """[B, D] float32."""
        x, _ = self.batch(self.index)
        self.index += 1
        return x

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index`: (x [B, D] float32, true codes c [B, n_features] float32)."""
        rng = np.random.default_rng([self.seed, index])
        B, n = self.batch_size, self.cfg.n_features
        if is_plain(self.cfg):
            on = rng.random((B, n), dtype=np.float32) < self.cfg.active / n
            c = on * rng.uniform(0.5, 1.5, (B, n)).astype(np.float32)
        else:
            c = self._codes(rng, B, n)
        x = mix(c, self.dictionary)
        return x + self.cfg.noise * rng.standard_normal((B, self.d_in), dtype=np.float32), c

    def _codes(self, rng, B: int, n: int) -> np.ndarray:
        cfg = self.cfg
        z = rng.standard_normal((B, n), dtype=np.float32)
        if cfg.correlation:
            g = rng.standard_normal((B, -(-n // cfg.correlation_group)), dtype=np.float32)
            g = np.repeat(g, cfg.correlation_group, axis=1)[:, :n]
            z = np.float32(np.sqrt(cfg.correlation)) * g + np.float32(np.sqrt(1 - cfg.correlation)) * z
        on = z < self.cut  # P(on) = probs for each feature, correlated within groups
        child = self.parents >= 0
        if child.any():
            # A child fires only with its parent, then with probability child_prob.
            on[:, child] = on[:, self.parents[child]] & (
                rng.random((B, int(child.sum())), dtype=np.float32) < cfg.hierarchy_child_prob
            )
        mags = (rng.random((B, n), dtype=np.float32) + np.float32(0.5)) * self.scales  # Uniform(0.5, 1.5)
        return np.where(on, mags, np.float32(0))

    def state(self) -> dict:
        return {"index": self.index}

    def restore(self, state: dict) -> None:
        self.index = int(state["index"])


def recovered_fraction(dictionary: np.ndarray, W_dec: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of true directions [n, D] whose best-matching decoder row [N, D] has cosine >= threshold."""
    rows = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    best = (dictionary @ rows.T).max(axis=1)
    return float(np.mean(best >= threshold))
