"""EleutherAI sparsify folders: `cfg.json` plus `sae.safetensors`, one folder per hookpoint.

Tensors: `encoder.weight [N, D]` (torch.nn.Linear), `encoder.bias [N]`,
`W_dec [N, D]`, `b_dec [D]`. sparsify encodes `topk(relu((x - b_dec) @ W^T + b))`:
our topk with the pre-encoder bias (`apply_b_dec_to_input`). Its `groupmax`
activation, transcoders and skip connections are refused in one line.

The hookpoint is the folder's name: `layers.L` is the output of decoder layer L
(sparsify hooks module outputs), `embed_tokens` the input of layer 0. A folder we
write also records our exact site as SAELens's `hook_name` and our metadata in
cfg.json (sparsify drops keys it does not know), and `hookpoint` for the reader.
A topk SAE without the pre-encoder bias is written with `b_enc + b_dec @ W_enc`,
folded in float64 and rounded once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from sae_jax.formats.common import (
    check_tensors,
    error,
    from_numpy,
    make_spec,
    metadata_of,
    metadata_text,
    narrowed,
    positive_int,
    read_json_object,
    to_numpy,
    transposed,
    widened,
)
from sae_jax.formats.saelens import hook_name, parse_hook_name
from sae_jax.formats.tensorfile import read_tensors, write_tensors
from sae_jax.sae import SAE, SAESpec, Site

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
_LAYER = re.compile(r"(?:model\.|base_model\.)?layers\.(\d+)")
_NOT_AN_SAE = "false (sparsify: a {what} is not an SAE of one site; sae-jax reads SAEs only)"


def is_sparsify(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def hookpoint(spec: SAESpec) -> str:
    """sparsify's module name of the spec's site: the output of layer L is `layers.L`, the input `layers.{L-1}`."""
    if spec.hook_site == "output":
        return f"layers.{spec.hook_layer}"
    return f"layers.{spec.hook_layer - 1}" if spec.hook_layer > 0 else "embed_tokens"


def parse_hookpoint(name: str) -> tuple[int, Site] | None:
    """`layers.L` -> (L, "output"); `embed_tokens` -> (0, "input"); None for any other module."""
    m = _LAYER.fullmatch(name) if isinstance(name, str) else None
    if m:
        return int(m.group(1)), "output"
    return (0, "input") if name in ("embed_tokens", "model.embed_tokens") else None


def load_sparsify(folder: Path, hook_layer: int | None = None, hook_site: Site | None = None) -> SAE:
    """A sparsify hookpoint folder -> topk SAE with the pre-encoder bias, in the stored dtype (float64: float32)."""
    cfg_path = folder / CFG
    cfg = read_json_object(cfg_path)
    for key, what in (("transcode", "transcoder"), ("skip_connection", "skip connection")):
        if cfg.get(key, False) is not False:
            raise error(cfg_path, key, _NOT_AN_SAE.format(what=what), json.dumps(cfg[key]))
    if cfg.get("activation", "topk") != "topk":
        raise error(
            cfg_path,
            "activation",
            '"topk" (sparsify\'s groupmax has no sae-jax architecture)',
            json.dumps(cfg["activation"]),
        )
    D, k = positive_int(cfg_path, cfg, "d_in"), positive_int(cfg_path, cfg, "k")
    N = cfg.get("num_latents") or positive_int(cfg_path, cfg, "expansion_factor") * D
    N = positive_int(cfg_path, {"num_latents": N}, "num_latents")
    layer, site = _hook(folder, cfg, hook_layer, hook_site)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise error(folder, WEIGHTS, "a file beside cfg.json", "none")
    tensors = read_tensors(weights)
    shapes = {"encoder.weight": (N, D), "encoder.bias": (N,), "W_dec": (N, D), "b_dec": (D,)}
    dtype = check_tensors(weights, tensors, shapes, float64=True)
    arrays = {
        "W_enc": transposed(tensors["encoder.weight"]),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    if dtype == "float64":
        arrays, dtype = narrowed(weights, widened(arrays), "float32")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else _run_metadata(folder)
    spec = make_spec(
        cfg_path,
        architecture="topk",
        d_in=D,
        n_latents=N,
        k=k,
        hook_layer=layer,
        hook_site=site,
        dtype=dtype,
        source=str(folder),
        apply_b_dec_to_input=True,
        metadata=metadata_text(cfg_path, meta),
    )
    return SAE(from_numpy(arrays), spec)


def check_writable(sae: SAE, path: Path) -> None:
    if sae.spec.architecture != "topk":
        raise error(
            path, "architecture", "topk for format sparsify (sparsify holds top-k SAEs only)", sae.spec.architecture
        )


def write_sparsify(sae: SAE, folder: Path) -> None:
    """Write `cfg.json` and `sae.safetensors` into the existing empty `folder` (a topk SAE with the pre-encoder
    bias and input_scale 1: save_sae prepares it)."""
    spec, a = sae.spec, to_numpy(sae.params)
    norms = np.linalg.norm(np.asarray(a["W_dec"], np.float64), axis=1)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(spec.n_latents // spec.d_in, 1),
        "normalize_decoder": bool(np.all(np.abs(norms - 1) < 1e-3)),  # training only: keep rows unit norm
        "num_latents": spec.n_latents,
        "k": spec.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": spec.d_in,
        "hookpoint": hookpoint(spec),
        "hook_name": hook_name(spec),
        "metadata": metadata_of(spec),
    }
    tensors = {
        "encoder.weight": transposed(a["W_enc"]),
        "encoder.bias": a["b_enc"],
        "W_dec": a["W_dec"],
        "b_dec": a["b_dec"],
    }
    write_tensors(folder / WEIGHTS, tensors, "safetensors")
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def run_folder_hookpoints(folder: Path) -> list[str]:
    """The hookpoint folders of a sparsify run folder (empty if `folder` is none)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and is_sparsify(p))


def _hook(folder: Path, cfg: dict, hook_layer: int | None, hook_site: Site | None) -> tuple[int, Site]:
    if hook_layer is not None and hook_site is not None:
        return hook_layer, hook_site
    parsed = parse_hook_name(cfg.get("hook_name")) or parse_hookpoint(cfg.get("hookpoint", folder.name))
    if parsed is None:
        name = cfg.get("hookpoint", folder.name)
        expected = "a residual hookpoint folder, layers.L or embed_tokens (or pass hook_layer and hook_site)"
        raise error(folder, "hookpoint", expected, json.dumps(name))
    return (hook_layer if hook_layer is not None else parsed[0]), (hook_site or parsed[1])


def _run_metadata(folder: Path) -> dict:
    """model_name, dataset_path, context_size from the run folder's config.json (sparsify's TrainConfig), if any."""
    path = folder.parent / "config.json"
    try:
        run = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    if not isinstance(run, dict):
        return {}
    fields = {"model_name": run.get("model"), "dataset_path": run.get("dataset"), "context_size": run.get("ctx_len")}
    return {k: v for k, v in fields.items() if isinstance(v, (str, int)) and not isinstance(v, bool)}
