"""One typed loader for every file sae-jax reads as plain data: config YAML, spec.json, SAELens and sparsify
cfg.json, a Llama's config.json.

`coerce(t, value, path, error)` turns a JSON/YAML value into the Python type `t` (a dataclass, Literal, union,
None, bool, int, float, list or str) or raises `error` with one line naming `path`, what was expected and what was
found; `from_dict` builds a dataclass, refusing unknown keys; `get` reads one key of a mapping.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from sae_jax.errors import choices, first_line

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3
_FLOAT_MAX = sys.float_info.max


def show(value) -> str:
    """repr(value), cut short: YAML aliases let a small file hold a value whose repr is gigabytes."""
    return _REPR.repr(value)


def plain(text) -> str:
    """`text` as is when it prints on one line, else its repr: a key holding a newline would split the error."""
    return text if isinstance(text, str) and text.isprintable() else show(text)


def type_name(t) -> str:
    if typing.get_origin(t) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(t))
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(t))
    return "null" if t is type(None) else getattr(t, "__name__", str(t))


def coerce(t, value, path: str, error: type[Exception] = ValueError):
    """`value` as type `t`, or `error` naming `path`. JSON's 32 is a float where a float is meant, never a bool."""
    origin = typing.get_origin(t)
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise error(f"{path}: expected a mapping, found {type(value).__name__} {show(value)}")
        return from_dict(t, value, path, error)
    if origin is Literal:
        if value not in typing.get_args(t):
            raise error(f"{path}: expected {type_name(t)}, found {show(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(t):
            try:
                return coerce(arg, value, path, error)
            except error:
                pass
        raise error(f"{path}: expected {type_name(t)}, found {type(value).__name__} {show(value)}")
    if t is type(None):
        if value is not None:
            raise error(f"{path}: expected null, found {show(value)}")
        return None
    if t is bool:
        if not isinstance(value, bool):
            raise error(f"{path}: expected true or false, found {type(value).__name__} {show(value)}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{path}: expected an integer, found {type(value).__name__} {show(value)}")
        return value
    if t is float:
        if isinstance(value, str):
            # PyYAML reads `1e-3` (no dot) as a string; researchers write it that way.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{path}: expected a number, found {type(value).__name__} {show(value)}")
        if isinstance(value, int) and abs(value) > _FLOAT_MAX or not math.isfinite(value):  # float(10**400) raises
            raise error(f"{path}: expected a finite number, found {show(value)}")
        return float(value)
    if t is list:
        if not isinstance(value, list):
            raise error(f"{path}: expected a list, found {type(value).__name__} {show(value)}")
        return list(value)
    if t is str:
        if not isinstance(value, str):
            raise error(f"{path}: expected a string, found {type(value).__name__} {show(value)}")
        return value
    raise TypeError(f"unsupported type {t} at {path}")


def from_dict(cls, data: dict, path: str = "", error: type[Exception] = ValueError):
    """Dataclass `cls` from a mapping; an unknown key (with the closest known one) or a wrong type raises `error`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in names:
            raise error(f"{prefix}{plain(key)}: unknown key; {choices(names, str(key))}")
    return cls(**{k: coerce(hints[k], v, f"{prefix}{k}", error) for k, v in data.items()})


MISSING: Any = dataclasses.MISSING


def get(data: dict, key: str, t, where: str, default: Any = MISSING, error: type[Exception] = ValueError):
    """`data[key]` as type `t`; a missing or null key is `default`, or `error` when there is none."""
    if data.get(key) is None:
        if default is MISSING:
            raise error(f"{where}: {key}: expected {type_name(t)}, found the key missing")
        return default
    return coerce(t, data[key], f"{where}: {key}", error)


def read_json_object(path: str | Path, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `path`, or `error` naming the file: unreadable, not JSON, or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        RecursionError,
    ) as e:  # RecursionError: nested too deeply
        raise error(f"{path}: unreadable JSON ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: top level: expected a JSON object, found {type(value).__name__}")
    return value
