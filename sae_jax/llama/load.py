"""Build a `Llama` from a Hugging Face folder: `config.json` plus `model.safetensors`
(or a sharded `model.safetensors.index.json`), read with safetensors' numpy
loader, no torch.

Every tensor is checked against `weight_table` before any is read: a missing
key, an unexpected key or a shape that contradicts the config is a one-line
`LlamaLoadError` naming the file, the key, the expected and the found.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from sae_jax.llama.config import LlamaLoadError, dtype_name, load_config
from sae_jax.llama.model import COMPUTE_DTYPES, Llama
from sae_jax.llama.weights import WeightSpec, weight_table

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "BF16", "F16")


def tensor_files(folder: Path) -> tuple[dict[str, Path], Path]:
    """(key -> the safetensors file holding it, the file that lists the keys)."""
    if (folder / SINGLE).is_file():
        with safe_open(folder / SINGLE, framework="numpy") as f:
            return {k: folder / SINGLE for k in f.keys()}, folder / SINGLE
    if not (folder / INDEX).is_file():
        raise LlamaLoadError(f"{folder}: no {SINGLE} or {INDEX}")
    try:
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LlamaLoadError(f"{folder / INDEX}: expected JSON with a 'weight_map' object") from None
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise LlamaLoadError(f"{folder / INDEX}: shard {shard!r}: no such file in {folder}")
    return {k: folder / shard for k, shard in weight_map.items()}, folder / INDEX


def _header(files: dict[str, Path], listing: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype), read from the file headers only."""
    out = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="numpy") as f:
            present = set(f.keys())
            for key in (k for k, v in files.items() if v == file):
                if key not in present:
                    raise LlamaLoadError(f"{file}: missing tensor {key!r} (listed in {listing.name})")
                s = f.get_slice(key)
                out[key] = (tuple(s.get_shape()), s.get_dtype())
    return out


def check_tensors(table: dict[str, WeightSpec], files: dict[str, Path], listing: Path) -> None:
    """Raise a one-line LlamaLoadError for the first missing, unexpected, misshapen or non-float tensor."""
    found = _header(files, listing)
    problems = []
    for key, spec in table.items():
        if key not in found:
            problems.append(f"{listing}: missing tensor {key!r}: expected shape {list(spec.shape)}, found none")
        elif found[key][0] != spec.shape:
            problems.append(
                f"{files[key]}: tensor {key!r}: expected shape {list(spec.shape)} from config.json, "
                f"found {list(found[key][0])}"
            )
        elif found[key][1] not in FLOAT_DTYPES:
            problems.append(
                f"{files[key]}: tensor {key!r}: expected dtype one of {FLOAT_DTYPES}, found {found[key][1]}"
            )
    for key in found.keys() - table.keys():
        tied = " (config.json has tie_word_embeddings=true)" if key == "lm_head.weight" else ""
        problems.append(
            f"{files[key]}: unexpected tensor {key!r} with shape {list(found[key][0])}: expected none{tied}"
        )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise LlamaLoadError(problems[0] + more)


def param_at(model: Llama, path: tuple) -> nnx.Param:
    node = model
    for step in path:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    return node


def load(path: str | Path, dtype="float32") -> Llama:
    """The Llama in HF folder `path`, computing in `dtype` (float32 or bfloat16: a string, numpy or JAX dtype).

    Weights are kept as stored.
    """
    dtype = dtype_name(dtype, COMPUTE_DTYPES)  # before any file is read
    folder = Path(path)
    cfg = load_config(folder)
    table = weight_table(cfg)
    files, listing = tensor_files(folder)
    check_tensors(table, files, listing)
    # Abstract init: the module tree without allocating weights that would be overwritten.
    model = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=None))
    _check_table_covers(model, table)
    for file in sorted(set(files.values())):
        with safe_open(file, framework="numpy") as f:
            for key in (k for k in table if files[k] == file):
                param_at(model, table[key].path).set_value(jnp.asarray(f.get_tensor(key)))
    return model


def _check_table_covers(model: Llama, table: dict[str, WeightSpec]) -> None:
    """The table and the module agree on every parameter and its shape (a bug here is ours, not the file's)."""
    params = {path: v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    specs = {spec.path: spec.shape for spec in table.values()}
    assert params == specs, f"weight_table and Llama disagree: {set(params.items()) ^ set(specs.items())}"
