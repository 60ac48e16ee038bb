"""Flat tensor dicts in `.pt` (torch.save) and `.safetensors` files, as numpy arrays.

PyTorch is imported only when a `.pt` file is read or written. A `.pt` is a
pickle, so it is read with `weights_only=True`: anything but tensors and plain
containers is refused before any code from the file runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from sae_jax.formats.common import SAEFormatError, error, first_line
from sae_jax.sae import DTYPES

PT_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
# float64: SAELens and sparsify files may hold it; the release reader refuses it by name.
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_ACCEPTED = f"dtype one of {', '.join(DTYPES)}"


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """path: a `.pt` or `.safetensors` file -> {key: array} in the stored dtype."""
    if path.suffix in PT_SUFFIXES:
        return _read_pt(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    raise error(path, "suffix", f"{' or '.join(PT_SUFFIXES + (SAFETENSORS_SUFFIX,))}", repr(path.suffix))


def write_tensors(path: Path, tensors: dict[str, np.ndarray], kind: str) -> None:
    """Write {key: array} to `path` as kind "pt" or "safetensors", whatever its name."""
    tensors = {k: np.ascontiguousarray(a) for k, a in tensors.items()}
    if kind == "pt":
        torch = _torch(path)
        with open(path, "wb") as f:  # a file object: the zip's inner folder is "archive", not the temporary's name
            torch.save({k: _to_torch(torch, a) for k, a in tensors.items()}, f)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, path)


def _torch(path: Path):
    try:
        import torch
    except ImportError:
        raise SAEFormatError(f"{path}: .pt files need PyTorch (pip install torch); .safetensors files do not") from None
    return torch


def _read_pt(path: Path) -> dict[str, np.ndarray]:
    torch = _torch(path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise SAEFormatError(
            f"{path}: not a plain tensor dict: torch.load(weights_only=True) refused it ({_refusal(e)})"
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        raise SAEFormatError(f"{path}: truncated or not a torch.save file ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise error(path, "top level", "a dict of tensors", type(obj).__name__)
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise error(
                path, str(key), "a tensor under a string key", f"{type(key).__name__} -> {type(value).__name__}"
            )
        out[key] = _from_torch(torch, path, key, value)
    return out


def _refusal(e: BaseException) -> str:
    """The one informative sentence of torch's multi-paragraph weights_only refusal."""
    m = re.search(
        r"WeightsUnpickler error:\s*(.*?)(?: Please use|\n|$)", str(e)
    )  # garbage: "error: \n\nUnsupported operand"
    return m.group(1).strip() if m and m.group(1).strip() else first_line(e)


def _from_torch(torch, path: Path, key: str, t) -> np.ndarray:
    if t.layout != torch.strided or t.is_quantized:
        raise error(path, key, "a dense tensor", str(t.layout))
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.float32, torch.float16):
        return t.numpy()
    raise error(path, key, _ACCEPTED, str(t.dtype).removeprefix("torch."))


def _to_torch(torch, a: np.ndarray):
    a = np.require(a, requirements=["C", "W"])  # torch.from_numpy warns on read-only arrays
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
            for key, dt in dtypes.items():
                if dt not in _SAFETENSORS_DTYPES:
                    raise error(path, key, _ACCEPTED, dt)
            return {key: f.get_tensor(key) for key in dtypes}
    except SAEFormatError:
        raise
    except Exception as e:  # SafetensorError for a bad header or a short file, OSError for I/O
        raise SAEFormatError(f"{path}: truncated or not a safetensors file ({first_line(e)})") from None
