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
import ml_dtypes
import numpy as np

from sae_jax import typed
from sae_jax.errors import SAEFormatError, cause, error, first_line  # noqa: F401 (re-exported)
from sae_jax.sae import DTYPES, SAE, SAEParams, SAESpec, Site

PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")  # every architecture's; jumprelu adds "threshold"


def check_tensors(
    where: str | Path, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], float64: bool = False
) -> str:
    """Check keys, shapes, one supported dtype (float64 too where `float64`) and finite values; return its name."""
    accepted = DTYPES + ("float64",) if float64 else DTYPES
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
        if name not in accepted:
            raise error(where, key, f"dtype one of {', '.join(accepted)}", name)
        if dtype is not None and name != dtype:
            raise error(where, key, f"dtype {dtype} like the other tensors", name)
        dtype = name
    for key in shapes:
        check_finite(where, key, tensors[key])
    return dtype


def check_finite(where: str | Path, key: str, a: np.ndarray) -> None:
    """Raise if `a` holds a NaN or an infinity, naming how many and the first index."""
    if np.isfinite(a).all():  # one temporary the size of `a` in bools; the details only on failure
        return
    bad = ~np.isfinite(a)
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape)]
    raise error(where, key, "finite values", f"{int(bad.sum())} NaN/inf (first at {first})")


def to_numpy(params: SAEParams) -> dict[str, np.ndarray]:
    """Params as host numpy arrays, bit for bit, keyed by PARAM_NAMES (and "threshold" where there is one)."""
    names = PARAM_NAMES if params.threshold is None else (*PARAM_NAMES, "threshold")
    return {name: np.asarray(jax.device_get(getattr(params, name))) for name in names}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> SAEParams:
    """Params from numpy arrays keyed by PARAM_NAMES (and "threshold" where there is one), bit for bit."""
    names = [n for n in (*PARAM_NAMES, "threshold") if n in arrays]
    return SAEParams(**{name: jnp.asarray(np.ascontiguousarray(arrays[name])) for name in names})


def dtype_name(dtype, where: str | Path = "dtype") -> str:
    """ "float32", "bfloat16" or "float16" from a string, numpy or JAX dtype; else a one-line SAEFormatError."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in DTYPES:
        raise error(where, "dtype", f"one of {', '.join(DTYPES)} (a string, numpy or JAX dtype)", name)
    return name


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a DTYPES name (bfloat16 through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def widened(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every array in float64: exact for all of DTYPES, so folds below round only once, at the end."""
    return {k: np.asarray(v).astype(np.float64) for k, v in arrays.items()}


def rounded(where: str | Path, a64: Mapping[str, np.ndarray], dtype: str) -> tuple[dict[str, np.ndarray], bool]:
    """float64 arrays rounded once to `dtype`, checked finite; and whether every value came through unchanged."""
    out = {}
    with np.errstate(over="ignore"):  # an overflow is reported by check_finite
        for key, a in a64.items():
            out[key] = a.astype(np_dtype(dtype))
            check_finite(where, key, out[key])
    return out, all(np.array_equal(out[k].astype(np.float64), a) for k in out)


def narrowed(where: str | Path, a64: Mapping[str, np.ndarray], dtype: str) -> tuple[dict[str, np.ndarray], str]:
    """A read fold's float64 result in the stored `dtype` where that holds it exactly, else in float32
    (one rounding): a bfloat16 rounding of a folded weight would change which latents fire."""
    out, exact = rounded(where, a64, dtype)
    if exact or dtype == "float32":
        return out, dtype
    return rounded(where, a64, "float32")[0], "float32"


def fold_input_scale_exactly(a64: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """float64 params of raw activations: `input_scale` moved into W_enc (and out of W_dec, b_dec).

    With the pre-encoder bias the encoder sees `c x - b_dec = c (x - b_dec / c)`, so the same b_dec / c
    serves both sides; pre-activations, hence the threshold, are unchanged.
    """
    c = float(scale)
    return {**a64, "W_enc": a64["W_enc"] * c, "W_dec": a64["W_dec"] / c, "b_dec": a64["b_dec"] / c}


def fold_pre_bias(a64: dict[str, np.ndarray], sign: int = 1) -> dict[str, np.ndarray]:
    """float64 params: sign 1 removes the pre-encoder bias (`b_enc - b_dec @ W_enc`, for `x @ W_enc + b_enc'`);
    sign -1 adds one (`b_enc + b_dec @ W_enc`, for `(x - b_dec) @ W_enc + b_enc'`). The same function exactly."""
    return {**a64, "b_enc": a64["b_enc"] - sign * (a64["b_dec"] @ a64["W_enc"])}


def metadata_of(spec: SAESpec) -> dict:
    """spec.metadata as a dict (empty where there is none)."""
    return json.loads(spec.metadata) if spec.metadata else {}


def metadata_text(where: str | Path, meta: Mapping[str, object] | None) -> str:
    """A metadata mapping as SAESpec.metadata's JSON text ("" for none); non-JSON values refused in one line."""
    if not meta:
        return ""
    try:
        return json.dumps(dict(meta), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise error(where, "metadata", "JSON values", first_line(e)) from None


def transposed(a: np.ndarray, rows: int = 64) -> np.ndarray:
    """a.T [m, n] -> [n, m] as a fresh C-contiguous array: a copy in numpy, never through XLA (which flushes
    subnormals on the CPU), `rows` rows of `a` at a time (one strided copy of the release's 32768 x 2048 float32
    weight: 0.5-0.9 s, in blocks of 64 rows: 0.16 s)."""
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, a.shape[0], rows):
        out[:, i : i + rows] = a[i : i + rows].T
    return out


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
            raise error(
                where, name, f"dtype {sae.spec.dtype} (spec.dtype; use sae_jax.sae.cast)", np.dtype(a.dtype).name
            )
    check_tensors(where, arrays, sae.spec.shapes())


def positive_int(path: Path, cfg: dict, key: str) -> int:
    """cfg[key] as a positive integer (a whole float such as 2048.0 counts), or a one-line SAEFormatError."""
    value = cfg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise error(path, key, "a positive integer", json.dumps(value))
    return value


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or a one-line SAEFormatError naming the file."""
    return typed.read_json_object(path, SAEFormatError)
