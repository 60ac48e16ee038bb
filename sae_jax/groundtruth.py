"""Scores of a trained SAE against synthetic ground truth (`sae_jax.data.synthetic`).

The true features are known: their directions F [n, D] and, on any batch,
their codes c [B, n]. Decoder rows are matched to true directions one-to-one
(the assignment that maximises the summed cosine: scipy's Hungarian solver
when scipy is installed, else a greedy pass, said in `matching`). Then:

- recovered: fraction of true directions whose best decoder row (any, not only
  the matched one) has cosine >= 0.9 (`recovered_fraction`);
- mcc: mean cosine over the one-to-one matched pairs (the mean correlation
  coefficient of the identifiability literature, on decoder directions);
- precision / recall / f1: does the matched latent fire exactly when its
  feature does, averaged over the features that fire in the sample;
- shrinkage: median over co-firing tokens of (f_j |W_dec,j|) / c_i, averaged
  over matched features (1: no shrinkage; L1 penalties give < 1);
- dead / dense: fraction of latents firing on no token / on more than 10%;
- absorption (hierarchies only): for each parent, the fraction of tokens where
  the parent and one of its children fire but the parent's latent does not
  (a child latent has absorbed the parent's direction), averaged over parents.
"""

from __future__ import annotations

import numpy as np

from sae_jax.config import Config
from sae_jax.data.synthetic import SyntheticSource, parents, recovered_fraction
from sae_jax.sae import SAE, encode

COS = 0.9
DENSE = 0.1
HELD_OUT = 10**9  # batch index of the scoring sample: far past any training run's batches


def unit_rows(W: np.ndarray) -> np.ndarray:
    W = np.asarray(W, np.float64)
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)


def match(F: np.ndarray, W_dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """F: [n, D], W_dec: [N, D] -> (feature index [m], latent index [m], method): one-to-one, max summed cosine."""
    cos = unit_rows(F) @ unit_rows(W_dec).T
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # greedy: the best remaining pair first
        order = np.dstack(np.unravel_index(np.argsort(-cos, axis=None), cos.shape))[0]
        used_f, used_l, pairs = set(), set(), []
        for i, j in order:
            if i not in used_f and j not in used_l:
                used_f.add(i), used_l.add(j), pairs.append((i, j))
                if len(pairs) == min(cos.shape):
                    break
        rows, cols = map(np.array, zip(*sorted(pairs)))
        return rows, cols, "greedy"
    rows, cols = linear_sum_assignment(-cos)
    return rows, cols, "hungarian"


def score(sae: SAE, F: np.ndarray, x: np.ndarray, c: np.ndarray, parent: np.ndarray | None = None) -> dict:
    """sae takes x [B, D] as given; F: [n, D] true directions, c: [B, n] true codes, parent: [n] (-1: none)."""
    W = np.asarray(sae.params.W_dec, np.float64) / sae.spec.input_scale  # raw units, as x_hat's
    rows, cols, method = match(F, W)
    cos = np.sum(unit_rows(F)[rows] * unit_rows(W)[cols], axis=1)
    f = np.asarray(encode(sae, x), np.float64)
    fires, on = f != 0, c > 0
    density = fires.mean(0)
    tp = (fires[:, cols] & on[:, rows]).sum(0)
    precision = tp / np.maximum(fires[:, cols].sum(0), 1)
    recall = tp / np.maximum(on[:, rows].sum(0), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    seen = on[:, rows].any(0)
    norms = np.linalg.norm(W[cols], axis=1)
    both = fires[:, cols] & on[:, rows]
    ratios = [
        np.median(f[both[:, m], j] * norms[m] / c[both[:, m], i])
        for m, (i, j) in enumerate(zip(rows, cols))
        if both[:, m].any()
    ]
    out = {
        "n_true_features": int(F.shape[0]),
        "recovered": recovered_fraction(F, W, COS),
        "mcc": float(np.mean(cos)),
        "matching": method,
        "precision": float(np.mean(precision[seen])),
        "recall": float(np.mean(recall[seen])),
        "f1": float(np.mean(f1[seen])),
        "shrinkage": float(np.mean(ratios)) if ratios else float("nan"),
        "dead_fraction": float(np.mean(density == 0)),
        "dense_fraction": float(np.mean(density > DENSE)),
        "tokens": int(x.shape[0]),
    }
    if parent is not None and (parent >= 0).any():
        out["absorption"] = absorption(fires, on, rows, cols, parent)
    return out


def absorption(fires, on, rows, cols, parent) -> float:
    """Mean over parents of P(parent's latent silent | parent and a child fire)."""
    latent_of = dict(zip(rows.tolist(), cols.tolist()))
    rates = []
    for p in np.unique(parent[parent >= 0]):
        child_on = on[:, parent == p].any(1) & on[:, p]
        if child_on.any() and p in latent_of:
            rates.append(1.0 - fires[child_on, latent_of[p]].mean())
    return float(np.mean(rates)) if rates else float("nan")


def score_synthetic(sae: SAE, cfg: Config, batches: int = 4) -> dict:
    """`score` on `batches` unseen batches of the run's synthetic source."""
    src = SyntheticSource(cfg.data.synthetic, cfg.sae.d_in, cfg.data.batch_size, cfg.data.seed)
    xs, cs = zip(*(src.batch(HELD_OUT + i) for i in range(batches)))
    return score(sae, src.dictionary, np.concatenate(xs), np.concatenate(cs), parents(cfg.data.synthetic))


def summary(s: dict) -> str:
    """One line for the end of a run."""
    line = f"ground truth: recovered {s['recovered']:.1%} of {s['n_true_features']} true features (cos >= {COS})"
    line += f", MCC {s['mcc']:.3f}"
    line += f", F1 {s['f1']:.3f}, shrinkage {s['shrinkage']:.3f}"
    return line + (f", absorption {s['absorption']:.3f}" if "absorption" in s else "")


__all__ = ["match", "score", "score_synthetic", "summary", "absorption"]
