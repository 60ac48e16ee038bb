"""SAELens folders: `cfg.json` plus `sae_weights.safetensors` (`W_enc [D, N]`, `b_enc`, `W_dec [N, D]`, `b_dec`).

Read: architecture "standard" is our relu, "topk" our topk (k from `k`, or
from `activation_fn_kwargs` in configs before v6). `apply_b_dec_to_input: true`
(SAELens's default) means `f = act((x - b_dec) @ W_enc + b_enc)`; it is folded
into the encoder bias, `b_enc' = b_enc - b_dec @ W_enc`, the same function in
exact arithmetic. The folded bias is computed in float32 and a bfloat16/float16
SAE is widened to float32 for it, since rounding b_enc' back would change the
function (a zero b_dec needs no fold and keeps the stored dtype). Anything
else that changes the math (JumpReLU, gated, activation normalization,
hook_z reshaping, decoder-norm rescaled top-k) is refused.

Write: v6 layout, `apply_b_dec_to_input: false`, `normalize_activations: "none"`,
`hook_name` at the top level (pre-v6 readers) and in `metadata` (v6).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sae_jax.formats.common import SAEFormatError, check_finite, check_tensors, error, first_line, from_numpy, make_spec, read_json_object, to_numpy
from sae_jax.formats.tensorfile import read_tensors, write_tensors
from sae_jax.sae import SAE, SAESpec, Site

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
_ARCHITECTURES = {"standard": "relu", "topk": "topk"}
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")
_SITE = {"pre": "input", "post": "output"}
# cfg fields that change the math, and the values we can reproduce
_MUST_BE = {
    "normalize_activations": ("none", None),
    "reshape_activations": ("none", None),
    "rescale_acts_by_decoder_norm": (False, None),
    "finetuning_scaling_factor": (False, None),
    "hook_head_index": (None,),
}


def hook_name(spec: SAESpec) -> str:
    """SAELens's name of the spec's site: the input of block L is `blocks.L.hook_resid_pre`."""
    return f"blocks.{spec.hook_layer}.hook_resid_{'pre' if spec.hook_site == 'input' else 'post'}"


def parse_hook_name(name: str) -> tuple[int, Site] | None:
    """`blocks.L.hook_resid_pre|post` -> (L, "input"|"output"); None for any other hook."""
    m = _HOOK.fullmatch(name) if isinstance(name, str) else None
    return (int(m.group(1)), _SITE[m.group(2)]) if m else None


def load_saelens(folder: Path, hook_layer: int | None = None, hook_site: Site | None = None) -> SAE:
    """A SAELens folder -> SAE in the stored dtype (float32 if b_dec had to be folded)."""
    cfg_path = folder / CFG
    cfg = read_json_object(cfg_path)
    architecture, k = _architecture(cfg_path, cfg)
    meta = _metadata(cfg)
    for key, allowed in _MUST_BE.items():
        value = cfg.get(key, meta.get(key))
        if value not in allowed:
            raise error(cfg_path, key, " or ".join(json.dumps(v) for v in allowed), json.dumps(value))
    D, N = (_int_field(cfg_path, cfg, key) for key in ("d_in", "d_sae"))
    layer, site = _hook(cfg_path, cfg, hook_layer, hook_site)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise error(folder, WEIGHTS, "a file beside cfg.json", "none")
    arrays = read_tensors(weights)
    dtype = check_tensors(weights, arrays, {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)})
    if cfg.get("apply_b_dec_to_input", True) and np.any(arrays["b_dec"] != 0):
        arrays, dtype = _fold_b_dec(arrays), "float32"
        check_finite(weights, "b_enc - b_dec @ W_enc (folding apply_b_dec_to_input)", arrays["b_enc"])
    spec = make_spec(
        cfg_path, architecture=architecture, d_in=D, n_latents=N, k=k,
        hook_layer=layer, hook_site=site, dtype=dtype, source=str(folder),
    )
    return SAE(from_numpy(arrays), spec)


def write_saelens(sae: SAE, folder: Path, metadata: Mapping[str, object] | None = None) -> None:
    """Write `cfg.json` and `sae_weights.safetensors` into the existing empty `folder`."""
    spec = sae.spec
    meta = {**(metadata or {}), "hook_name": hook_name(spec)}
    cfg = {
        "architecture": "standard" if spec.architecture == "relu" else "topk",
        "d_in": spec.d_in,
        "d_sae": spec.n_latents,
        **({"k": spec.k} if spec.architecture == "topk" else {}),
        "dtype": spec.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name": meta["hook_name"],
        "metadata": meta,
    }
    write_tensors(folder / WEIGHTS, to_numpy(sae.params), "safetensors")
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def _architecture(path: Path, cfg: dict) -> tuple[str, int | None]:
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if arch == "standard" and fn == "topk":  # pre-v6 spelling of a top-k SAE
        kwargs = cfg.get("activation_fn_kwargs")
        arch, cfg = "topk", {"k": kwargs.get("k") if isinstance(kwargs, dict) else None}
    elif fn not in ("relu", "topk"):
        raise error(path, "activation_fn_str", '"relu" or "topk"', json.dumps(fn))
    if not isinstance(arch, str) or arch not in _ARCHITECTURES:  # a list or object is no key of a dict
        raise error(path, "architecture", '"standard" or "topk" (sae-jax has relu and topk SAEs only)', json.dumps(arch))
    if arch == "topk":
        return "topk", _int_field(path, cfg, "k")
    return "relu", None


def _int_field(path: Path, cfg: dict, key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise error(path, key, "a positive integer", json.dumps(value))
    return value


def _hook(path: Path, cfg: dict, hook_layer: int | None, hook_site: Site | None) -> tuple[int, Site]:
    """The (layer, site) from `hook_name` (in `metadata` since v6), overridden where given."""
    name = _metadata(cfg).get("hook_name") or cfg.get("hook_name")
    if hook_layer is not None and hook_site is not None:
        return hook_layer, hook_site
    parsed = parse_hook_name(name)
    if parsed is None:
        raise error(path, "hook_name", '"blocks.L.hook_resid_pre" or "blocks.L.hook_resid_post" (or pass hook_layer and hook_site)', json.dumps(name))
    return (hook_layer if hook_layer is not None else parsed[0]), (hook_site or parsed[1])


def _metadata(cfg: dict) -> dict:
    """v6 keeps model_name, hook_name... in `metadata` (`meta` in some 6.x); older configs at the top level."""
    meta = cfg.get("metadata", cfg.get("meta"))
    return meta if isinstance(meta, dict) else {}


def _fold_b_dec(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fold `x - b_dec` into the encoder bias; every array widened to float32 (exact)."""
    a = {k: v.astype(np.float32) for k, v in a.items()}
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by check_finite
        return {**a, "b_enc": (a["b_enc"] - a["b_dec"] @ a["W_enc"]).astype(np.float32)}
