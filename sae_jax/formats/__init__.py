"""Read and write SAEs in every supported format; the format is told by the path.

| format        | path                                      | holds                              |
| ------------- | ----------------------------------------- | ---------------------------------- |
| `jax`         | dir with `spec.json` + `params/` (orbax)  | everything in SAESpec              |
| `pt`          | `*.pt` / `*.pth`, torch state dict        | relu, raw activations (the release)|
| `safetensors` | `*.safetensors`, same four keys           | relu, raw activations              |
| `saelens`     | dir with `cfg.json` + `sae_weights.safetensors` | relu/topk, hook site         |

Values and dtypes (float32, bfloat16, float16) pass through bit for bit.
Formats other than `jax` cannot record `input_scale`, so it is folded into the
weights on export (`fold_input_scale`); they read back with scale 1. Every
write goes to a temporary sibling renamed into place at the end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError

from sae_jax.atomic import atomic_dir, atomic_file
from sae_jax.formats.common import SAEFormatError, cause, check_sae, error, first_line
from sae_jax.formats.native import load_jax, quiet_orbax, write_jax
from sae_jax.formats.release import load_release, write_release
from sae_jax.formats.saelens import hook_name, load_saelens, parse_hook_name, write_saelens
from sae_jax.formats.tensorfile import PT_SUFFIXES, SAFETENSORS_SUFFIX
from sae_jax.sae import SAE, Site, fold_input_scale

FORMATS = ("jax", "pt", "safetensors", "saelens")

__all__ = ["FORMATS", "SAEFormatError", "detect_format", "hook_name", "load_sae", "parse_hook_name", "quiet_orbax", "save_sae"]


def detect_format(path: str | Path) -> str:
    """The format of an existing SAE at `path`, one of FORMATS."""
    path = Path(path)
    if path.is_dir():
        if (path / "spec.json").is_file():
            return "jax"
        if (path / "cfg.json").is_file():
            return "saelens"
        raise error(path, "contents", "spec.json (sae-jax) or cfg.json (SAELens)", sorted(p.name for p in path.iterdir())[:8])
    if not path.exists():
        raise SAEFormatError(f"{path}: no such file or directory")
    if path.suffix in PT_SUFFIXES:
        return "pt"
    if path.suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    raise error(path, "suffix", "a .pt/.pth/.safetensors file or a directory", repr(path.suffix))


def load_sae(path: str | Path, *, hook_layer: int | None = None, hook_site: Site | None = None) -> SAE:
    """Read an SAE in any of FORMATS. `hook_layer`/`hook_site`, where given, replace what the file says.

    The release files record no hook; they default to SAESpec's (layer 9, input).
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "jax":
        return load_jax(path, hook_layer, hook_site)
    if fmt == "saelens":
        return load_saelens(path, hook_layer, hook_site)
    return load_release(path, hook_layer, hook_site)


def save_sae(
    sae: SAE,
    path: str | Path,
    format: str = "jax",
    overwrite: bool = False,
    *,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write `sae` to `path` in `format` (one of FORMATS); return `path`.

    An existing `path` is refused unless `overwrite`. `metadata` (SAELens only)
    fills cfg.json's `metadata`, e.g. model_name, context_size, dataset_path.
    """
    path = Path(path)
    _check_destination(path, format, overwrite, metadata)
    check_sae(sae, path)
    if format in ("pt", "safetensors") and sae.spec.architecture != "relu":
        raise error(path, "architecture", f"relu for format {format} (topk fits saelens or jax)", sae.spec.architecture)
    if format != "jax" and sae.spec.input_scale != 1.0:
        sae = fold_input_scale(sae)
    try:
        if format in ("jax", "saelens"):
            with atomic_dir(path, overwrite=True) as tmp:
                if format == "jax":
                    write_jax(sae, tmp)
                else:
                    write_saelens(sae, tmp, metadata)
        else:
            with atomic_file(path) as tmp:
                write_release(sae, tmp, format)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a full disk: tensorstore says ValueError
        raise OSError(f"{path}: could not be written ({cause(e)}); the destination is as it was") from None
    return path


def _check_destination(path: Path, format: str, overwrite: bool, metadata: Mapping[str, object] | None) -> None:
    if format not in FORMATS:
        raise error(path, "format", f"one of {', '.join(FORMATS)}", repr(format))
    if metadata and format != "saelens":
        raise error(path, "metadata", "only with format saelens", f"format {format}")
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
