"""Read and write SAEs in every supported format; the format is told by the path.

| format        | path                                                   | holds                                   |
| ------------- | ------------------------------------------------------ | --------------------------------------- |
| `jax`         | dir with `spec.json` + `params/` (orbax)               | everything in SAESpec                   |
| `pt`          | `*.pt` / `*.pth`, torch state dict                     | relu, raw activations (the release)     |
| `safetensors` | `*.safetensors`, same four keys                        | relu, raw activations                   |
| `saelens`     | dir with `cfg.json` + `sae_weights.safetensors`        | relu/topk/jumprelu (gated read), hook, meta |
| `sparsify`    | dir (one hookpoint) with `cfg.json` + `sae.safetensors`| topk with the pre-encoder bias, hook    |

Values and dtypes (float32, bfloat16, float16) pass through bit for bit.
Formats other than `jax` cannot record `input_scale`, the release files no
pre-encoder bias and sparsify nothing without one: those are folded into the
weights on export, in float64 and rounded once. Where the SAE's dtype cannot
hold a fold exactly (bfloat16/float16), the export is refused rather than
rounded (write float32 with `dtype=`, or the jax format, which keeps them). Every
write goes to a temporary sibling renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError

from sae_jax.atomic import atomic_dir, atomic_file
from sae_jax.formats import saelens, sparsify
from sae_jax.formats.common import (
    SAEFormatError,
    cause,
    check_sae,
    dtype_name,
    error,
    first_line,
    fold_input_scale_exactly,
    fold_pre_bias,
    from_numpy,
    metadata_of,
    metadata_text,
    read_json_object,
    rounded,
    to_numpy,
    widened,
)
from sae_jax.formats.native import load_jax, quiet_orbax, write_jax
from sae_jax.formats.release import load_release, write_release
from sae_jax.formats.saelens import hook_name, load_saelens, parse_hook_name, write_saelens
from sae_jax.formats.sparsify import load_sparsify, write_sparsify
from sae_jax.formats.tensorfile import PT_SUFFIXES, SAFETENSORS_SUFFIX
from sae_jax.sae import SAE, Site

FORMATS = ("jax", "pt", "safetensors", "saelens", "sparsify")
_FOLDERS = ("jax", "saelens", "sparsify")

__all__ = [
    "FORMATS",
    "SAEFormatError",
    "detect_format",
    "hook_name",
    "load_sae",
    "parse_hook_name",
    "quiet_orbax",
    "save_sae",
]


def detect_format(path: str | Path) -> str:
    """The format of an existing SAE at `path`, one of FORMATS."""
    path = Path(path)
    if path.is_dir():
        if (path / "spec.json").is_file():
            return "jax"
        if (path / saelens.CFG).is_file():
            return _saelens_or_sparsify(path)
        hookpoints = sparsify.run_folder_hookpoints(path)
        if hookpoints:
            raise error(
                path,
                "contents",
                "one SAE; this is a sparsify run folder: pass one of its hookpoint folders",
                ", ".join(hookpoints[:8]),
            )
        expected = "spec.json (sae-jax) or cfg.json (SAELens, sparsify)"
        raise error(path, "contents", expected, sorted(p.name for p in path.iterdir())[:8])
    if not path.exists():
        raise SAEFormatError(f"{path}: no such file or directory")
    if path.suffix in PT_SUFFIXES:
        return "pt"
    if path.suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    raise error(path, "suffix", "a .pt/.pth/.safetensors file or a directory", repr(path.suffix))


def _saelens_or_sparsify(path: Path) -> str:
    """A folder with cfg.json: told by its weights file, else by its config's keys."""
    if (path / saelens.WEIGHTS).is_file():
        return "saelens"
    if (path / sparsify.WEIGHTS).is_file():
        return "sparsify"
    try:
        cfg = read_json_object(path / saelens.CFG)
    except SAEFormatError:
        return "saelens"  # its reader reports the file
    return "sparsify" if "d_sae" not in cfg and ("num_latents" in cfg or "expansion_factor" in cfg) else "saelens"


def load_sae(path: str | Path, *, hook_layer: int | None = None, hook_site: Site | None = None, dtype=None) -> SAE:
    """Read an SAE in any of FORMATS. `hook_layer`/`hook_site`, where given, replace what the file says.

    The release files record no hook; they default to SAESpec's (layer 9, input). `dtype` (a string, numpy
    or JAX dtype; default: as stored) stores the params in that dtype, each value rounded once.
    """
    path = Path(path)
    target = None if dtype is None else dtype_name(dtype, path)
    fmt = detect_format(path)
    readers = {"jax": load_jax, "saelens": load_saelens, "sparsify": load_sparsify}
    sae = readers.get(fmt, load_release)(path, hook_layer, hook_site)
    if target is None or target == sae.spec.dtype:
        return sae
    arrays, _ = rounded(path, widened(to_numpy(sae.params)), target)
    return SAE(from_numpy(arrays), dataclasses.replace(sae.spec, dtype=target))


def save_sae(
    sae: SAE,
    path: str | Path,
    format: str = "jax",
    overwrite: bool = False,
    *,
    metadata: Mapping[str, object] | None = None,
    dtype=None,
) -> Path:
    """Write `sae` to `path` in `format` (one of FORMATS); return `path`.

    An existing `path` is refused unless `overwrite`. `metadata` (jax, saelens,
    sparsify) is merged over `sae.spec.metadata`: model_name, context_size,
    dataset_path, prepend_bos... `dtype` (a string, numpy or JAX dtype; default
    spec.dtype) is the dtype written; folds are computed in float64 and rounded
    once to it, and refused where it cannot hold them exactly (bfloat16/float16).
    """
    path = Path(path)
    _check_destination(path, format, overwrite, metadata)
    check_sae(sae, path)
    target = sae.spec.dtype if dtype is None else dtype_name(dtype, path)
    if format in ("pt", "safetensors") and sae.spec.architecture != "relu":
        raise error(
            path,
            "architecture",
            f"relu for format {format} (topk and jumprelu fit saelens or jax)",
            sae.spec.architecture,
        )
    if format == "sparsify":
        sparsify.check_writable(sae, path)
    if format == "saelens":
        saelens.check_writable(sae, path)
    if metadata:
        meta = metadata_text(path, {**metadata_of(sae.spec), **metadata})
        sae = SAE(sae.params, dataclasses.replace(sae.spec, metadata=meta))
    sae = _exported(sae, path, format, target)
    try:
        if format in _FOLDERS:
            with atomic_dir(path, overwrite=True) as tmp:
                {"jax": write_jax, "saelens": write_saelens, "sparsify": write_sparsify}[format](sae, tmp)
        else:
            with atomic_file(path) as tmp:
                write_release(sae, tmp, format)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a full disk: tensorstore says ValueError
        raise OSError(f"{path}: could not be written ({cause(e)}); the destination is as it was") from None
    return path


def _exported(sae: SAE, path: Path, format: str, dtype: str) -> SAE:
    """`sae` as `format` can hold it, in `dtype`: input_scale folded (all but jax), the pre-encoder bias folded
    out (pt, safetensors) or in (sparsify). float64 arithmetic, one rounding; a fold bfloat16/float16 cannot hold
    exactly is refused."""
    spec = sae.spec
    scale = format != "jax" and spec.input_scale != 1.0
    remove = format in ("pt", "safetensors") and spec.apply_b_dec_to_input
    add = format == "sparsify" and not spec.apply_b_dec_to_input
    if not (scale or remove or add) and dtype == spec.dtype:
        return sae  # bit for bit
    a64 = widened(to_numpy(sae.params))
    a64 = fold_input_scale_exactly(a64, spec.input_scale) if scale else a64
    a64 = fold_pre_bias(a64, 1 if remove else -1) if remove or add else a64
    arrays, exact = rounded(path, a64, dtype)
    if (scale or remove or add) and dtype != "float32" and not exact:
        key, found = ("input_scale", spec.input_scale) if scale else ("apply_b_dec_to_input", spec.apply_b_dec_to_input)
        what = "the scale" if scale else "b_dec @ W_enc into b_enc"
        expected = (
            f"a fold {dtype} holds exactly for format {format} (folding {what} would round the {dtype} "
            "weights and change the codes; write float32 with dtype=/--dtype, or the jax format)"
        )
        raise error(path, key, expected, found)
    apply_b_dec = format == "sparsify" or (spec.apply_b_dec_to_input and not remove)
    spec = dataclasses.replace(
        spec, dtype=dtype, input_scale=1.0 if scale else spec.input_scale, apply_b_dec_to_input=apply_b_dec
    )
    return SAE(from_numpy(arrays), spec)


def _check_destination(path: Path, format: str, overwrite: bool, metadata: Mapping[str, object] | None) -> None:
    if format not in FORMATS:
        raise error(path, "format", f"one of {', '.join(FORMATS)}", repr(format))
    if metadata and format not in _FOLDERS:
        raise error(path, "metadata", "only with formats jax, saelens, sparsify", f"format {format}")
    try:
        json.dumps(dict(metadata or {}))
    except (TypeError, ValueError) as e:
        raise error(path, "metadata", "JSON values", first_line(e)) from None
    suffixes = {"pt": PT_SUFFIXES, "safetensors": (SAFETENSORS_SUFFIX,)}.get(format)
    if suffixes and path.suffix not in suffixes:  # load_sae tells the format by the suffix
        raise error(path, "suffix", f"{' or '.join(suffixes)} for format {format}", repr(path.suffix))
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise SAEFormatError(f"{path}: destination exists; pass overwrite=True (--overwrite) to replace it")
        if path.is_dir() and suffixes:
            raise SAEFormatError(f"{path}: destination is a directory; a {format} file cannot replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
