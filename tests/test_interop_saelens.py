"""SAELens both ways, against the real `sae_lens` package (the test extra pins it).

SAEs written by SAELens's own `save_model` / `save_inference_model` load here and
compute what `SAE.load_from_disk` computes; ours load there and compute what ours
do. Reference: SAELens's encode/decode in float32 (bfloat16 files are loaded by it
with dtype="float32", an exact widening). Tolerance 1e-5 of the largest value: two
float32 matmul orders over D=16 terms, plus at most one float32 rounding of a fold.
Residual streams have massive dimensions, so b_dec holds ±1000 entries and the
inputs sit around it: a pre-encoder bias folded into b_enc would fail these.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # importing sae_lens must not reach for the hub

import dataclasses
import importlib
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from sae_lens import SAE as LensSAE

from sae_jax.formats import SAEFormatError, load_sae, save_sae
from sae_jax.formats.common import metadata_of
from sae_jax.sae import SAE, SAEParams, SAESpec, decode, encode


def lens(module: str = ""):
    """sae_lens (or its submodule), imported at first use: importing it takes 3.4 s, which collecting this file on
    every xdist worker would otherwise cost each of them."""
    return importlib.import_module("sae_lens" + (f".{module}" if module else ""))


D, N, K = 16, 64, 6
META = {
    "model_name": "meta-llama/Llama-3.2-1B-Instruct",
    "hook_name": "blocks.9.hook_resid_pre",
    "context_size": 1024,
    "dataset_path": "lmsys/lmsys-chat-1m",
    "prepend_bos": False,
}


def massive_b_dec(g: torch.Generator) -> torch.Tensor:
    b = torch.randn(D, generator=g)
    b[3], b[11] = 1000.0, -1000.0  # the residual stream's massive dimensions
    return b


def inputs(b_dec: torch.Tensor, seed: int = 1) -> np.ndarray:
    """[32, D] activations around b_dec, as float32 (what both sides compute from)."""
    g = torch.Generator().manual_seed(seed)
    return (b_dec.double() + torch.randn(32, D, generator=g, dtype=torch.float64)).float().numpy()


def lens_sae(arch: str, dtype=torch.float32, seed: int = 0, apply_b_dec: bool = True, **cfg) -> LensSAE:
    """A SAELens inference SAE of `arch` with random weights (a random threshold / gate where it has one)."""
    cls, cfg_cls = lens().registry.get_sae_class(arch)
    meta = lens("saes.sae").SAEMetadata(**META)
    sae = cls(cfg_cls(d_in=D, d_sae=N, dtype="float32", apply_b_dec_to_input=apply_b_dec, metadata=meta, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W_") else 1.0))
        sae.b_dec.copy_(massive_b_dec(g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(N, generator=g) * 0.5)
    return sae.to(dtype=dtype)


def lens_codes(sae: LensSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's f [B, N] and x_hat = decode(f) [B, D], float64."""
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x).to(sae.dtype))
        return f.double().numpy(), sae.decode(f).double().numpy()


def our_codes(sae: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = encode(sae, jnp.asarray(x))
    return np.asarray(f, np.float64), np.asarray(decode(sae, f), np.float64)


def assert_close(ours, ref, what: str, rtol: float = 1e-5):
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    assert err <= rtol, f"{what}: max error {err:.2e} of the largest value"


def float64_codes(sae: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f and x_hat of our SAE evaluated in float64 from its stored values, input_scale and pre-encoder bias included."""
    p = {k: np.asarray(v, np.float64) for k, v in dataclasses.asdict(sae.params).items() if v is not None}
    c, spec = sae.spec.input_scale, sae.spec
    pre = (x.astype(np.float64) * c - p["b_dec"] * spec.apply_b_dec_to_input) @ p["W_enc"] + p["b_enc"]
    if spec.architecture == "relu":
        f = np.maximum(pre, 0)
    elif spec.architecture == "jumprelu":
        f = np.where(pre > p["threshold"], pre, 0)
    else:
        top = np.argsort(-pre, axis=-1)[:, : spec.k]
        f = np.zeros_like(pre)
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    return f, (f @ p["W_dec"] + p["b_dec"]) / c


def assert_same_function(ours: SAE, ref: LensSAE, x: np.ndarray):
    """SAELens computes what `ours` computes: in float32, or in float64 where `ours` has an input scale
    (our float32 `x * 2.5 - b_dec` cancels terms of ~2500 at the massive dimensions, 8e-6 off)."""
    f, x_hat = our_codes(ours, x) if ours.spec.input_scale == 1.0 else float64_codes(ours, x)
    f_ref, x_hat_ref = lens_codes(ref, x)
    assert (f_ref > 0).sum() >= len(x)  # something fires
    assert np.array_equal(f != 0, f_ref != 0), "different latents fire"
    assert_close(f, f_ref, "f")
    assert_close(x_hat, x_hat_ref, "x_hat")


CASES = {
    "standard": dict(arch="standard"),
    "standard-no-pre-bias": dict(arch="standard", apply_b_dec=False),
    "topk": dict(arch="topk", k=K),
    "topk-rescaled": dict(arch="topk", k=K, rescale_acts_by_decoder_norm=True),
    "jumprelu": dict(arch="jumprelu"),
    "gated": dict(arch="gated"),
}


@pytest.mark.parametrize("case", CASES)
def test_saelens_files_compute_here_what_saelens_computes(tmp_path, case):
    ref = lens_sae(**CASES[case])
    ref.save_model(tmp_path / "sl")
    ours = load_sae(tmp_path / "sl")
    assert (ours.spec.hook_layer, ours.spec.hook_site, ours.spec.dtype) == (9, "input", "float32")
    assert ours.spec.architecture == {"standard": "relu", "topk": "topk"}.get(CASES[case]["arch"], "jumprelu")
    assert ours.spec.apply_b_dec_to_input == CASES[case].get("apply_b_dec", True)
    assert_same_function(ours, lens().SAE.load_from_disk(tmp_path / "sl"), inputs(ref.b_dec.detach()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_saelens_bfloat16_and_float64_files(tmp_path, dtype):
    ref = lens_sae("topk", dtype=dtype, k=K)
    ref.save_model(tmp_path / "sl")
    ours = load_sae(tmp_path / "sl")
    assert ours.spec.dtype == ("bfloat16" if dtype == torch.bfloat16 else "float32")  # float64: one rounding
    wide = lens().SAE.load_from_disk(tmp_path / "sl", dtype="float32" if dtype == torch.bfloat16 else "float64")
    assert_same_function(ours, wide, inputs(ref.b_dec.detach().float()))


def test_batchtopk_saved_for_inference_as_jumprelu(tmp_path):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    train = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K, metadata=lens("saes.sae").SAEMetadata(**META))
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in train.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        train.b_dec.copy_(massive_b_dec(g))
        train.topk_threshold.fill_(0.4)
    train.save_inference_model(tmp_path / "sl")
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["architecture"] == "jumprelu"
    ours = load_sae(tmp_path / "sl")
    assert ours.spec.architecture == "jumprelu" and np.all(np.asarray(ours.params.threshold) == np.float32(0.4))
    assert_same_function(ours, lens().SAE.load_from_disk(tmp_path / "sl"), inputs(train.b_dec.detach()))


def our_sae(architecture: str, *, scale: float = 1.0, apply_b_dec: bool = True, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: (torch.randn(*s, generator=g) * 0.3).numpy()
    spec = SAESpec(
        architecture,
        D,
        N,
        k=K if architecture == "topk" else None,
        input_scale=scale,
        apply_b_dec_to_input=apply_b_dec,
        metadata=json.dumps(META),
    )
    params = SAEParams(
        jnp.asarray(w(D, N)),
        jnp.asarray(w(N) * 3),
        jnp.asarray(w(N, D)),
        jnp.asarray(massive_b_dec(g).numpy() * scale),
        jnp.asarray(np.abs(w(N))) if architecture == "jumprelu" else None,
    )
    return SAE(params, spec)


@pytest.mark.parametrize(
    "architecture,scale,apply_b_dec",
    [
        ("relu", 1.0, False),
        ("relu", 2.5, True),
        ("topk", 1.0, True),
        ("topk", 2.5, False),
        ("jumprelu", 2.5, True),
    ],
)
def test_our_saes_compute_in_saelens_what_they_compute_here(tmp_path, architecture, scale, apply_b_dec):
    ours = our_sae(architecture, scale=scale, apply_b_dec=apply_b_dec)
    save_sae(ours, tmp_path / "sl", "saelens")
    theirs = lens().SAE.load_from_disk(tmp_path / "sl")
    assert theirs.cfg.architecture() == {"relu": "standard"}.get(architecture, architecture)
    assert theirs.cfg.apply_b_dec_to_input == apply_b_dec
    assert {k: theirs.cfg.metadata[k] for k in META} == META  # read as a 6.x file: metadata kept
    assert_same_function(ours, theirs, inputs(torch.from_numpy(np.asarray(ours.params.b_dec)) / scale))


def test_metadata_survives_saelens_to_jax_to_saelens(tmp_path):
    ref = lens_sae("topk", k=K)
    ref.save_model(tmp_path / "sl")
    save_sae(load_sae(tmp_path / "sl"), tmp_path / "jax")
    written = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert metadata_of(load_sae(tmp_path / "jax").spec) == written
    save_sae(load_sae(tmp_path / "jax"), tmp_path / "back", "saelens")
    back = lens().SAE.load_from_disk(tmp_path / "back")
    assert back.cfg.metadata.to_dict() == ref.cfg.metadata.to_dict()  # sae_lens_version and all of META
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(ref, name)), name


def test_pre_6_0_spellings_read_as_saelens_reads_them(tmp_path):
    """hook_point, activation_fn_str + activation_fn_kwargs, normalize_activations false, an all-ones
    scaling_factor, no sae_lens_version: SAELens reads it, and so do we, to the same function."""
    g = torch.Generator().manual_seed(7)
    t = {
        "W_enc": torch.randn(D, N, generator=g) * 0.3,
        "b_enc": torch.randn(N, generator=g),
        "W_dec": torch.randn(N, D, generator=g) * 0.3,
        "b_dec": massive_b_dec(g),
        "scaling_factor": torch.ones(N),
    }
    (tmp_path / "old").mkdir()
    save_file(t, tmp_path / "old" / "sae_weights.safetensors")
    cfg = {
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "hook_point": "blocks.4.hook_resid_post",
        "hook_point_layer": 4,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
        "model_name": "gpt2",
        "context_size": 128,
        "finetuning_scaling_factor": False,
    }
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    ours, theirs = load_sae(tmp_path / "old"), lens().SAE.load_from_disk(tmp_path / "old")
    assert (ours.spec.architecture, ours.spec.k, ours.spec.hook_layer, ours.spec.hook_site) == ("topk", K, 4, "output")
    theirs_meta = theirs.cfg.metadata.to_dict()
    assert metadata_of(ours.spec) == {k: v for k, v in theirs_meta.items() if not k.startswith("sae_lens")}
    assert_same_function(ours, theirs, inputs(t["b_dec"]))


@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale", "expected_average_only_in"])
def test_normalization_saelens_applies_per_token_is_refused_naming_the_mode(tmp_path, mode):
    lens_sae("standard", normalize_activations=mode).save_model(tmp_path / "sl")
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path / "sl")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f'{tmp_path / "sl" / "cfg.json"}: normalize_activations: expected "none"')
    assert msg.endswith(f'found "{mode}"')


def test_bfloat16_export_with_a_scale_is_refused_not_rounded(tmp_path):
    ours = our_sae("topk", scale=2.5)
    bf16 = SAE(
        SAEParams(*(jnp.asarray(a, jnp.bfloat16) for a in dataclasses.astuple(ours.params)[:4])),
        dataclasses.replace(ours.spec, dtype="bfloat16"),
    )
    with pytest.raises(SAEFormatError) as e:
        save_sae(bf16, tmp_path / "sl", "saelens")
    assert str(e.value).startswith(f"{tmp_path / 'sl'}: input_scale: expected a fold bfloat16 holds exactly")
    assert str(e.value).endswith("found 2.5") and not (tmp_path / "sl").exists()
    save_sae(bf16, tmp_path / "sl", "saelens", dtype=jnp.float32)  # the remedy the message names
    theirs = lens().SAE.load_from_disk(tmp_path / "sl")
    assert theirs.cfg.dtype == "float32"
    assert_same_function(bf16, theirs, inputs(torch.from_numpy(np.asarray(ours.params.b_dec)) / 2.5))
