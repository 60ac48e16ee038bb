"""An SAE attached to a model: whether it can read the model's residual, and which of its latents are meant.

What evaluation, inspection and steering share; each imports it from here.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np

from sae_jax.sae import SAE, SAEParams

if TYPE_CHECKING:
    from sae_jax.llama.model import Llama


def check_compatible(sae: SAE, model: "Llama", what: str = "SAE") -> None:
    """A one-line ValueError if the SAE cannot read this model's residual at its site."""
    c, s = model.config, sae.spec
    if s.d_in != c.hidden_size:
        raise ValueError(f"{what}: width d_in expected the model's hidden size {c.hidden_size}, found {s.d_in}")
    if not 0 <= s.hook_layer < c.num_layers:
        raise ValueError(
            f"{what}: hook_layer expected 0..{c.num_layers - 1} (the model has {c.num_layers} layers), "
            f"found {s.hook_layer}"
        )


def check_feature(sae: SAE, feature: int) -> int:
    """`feature` as an int, or a one-line ValueError naming the SAE's range."""
    n = sae.spec.n_latents
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < n:
        raise ValueError(f"feature: expected an id in 0..{n - 1} (the SAE has {n} latents), found {feature!r}")
    return int(feature)


def narrow(sae: SAE, features: Sequence[int]) -> tuple[SAE, np.ndarray | None]:
    """(an SAE, indices) whose codes, indexed, are the chosen latents' codes [..., F].

    For relu each latent is its own column, so the SAE is cut down to the chosen
    ones (indices None); for topk whether a latent fires depends on the others,
    so the whole SAE encodes and the indices pick.
    """
    idx = np.asarray([check_feature(sae, i) for i in features], np.int32)
    if sae.spec.architecture != "relu":
        return sae, idx
    p = sae.params
    params = SAEParams(p.W_enc[:, idx], p.b_enc[idx], p.W_dec[idx], p.b_dec)
    return SAE(params, dataclasses.replace(sae.spec, n_latents=len(idx))), None
