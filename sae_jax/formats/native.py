"""Our own format: a directory with `spec.json` and `params/`, an orbax checkpoint.

`spec.json` holds every SAESpec field plus `format_version` (`metadata` as a
JSON object); `params/` holds `{W_enc, b_enc, W_dec, b_dec}` (jumprelu adds
`threshold`) in `spec.dtype`. The spec is kept as is, `input_scale` and
`apply_b_dec_to_input` included: the SAE still takes raw activations, and the
scale is folded only when exporting to formats that cannot record it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sae_jax.checkpoint import largest_leaf_bytes, one_leaf_at_a_time
from sae_jax.formats.common import (
    SAEFormatError,
    check_finite,
    error,
    first_line,
    make_spec,
    metadata_of,
    metadata_text,
    read_json_object,
    with_hook,
)
from sae_jax.sae import SAE, SAEParams, SAESpec, Site

SPEC = "spec.json"
PARAMS = "params"
FORMAT_VERSION = 1
_FIELDS = {f.name for f in dataclasses.fields(SAESpec)}


def write_jax(sae: SAE, folder: Path) -> None:
    """Write `spec.json` and `params/` into the existing empty `folder`."""
    spec = {"format_version": FORMAT_VERSION, **dataclasses.asdict(sae.spec), "metadata": metadata_of(sae.spec)}
    (folder / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    params = {name: getattr(sae.params, name) for name in sae.spec.shapes()}
    # This process alone writes (process 0 of a multi-process run): orbax must not wait for the others.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    one_leaf = one_leaf_at_a_time(largest_leaf_bytes(params))
    with ocp.StandardCheckpointer(multiprocessing_options=alone, **one_leaf) as ckptr:  # leaving waits for the write
        ckptr.save((folder / PARAMS).absolute(), params)


def load_jax(folder: Path, hook_layer: int | None = None, hook_site: Site | None = None) -> SAE:
    """A directory written by write_jax -> SAE exactly as saved (hook replaced where given)."""
    spec = _read_spec(folder / SPEC)
    if not spec.source:
        spec = dataclasses.replace(spec, source=str(folder))
    spec = with_hook(folder / SPEC, spec, hook_layer, hook_site)
    params_dir = (folder / PARAMS).absolute()
    if not params_dir.is_dir():
        raise error(folder, PARAMS, "an orbax checkpoint directory", "none")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            stored = ckptr.metadata(params_dir).item_metadata
            if stored is None:
                raise SAEFormatError(
                    f"{params_dir}: unreadable orbax checkpoint (its array metadata is missing or damaged)"
                )
            _check_stored(params_dir, stored.tree, spec)
            target = {n: jax.ShapeDtypeStruct(s, jnp.dtype(spec.dtype)) for n, s in spec.shapes().items()}
            restored = ckptr.restore(params_dir, target)
    except SAEFormatError:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for damaged checkpoints
        raise SAEFormatError(f"{params_dir}: unreadable orbax checkpoint ({first_line(e)})") from None
    for name in spec.shapes():
        check_finite(params_dir, name, jax.device_get(restored[name]))
    return SAE(SAEParams(**{n: restored[n] for n in spec.shapes()}), spec)


def _read_spec(path: Path) -> SAESpec:
    raw = read_json_object(path)
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION or type(version) is not int:
        raise error(path, "format_version", str(FORMAT_VERSION), json.dumps(version))
    for key, value in raw.items():
        if key not in _FIELDS:
            raise error(path, key, f"only SAESpec fields {sorted(_FIELDS)}", f"extra key {key!r}")
        expected, ok = _JSON_TYPES[key]
        is_bool = expected is bool  # JSON true is no layer, and 1 is no flag
        if isinstance(value, bool) != is_bool or not isinstance(value, expected) or not ok(value):
            raise error(path, key, _JSON_TYPE_NAMES[key], json.dumps(value)[:80])
    for key in ("architecture", "d_in", "n_latents"):  # SAESpec has no default for these
        if key not in raw:
            raise error(path, key, _JSON_TYPE_NAMES[key], "the key missing")
    if "input_scale" in raw:
        raw["input_scale"] = float(raw["input_scale"])
    if "metadata" in raw:
        raw["metadata"] = metadata_text(path, raw["metadata"])
    return make_spec(path, **raw)


# What spec.json may hold for each SAESpec field (SAESpec itself checks the values it can).
_ANY = lambda v: True
_JSON_TYPES = {
    "architecture": (str, _ANY),
    "d_in": (int, _ANY),
    "n_latents": (int, _ANY),
    "k": ((int, type(None)), _ANY),
    "hook_layer": (int, lambda v: v >= 0),
    "hook_site": (str, _ANY),
    "dtype": (str, _ANY),
    "input_scale": ((int, float), lambda v: abs(v) < 1e300),
    "source": (str, _ANY),
    "apply_b_dec_to_input": (bool, _ANY),
    "metadata": (dict, _ANY),
}
_JSON_TYPE_NAMES = {
    "architecture": "a string",
    "d_in": "an integer",
    "n_latents": "an integer",
    "k": "an integer or null",
    "hook_layer": "an integer >= 0",
    "hook_site": "a string",
    "dtype": "a string",
    "input_scale": "a finite number",
    "source": "a string",
    "apply_b_dec_to_input": "true or false",
    "metadata": "a JSON object",
}


def _check_stored(params_dir: Path, stored: dict, spec: SAESpec) -> None:
    """Compare the checkpoint's own metadata with the spec before orbax casts or pads anything."""
    shapes = spec.shapes()
    for name in [*shapes, *sorted(set(stored) - set(shapes))]:
        if name not in stored or name not in shapes:
            raise error(params_dir, name, f"arrays {sorted(shapes)}", f"arrays {sorted(stored)}")
        found_shape, found_dtype = tuple(stored[name].shape), jnp.dtype(stored[name].dtype).name
        if found_shape != shapes[name]:
            raise error(params_dir, name, f"shape {list(shapes[name])} from {SPEC}", list(found_shape))
        if found_dtype != spec.dtype:
            raise error(params_dir, name, f"dtype {spec.dtype} from {SPEC}", found_dtype)


def quiet_orbax() -> None:
    """For entry points: keep orbax's noise off stderr, so an error stays one line.

    Process-wide. Silences orbax's absl warnings and errors (a failed async save
    logs its whole traceback there; the entry point reports the failure itself
    in one line) and asyncio's "Task exception was never retrieved" for the
    reads a failed restore abandons. Drops the unraisable exceptions a failed
    restore leaves behind: "Event loop is closed" from tensorstore's late
    callbacks, and the errors of orbax's abandoned read coroutines. Other
    unraisables still print.
    """
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    default = sys.unraisablehook

    def hook(u):
        late = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        abandoned = f"{os.sep}orbax{os.sep}" in getattr(getattr(u.object, "cr_code", None), "co_filename", "")
        if not (late or abandoned):
            default(u)

    sys.unraisablehook = hook
