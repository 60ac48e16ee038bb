"""SAELens folders: `cfg.json` plus `sae_weights.safetensors` (`W_enc [D, N]`, `b_enc`, `W_dec [N, D]`, `b_dec`).

Read, computing what SAELens 6 computes from the same folder:

| cfg `architecture` | sae-jax | how |
| --- | --- | --- |
| `standard` | relu | as stored |
| `topk` | topk | as stored; `rescale_acts_by_decoder_norm` folded (W_enc, b_enc ×‖W_dec row‖, rows unit) |
| `jumprelu` (BatchTopK, Matryoshka save as it) | jumprelu | threshold as stored (negative acts as 0: relu first) |
| `gated` | jumprelu | W_enc·exp(r_mag), b_mag, threshold max(b_mag - exp(r_mag)·b_gate, 0): the gate |

`apply_b_dec_to_input` is held in the spec (`x - b_dec` is computed as SAELens
does, never folded into b_enc: residual streams have dimensions of ±1000).
Folds run in float64 and are rounded once: to the stored dtype where it holds
the result exactly, else to float32. float64 files load as float32 (one
rounding). Configs before 6.0 (no `sae_lens_version`) are read as SAELens reads
them: `hook_point`, `activation_fn_str`, `normalize_activations: false`, an
all-ones `scaling_factor`, `prepend_bos` true unless given. The `metadata`
object (model_name, hook_name, context_size, dataset_path, prepend_bos, ...)
goes into `SAESpec.metadata`. What changes the math and cannot be represented
(per-token normalization, statistics kept outside the folder, hook_z, head
indices, a non-unit scaling factor) is refused in one line naming the value.

Write: the v6 layout with `metadata.sae_lens_version`, so SAELens reads the
metadata instead of treating the file as pre-6.0; `hook_name` also at the top
level for older readers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sae_jax.formats.common import (
    SAEFormatError,
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
    widened,
)
from sae_jax.formats.tensorfile import read_tensors, write_tensors
from sae_jax.sae import SAE, SAESpec, Site

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
# The layout version we write: 6.0 moved model_name, hook_name... into `metadata`.
FORMAT_VERSION = "6.0.0"
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")
_SITE = {"pre": "input", "post": "output"}
_WRITE_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
# SAELens's LLM_METADATA_KEYS: top-level fields a pre-6.0 config carries as metadata.
_PRE6_METADATA = (
    "model_name",
    "hook_name",
    "model_class_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
    "hook_name_out",
    "hook_head_index_out",
    "hf_hook_name",
    "hf_hook_name_out",
)
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
_NORMALIZE_REFUSAL = (
    '"none" or false (layer_norm and constant_norm_rescale normalize each token, which x_hat = f @ W_dec + b_dec '
    "cannot undo; expected_average_only_in and covariance_whitening need statistics the folder does not hold)"
)


def hook_name(spec: SAESpec) -> str:
    """SAELens's name of the spec's site: the input of block L is `blocks.L.hook_resid_pre`."""
    return f"blocks.{spec.hook_layer}.hook_resid_{'pre' if spec.hook_site == 'input' else 'post'}"


def parse_hook_name(name: str) -> tuple[int, Site] | None:
    """`blocks.L.hook_resid_pre|post` -> (L, "input"|"output"); None for any other hook."""
    m = _HOOK.fullmatch(name) if isinstance(name, str) else None
    return (int(m.group(1)), _SITE[m.group(2)]) if m else None


def load_saelens(folder: Path, hook_layer: int | None = None, hook_site: Site | None = None) -> SAE:
    """A SAELens folder -> SAE computing what SAELens computes (see the module docstring)."""
    cfg_path = folder / CFG
    cfg = read_json_object(cfg_path)
    meta = _metadata(cfg)
    arch, k = _architecture(cfg_path, cfg)
    _check_math(cfg_path, cfg, meta, arch)
    D, N = (positive_int(cfg_path, cfg, key) for key in ("d_in", "d_sae"))
    layer, site = _hook(cfg_path, meta, hook_layer, hook_site)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise error(folder, WEIGHTS, "a file beside cfg.json", "none")
    arrays = read_tensors(weights)
    _drop_unit_scaling_factor(weights, arrays, N)
    dtype = check_tensors(weights, arrays, _shapes(arch, D, N), float64=True)
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm") is True
    if rescale or arch == "gated" or dtype == "float64":
        a64 = widened(arrays)
        a64 = _fold_decoder_norm(a64) if rescale else _gated_as_jumprelu(a64) if arch == "gated" else a64
        arrays, dtype = narrowed(weights, a64, "float32" if dtype == "float64" else dtype)
    if "threshold" in arrays:  # SAELens: relu(pre) * (pre > threshold); ours: pre * (pre > threshold)
        arrays["threshold"] = np.maximum(arrays["threshold"], np.zeros((), arrays["threshold"].dtype))
    architecture = {"standard": "relu", "topk": "topk"}.get(arch, "jumprelu")
    if meta.get("hook_name") is not None and parse_hook_name(meta["hook_name"]) != (layer, site):
        meta["hook_name"] = f"blocks.{layer}.hook_resid_{'pre' if site == 'input' else 'post'}"  # overridden
    spec = make_spec(
        cfg_path,
        architecture=architecture,
        d_in=D,
        n_latents=N,
        k=k,
        hook_layer=layer,
        hook_site=site,
        dtype=dtype,
        source=str(folder),
        apply_b_dec_to_input=_flag(cfg_path, cfg, "apply_b_dec_to_input", True),
        metadata=metadata_text(cfg_path, meta),
    )
    return SAE(from_numpy(arrays), spec)


def check_writable(sae: SAE, path: Path) -> None:
    """Refuse, before anything is written, an SAE SAELens would compute differently."""
    if sae.spec.architecture == "jumprelu":
        t = np.asarray(sae.params.threshold, np.float32)
        if (t < 0).any():
            found = f"{int((t < 0).sum())} negative (first at {int(np.argmax(t < 0))}: {float(t[np.argmax(t < 0)])})"
            raise error(path, "threshold", ">= 0 (SAELens applies relu before the jump)", found)


def write_saelens(sae: SAE, folder: Path, metadata: Mapping[str, object] | None = None) -> None:
    """Write `cfg.json` and `sae_weights.safetensors` into the existing empty `folder`."""
    spec = sae.spec
    meta = {**metadata_of(spec), **(metadata or {}), "hook_name": hook_name(spec)}
    meta["sae_lens_version"] = _v6_version(meta.get("sae_lens_version"))
    cfg = {
        "architecture": _WRITE_ARCH[spec.architecture],
        "d_in": spec.d_in,
        "d_sae": spec.n_latents,
        **({"k": spec.k, "rescale_acts_by_decoder_norm": False} if spec.architecture == "topk" else {}),
        "dtype": spec.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": spec.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name": meta["hook_name"],
        "metadata": meta,
    }
    write_tensors(folder / WEIGHTS, to_numpy(sae.params), "safetensors")
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def _v6_version(found) -> str:
    """The recorded version where it is 6.0 or later (the layout we write), else FORMAT_VERSION."""
    from packaging.version import InvalidVersion, Version

    try:
        return found if isinstance(found, str) and Version(found) >= Version("6.0.0rc0") else FORMAT_VERSION
    except InvalidVersion:
        return FORMAT_VERSION


def _is_pre6(cfg: dict) -> bool:
    """As SAELens decides: no `sae_lens_version` (top level or in metadata), or one before 6.0."""
    meta = cfg.get("metadata")
    version = cfg.get("sae_lens_version") or (meta.get("sae_lens_version") if isinstance(meta, dict) else None)
    return _v6_version(version) != version if isinstance(version, str) else True


def _metadata(cfg: dict) -> dict:
    """v6 keeps model_name, hook_name... in `metadata` (`meta` in some 6.x); pre-6.0 configs at the top level,
    with SAELens's defaults (`prepend_bos` true, `neuronpedia_id` null). A hand-written config may have both;
    `metadata` wins."""
    found = cfg.get("metadata", cfg.get("meta"))
    found = dict(found) if isinstance(found, dict) else {}
    if not _is_pre6(cfg):
        return found
    top = {_PRE6_RENAMES.get(k, k): v for k, v in cfg.items()}
    return {"prepend_bos": True, "neuronpedia_id": None, **{k: top[k] for k in _PRE6_METADATA if k in top}, **found}


def _architecture(path: Path, cfg: dict) -> tuple[str, int | None]:
    """(cfg architecture among standard/topk/jumprelu/gated, k for topk)."""
    arch = cfg.get("architecture", "standard")
    key = "activation_fn_str" if "activation_fn_str" in cfg else "activation_fn"
    fn = cfg.get(key) or "relu"
    if arch == "standard" and fn == "topk":  # pre-v6 spelling of a top-k SAE
        kwargs = cfg.get("activation_fn_kwargs")
        arch, cfg = "topk", {"k": kwargs.get("k") if isinstance(kwargs, dict) else None}
    elif fn not in ("relu", "topk"):
        raise error(path, key, '"relu" or "topk"', json.dumps(fn))
    if not isinstance(arch, str) or arch not in ("standard", "topk", "jumprelu", "gated"):  # a list is no dict key
        hint = (
            " (BatchTopK and Matryoshka SAEs are saved for inference as jumprelu)"
            if arch in ("batchtopk", "matryoshka_batchtopk")
            else ""
        )
        raise error(path, "architecture", f'"standard", "topk", "jumprelu" or "gated"{hint}', json.dumps(arch))
    return arch, positive_int(path, cfg, "k") if arch == "topk" else None


def _check_math(path: Path, cfg: dict, meta: dict, arch: str) -> None:
    """Refuse cfg fields that change the math in a way sae-jax cannot compute, naming the value found."""
    norm = cfg.get("normalize_activations")
    if norm not in ("none", None, False):
        raise error(path, "normalize_activations", _NORMALIZE_REFUSAL, json.dumps(norm))
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise error(
            path,
            "reshape_activations",
            '"none" (sae-jax reads the residual stream, not hook_z)',
            json.dumps(cfg["reshape_activations"]),
        )
    for key in ("hook_head_index", "hook_point_head_index"):
        value = cfg.get(key, meta.get(key))
        if value is not None:
            raise error(path, key, "null (sae-jax reads the whole residual stream)", json.dumps(value))
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale not in (False, None) and not (arch == "topk" and rescale is True):
        expected = "true or false" if arch == "topk" else f"false for architecture {arch} (SAELens applies it to topk)"
        raise error(path, "rescale_acts_by_decoder_norm", expected, json.dumps(rescale))
    _flag(path, cfg, "apply_b_dec_to_input", True)


def _flag(path: Path, cfg: dict, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise error(path, key, "true or false", json.dumps(value))
    return value


def _shapes(arch: str, D: int, N: int) -> dict[str, tuple[int, ...]]:
    shapes = {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
    if arch == "jumprelu":
        return {**shapes, "threshold": (N,)}
    if arch == "gated":
        return {"W_enc": (D, N), "b_gate": (N,), "b_mag": (N,), "r_mag": (N,), "W_dec": (N, D), "b_dec": (D,)}
    return shapes


def _drop_unit_scaling_factor(path: Path, arrays: dict, N: int) -> None:
    """Pre-6.0 files may hold `scaling_factor`; SAELens drops it when all ones and reads nothing else."""
    if "scaling_factor" not in arrays:
        return
    s = arrays.pop("scaling_factor")
    other = int((np.asarray(s, np.float64) != 1).sum())
    if s.shape != (N,) or other:
        found = f"shape {list(s.shape)}" if s.shape != (N,) else f"{other} entries other than 1"
        raise error(path, "scaling_factor", f"all ones, shape [{N}] (SAELens 6 reads no other)", found)


def _fold_decoder_norm(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SAELens's rescaled top-k, `topk(pre * n)` decoded by `(f / n) @ W_dec` with n = ‖W_dec row‖: the same
    function with W_enc, b_enc times n and W_dec rows divided by n (a zero row stays zero, as its f * 0 does)."""
    n = np.sqrt(np.sum(a["W_dec"] ** 2, axis=1))
    W_dec = a["W_dec"] / np.where(n == 0, 1, n)[:, None]
    return {**a, "W_enc": a["W_enc"] * n, "b_enc": a["b_enc"] * n, "W_dec": W_dec}


def _gated_as_jumprelu(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gated: f = [x W + b_gate > 0] * relu(x W e^r + b_mag). With pre = x W e^r + b_mag the gate is
    pre > b_mag - e^r b_gate, a jump threshold; clamped at 0 it also does the relu."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported when rounded
        e = np.exp(a["r_mag"])
        return {
            "W_enc": a["W_enc"] * e,
            "b_enc": a["b_mag"],
            "W_dec": a["W_dec"],
            "b_dec": a["b_dec"],
            "threshold": np.maximum(a["b_mag"] - e * a["b_gate"], 0.0),
        }


def _hook(path: Path, meta: dict, hook_layer: int | None, hook_site: Site | None) -> tuple[int, Site]:
    """The (layer, site) from `hook_name`, overridden where given."""
    if hook_layer is not None and hook_site is not None:
        return hook_layer, hook_site
    name = meta.get("hook_name")
    parsed = parse_hook_name(name)
    if parsed is None:
        expected = '"blocks.L.hook_resid_pre" or "blocks.L.hook_resid_post" (or pass hook_layer and hook_site)'
        raise error(path, "hook_name", expected, json.dumps(name))
    return (hook_layer if hook_layer is not None else parsed[0]), (hook_site or parsed[1])


__all__ = [
    "CFG",
    "WEIGHTS",
    "SAEFormatError",
    "check_writable",
    "hook_name",
    "load_saelens",
    "parse_hook_name",
    "write_saelens",
]
