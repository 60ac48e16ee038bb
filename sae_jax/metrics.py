"""What an SAE does to activations, with no model: reconstruction and sparsity sums, and the quick evaluation.

The trainer's held-out metrics, a run's eval.json and `evaluate`'s reconstruction rows all come from
`recon_sums`, so the same formula gives every number: explained variance by the notebook's
`1 - mean((x_hat - x)^2) / var(x)` over all elements, FVU per token, L0, latent density.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.sae import SAE, forward
from sae_jax.sharding import to_host

DENSE_THRESHOLD = 0.1  # a latent firing on more than this fraction of tokens is dense


def moments(x, x_hat, keep) -> dict:
    """x, x_hat: [..., D], keep: [...] -> element count, mean, centred sum of squares, squared error (float32 [])."""
    x, x_hat, w = x.astype(jnp.float32), x_hat.astype(jnp.float32), keep.astype(jnp.float32)[..., None]
    n = w.sum() * x.shape[-1]
    mean = (x * w).sum() / jnp.maximum(n, 1.0)
    return {"n": n, "mean": mean, "m2": (((x - mean) * w) ** 2).sum(), "sse": (((x_hat - x) * w) ** 2).sum()}


def recon_sums(x, x_hat, f, keep) -> dict:
    """Reconstruction sums over kept tokens; x, x_hat: [..., D], f: [..., N], keep: [...] bool."""
    w = keep.astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    fvu = jnp.mean((x_hat - x32) ** 2, -1) / jnp.maximum(jnp.var(x32, -1), jnp.finfo(jnp.float32).tiny)
    fired = (f > 0) & keep[..., None]
    return {
        **moments(x, x_hat, keep),
        "tokens": w.sum(),
        "fvu": (fvu * w).sum(),
        "l0": fired.sum(dtype=jnp.float32),
        "fired": fired.reshape(-1, f.shape[-1]).sum(0, dtype=jnp.int32),
    }


@jax.jit
def _quick(sae: SAE, x: jax.Array) -> dict:
    x_hat, f, _ = forward(sae, x)
    return recon_sums(x, x_hat, f, jnp.ones(x.shape[:-1], bool))


def quick_eval(sae: SAE, x, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
    """The cheap part, on held-out activations x [B, D]: no model needed.

    x is in the units `sae` reads: raw for an exported SAE, scaled for the
    trainer's params (whose spec has input_scale 1).
    Returns l0, mse, explained_variance, fvu_per_token, dead_fraction and
    dense_fraction over these B tokens, as plain floats (what `evaluate` reports).
    """
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != sae.spec.d_in:
        raise ValueError(f"x: expected shape [B, {sae.spec.d_in}], found {list(x.shape)}")
    r = to_host(_quick(sae, x))  # gathered: under a mesh of several processes, x and the params span them
    n, density = float(r["tokens"]), r["fired"] / float(r["tokens"])
    return {
        "l0": float(r["l0"]) / n,
        "mse": float(r["sse"]) / float(r["n"]),
        "explained_variance": 1.0 - float(r["sse"]) / float(r["m2"]),
        "fvu_per_token": float(r["fvu"]) / n,
        "dead_fraction": float(np.mean(density == 0)),
        "dense_fraction": float(np.mean(density > dense_threshold)),
    }
