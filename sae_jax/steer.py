"""Steer a Llama with one SAE latent: edit the residual at the SAE's site, let the model run on.

The notebook's recipe, at every position (prompt and generated tokens):
encode x, add alpha to latent i, decode, add back the reconstruction error:

    x' = decode(f + alpha e_i) + (x - decode(f))        f = encode(x)
       = x + alpha * W_dec[i]                            (decode is affine)

so mode "add" adds alpha times latent i's decoder row (in raw activation
units) and is exactly x at alpha = 0. Mode "clamp" sets the latent to alpha
instead: x' = x + (alpha - f_i) * W_dec[i].

Where the edit goes differs from the notebook. Its two hooks on
`model.model.layers[9]` save the layer's *input*, edit it, and return it as the
layer's *output*, so layer 9's own attention and MLP are thrown away at every
position and layer 10 reads the edited layer-9 input. Here the edited residual
replaces the residual at the SAE's site (for the notebook's SAE, the input of
layer 9) and every layer from there on runs as usual, layer 9 included. At
alpha = 0 this gives the unsteered model's output exactly; the notebook's
hooks at alpha = 0 still give a model with layer 9 removed.

"Exactly" holds in float32. In bfloat16 compute XLA keeps excess precision
by default, so a graph with an edit rounds differently from one without and
greedy tokens can part; `XLA_FLAGS=--xla_allow_excess_precision=false` restores it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.attach import check_compatible, check_feature, narrow
from sae_jax.llama.generate import generate
from sae_jax.llama.model import Edit, Llama
from sae_jax.sae import SAE, encode

MODES = ("add", "clamp")


def direction(sae: SAE, feature: int) -> jax.Array:
    """[D] float32: latent `feature`'s decoder row in raw activation units (decode(e_i) - decode(0))."""
    i = check_feature(sae, feature)
    return sae.params.W_dec[i].astype(jnp.float32) / sae.spec.input_scale


def _add(p, x: jax.Array) -> jax.Array:
    return x + p["alpha"] * p["direction"]


def _clamp(p, x: jax.Array) -> jax.Array:
    f = encode(p["sae"], x)
    f = f if p["idx"] is None else f[..., p["idx"]]  # [..., 1], latent i's code at each position
    return x + (p["alpha"] - f) * p["direction"]


def steering_edit(sae: SAE, feature: int, alpha: float, mode: str = "add") -> Edit:
    """The Edit at the SAE's site that adds `alpha` to latent `feature` ("add") or sets it to `alpha` ("clamp")."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, found {mode!r}")
    params = {"alpha": jnp.float32(alpha), "direction": direction(sae, feature)}
    if mode == "clamp":
        params["sae"], params["idx"] = narrow(sae, [feature])
    s = sae.spec
    return Edit(params, s.hook_layer, s.hook_site, _add if mode == "add" else _clamp)


def steer(
    model: Llama,
    sae: SAE,
    input_ids,
    feature: int,
    alpha: float,
    max_new_tokens: int,
    *,
    mode: str = "add",
    attention_mask=None,
    eos_ids=(),
) -> np.ndarray:
    """Greedy continuation of input_ids [B, T] with the steering edit -> new tokens [B, n] int32 (see `generate`)."""
    check_compatible(sae, model)
    edit = steering_edit(sae, feature, alpha, mode)
    return generate(model, input_ids, max_new_tokens, attention_mask=attention_mask, edit=edit, eos_ids=eos_ids)
