"""What every format shares: the error type, tensor checks, hook overrides.

Tensors cross format boundaries as numpy arrays (bfloat16 via ml_dtypes), so
a value is never rounded on the way: only transposes and copies touch them,
and those run in numpy, not XLA (XLA on CPU flushes subnormals in arithmetic).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.errors import SAEFormatError, cause, error, first_line  # noqa: F401 (re-exported)
from sae_jax.sae import DTYPES, SAE, SAEParams, SAESpec, Site

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def check_tensors(where: str | Path, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Check keys, shapes, one supported dtype and finite values; return the dtype name."""
    expected_keys = sorted(shapes)
    for key in shapes:
        if key not in tensors:
            raise error(where, key, f"keys {expected_keys}", f"no {key!r} among {sorted(tensors)}")
    for key in tensors:
        if key not in shapes:
            raise error(where, key, f"only keys {expected_keys}", f"extra key {key!r}")
    dtype = None
    for key, shape in shapes.items():
        a = tensors[key]
        if tuple(a.shape) != tuple(shape):
            hint = " (transposed)" if tuple(a.shape) == tuple(shape)[::-1] and len(shape) == 2 else ""
            raise error(where, key, f"shape {list(shape)}", f"{list(a.shape)}{hint}")
        name = np.dtype(a.dtype).name
        if name not in DTYPES:
            raise error(where, key, f"dtype one of {', '.join(DTYPES)}", name)
        if dtype is not None and name != dtype:
            raise error(where, key, f"dtype {dtype} like the other tensors", name)
        dtype = name
    for key in shapes:
        check_finite(where, key, tensors[key])
    return dtype


def check_finite(where: str | Path, key: str, a: np.ndarray) -> None:
    """Raise if `a` holds a NaN or an infinity, naming how many and the first index."""
    bad = ~np.isfinite(a)
    if bad.any():
        first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape)]
        raise error(where, key, "finite values", f"{int(bad.sum())} NaN/inf (first at {first})")


def to_numpy(params: SAEParams) -> dict[str, np.ndarray]:
    """Params as host numpy arrays, bit for bit, keyed by PARAM_NAMES."""
    return {name: np.asarray(jax.device_get(getattr(params, name))) for name in PARAM_NAMES}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> SAEParams:
    """Params from numpy arrays keyed by PARAM_NAMES, bit for bit."""
    return SAEParams(**{name: jnp.asarray(np.ascontiguousarray(arrays[name])) for name in PARAM_NAMES})


def transposed(a: np.ndarray) -> np.ndarray:
    """a.T as a fresh C-contiguous array (a copy in numpy, never through XLA)."""
    return np.ascontiguousarray(a.T)


def with_hook(where: str | Path, spec: SAESpec, hook_layer: int | None, hook_site: Site | None) -> SAESpec:
    """`spec` with the hook layer/site replaced where given."""
    changes = {k: v for k, v in (("hook_layer", hook_layer), ("hook_site", hook_site)) if v is not None}
    return make_spec(where, **{**dataclasses.asdict(spec), **changes})


def make_spec(where: str | Path, **fields) -> SAESpec:
    """SAESpec(**fields), with its ValueError turned into a one-line SAEFormatError naming `where`."""
    try:
        return SAESpec(**fields)
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: an integer no float can hold
        raise SAEFormatError(f"{where}: {e}") from None


def check_sae(sae: SAE, where: str | Path) -> None:
    """An in-memory SAE about to be written: shapes match its spec, dtype is spec.dtype, values finite."""
    arrays = to_numpy(sae.params)
    for name, a in arrays.items():
        if np.dtype(a.dtype).name != sae.spec.dtype:
            raise error(where, name, f"dtype {sae.spec.dtype} (spec.dtype; use sae_jax.sae.cast)", np.dtype(a.dtype).name)
    check_tensors(where, arrays, sae.spec.shapes())


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or a one-line SAEFormatError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise SAEFormatError(f"{path}: unreadable JSON ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise error(path, "top level", "a JSON object", type(raw).__name__)
    return raw
