"""The release format: a flat state dict of the notebook's torch module.

`encoder = nn.Linear(D, N)`, `decoder = nn.Linear(N, D)`, so the weights are
stored `[out, in]`: `encoder.weight [N, D]`, `encoder.bias [N]`,
`decoder.weight [D, N]`, `decoder.bias [D]`, in a `.pt` (torch.save) or a
`.safetensors` file. It holds a relu SAE of raw activations; nothing else
(hook site, scale) is stored, so the hook comes from the caller or defaults.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_jax.formats.common import check_tensors, error, from_numpy, make_spec, to_numpy, transposed
from sae_jax.formats.tensorfile import read_tensors, write_tensors
from sae_jax.sae import SAE, Site


def release_shapes(D: int, N: int) -> dict[str, tuple[int, ...]]:
    """The release's keys and `[out, in]` shapes for width D and N latents."""
    return {"encoder.weight": (N, D), "encoder.bias": (N,), "decoder.weight": (D, N), "decoder.bias": (D,)}


def load_release(path: Path, hook_layer: int | None = None, hook_site: Site | None = None) -> SAE:
    """A release `.pt`/`.safetensors` -> relu SAE in the stored dtype; hook defaults to SAESpec's."""
    tensors = read_tensors(path)
    D, N = _bias_len(path, tensors, "decoder.bias"), _bias_len(path, tensors, "encoder.bias")
    dtype = check_tensors(path, tensors, release_shapes(D, N))
    hook = {k: v for k, v in (("hook_layer", hook_layer), ("hook_site", hook_site)) if v is not None}
    spec = make_spec(path, architecture="relu", d_in=D, n_latents=N, dtype=dtype, source=str(path), **hook)
    arrays = {
        "W_enc": transposed(tensors["encoder.weight"]),
        "b_enc": tensors["encoder.bias"],
        "W_dec": transposed(tensors["decoder.weight"]),
        "b_dec": tensors["decoder.bias"],
    }
    return SAE(from_numpy(arrays), spec)


def write_release(sae: SAE, path: Path, kind: str) -> None:
    """Write a relu SAE with input_scale 1 as a release file of kind "pt" or "safetensors"."""
    a = to_numpy(sae.params)
    tensors = {
        "encoder.weight": transposed(a["W_enc"]),
        "encoder.bias": a["b_enc"],
        "decoder.weight": transposed(a["W_dec"]),
        "decoder.bias": a["b_dec"],
    }
    write_tensors(path, tensors, kind)


def _bias_len(path: Path, tensors: dict[str, np.ndarray], key: str) -> int:
    """The length of a 1-D bias, which fixes D or N unambiguously (a weight could be transposed)."""
    if key not in tensors:
        raise error(path, key, f"keys {sorted(release_shapes(1, 1))}", f"no {key!r} among {sorted(tensors)}")
    shape = tuple(tensors[key].shape)
    if len(shape) != 1:
        raise error(path, key, "a 1-D bias", f"shape {list(shape)}")
    return shape[0]
