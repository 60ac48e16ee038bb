"""EleutherAI sparsify both ways, against the real `eai-sparsify` package (the test extra pins it).

Reference: sparsify's `SparseCoder.encode` / `decode` on CPU in float32. Tolerance
1e-5 of the largest value: two float32 matmul orders over D=16 terms, plus one
float32 rounding where b_dec @ W_enc is folded into the encoder bias on export.
b_dec holds ±1000 entries (the residual stream's massive dimensions).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from sparsify import SparseCoder

from sae_jax.formats import SAEFormatError, detect_format, load_sae, save_sae
from sae_jax.formats.common import metadata_of
from sae_jax.sae import SAE, SAEParams, SAESpec, decode, encode

D, N, K = 16, 64, 6


def sparsify():
    """The sparsify package, imported at first use: importing it takes about 2 s, which collecting this file on every
    xdist worker would otherwise cost each of them."""
    import sparsify

    return sparsify


def massive_b_dec(g: torch.Generator) -> torch.Tensor:
    b = torch.randn(D, generator=g)
    b[3], b[11] = 1000.0, -1000.0
    return b


def inputs(b_dec: torch.Tensor) -> np.ndarray:
    g = torch.Generator().manual_seed(1)
    return (b_dec.double() + torch.randn(32, D, generator=g, dtype=torch.float64)).float().numpy()


def coder(dtype=torch.float32, **cfg) -> SparseCoder:
    sc = sparsify().SparseCoder(D, sparsify().SparseCoderConfig(num_latents=N, k=K, **cfg), dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sc.encoder.bias.copy_(torch.randn(N, generator=g))
        sc.b_dec.copy_(massive_b_dec(g))
    return sc


def their_codes(sc: SparseCoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sparsify's codes scattered to [B, N] and its reconstruction [B, D], float64."""
    with torch.no_grad():
        acts, idx, _ = sc.encode(torch.from_numpy(x).to(sc.dtype))
        f = torch.zeros(len(x), N, dtype=torch.float64).scatter_(-1, idx, acts.double())
        return f.numpy(), sc.decode(acts, idx).double().numpy()


def float64_codes(sae: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A topk SAE's f and x_hat evaluated in float64 from its stored values (no input_scale)."""
    p = {k: np.asarray(getattr(sae.params, k), np.float64) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    pre = (x.astype(np.float64) - p["b_dec"] * sae.spec.apply_b_dec_to_input) @ p["W_enc"] + p["b_enc"]
    top = np.argsort(-pre, axis=-1)[:, :K]
    f = np.zeros_like(pre)
    np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    return f, f @ p["W_dec"] + p["b_dec"]


def assert_same_function(ours: SAE, sc: SparseCoder, x: np.ndarray, exact_reference: bool = False):
    """sparsify computes what `ours` computes in float32 (or, with `exact_reference`, in float64: without the
    pre-encoder bias, our float32 x @ W_enc + b_enc cancels terms of ~300 at the massive dimensions)."""
    if exact_reference:
        f, x_hat = float64_codes(ours, x)
    else:
        f = encode(ours, jnp.asarray(x))
        f, x_hat = np.asarray(f, np.float64), np.asarray(decode(ours, f), np.float64)
    f_ref, x_hat_ref = their_codes(sc, x)
    assert np.array_equal(f != 0, f_ref != 0), "different latents fire"
    for what, a, b in (("f", f, f_ref), ("x_hat", x_hat, x_hat_ref)):
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err <= 1e-5, f"{what}: max error {err:.2e} of the largest value"


def test_sparsify_folder_computes_here_what_sparsify_computes(tmp_path):
    sc = coder()
    sc.save_to_disk(tmp_path / "layers.8")
    ours = load_sae(tmp_path / "layers.8")
    s = ours.spec
    assert (s.architecture, s.k, s.d_in, s.n_latents, s.apply_b_dec_to_input) == ("topk", K, D, N, True)
    assert (s.hook_layer, s.hook_site, s.dtype) == (8, "output", "float32")  # layers.8: the output of layer 8
    assert_same_function(ours, sparsify().SparseCoder.load_from_disk(tmp_path / "layers.8"), inputs(sc.b_dec.detach()))


def test_sparsify_bfloat16_folder_keeps_its_dtype_and_bits(tmp_path):
    sc = coder(torch.bfloat16)
    sc.save_to_disk(tmp_path / "layers.3")
    ours = load_sae(tmp_path / "layers.3")
    assert ours.spec.dtype == "bfloat16"
    W_enc = sc.encoder.weight.detach().T.contiguous().view(torch.int16).numpy()
    assert np.array_equal(np.asarray(ours.params.W_enc).view(np.int16), W_enc)
    save_sae(ours, tmp_path / "out" / "layers.3", "sparsify")
    back = sparsify().SparseCoder.load_from_disk(tmp_path / "out" / "layers.3")
    for (name, a), b in zip(sc.state_dict().items(), back.state_dict().values()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16)), name


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_our_topk_sae_computes_in_sparsify_what_it_computes_here(tmp_path, apply_b_dec):
    g = torch.Generator().manual_seed(3)
    w = lambda *s: (torch.randn(*s, generator=g) * 0.3).numpy()
    meta = {"model_name": "meta-llama/Llama-3.2-1B-Instruct", "context_size": 1024}
    spec = SAESpec("topk", D, N, k=K, apply_b_dec_to_input=apply_b_dec, metadata=json.dumps(meta))
    W_enc, b_enc, W_dec, b_dec = w(D, N), w(N), w(N, D), massive_b_dec(g).numpy()
    if not apply_b_dec:  # pre-activations x @ W_enc + b_enc stay O(1) for x around b_dec
        b_enc = (b_enc - b_dec.astype(np.float64) @ W_enc).astype(np.float32)
    ours = SAE(SAEParams(*map(jnp.asarray, (W_enc, b_enc, W_dec, b_dec))), spec)
    save_sae(ours, tmp_path / "run" / "layers.8", "sparsify")
    sc = sparsify().SparseCoder.load_from_disk(tmp_path / "run" / "layers.8")
    assert (sc.cfg.k, sc.num_latents, sc.d_in) == (K, N, D)
    assert_same_function(ours, sc, inputs(torch.from_numpy(b_dec)), exact_reference=not apply_b_dec)
    back = load_sae(tmp_path / "run" / "layers.8")  # our site and metadata come back too (sparsify drops them)
    assert (back.spec.hook_layer, back.spec.hook_site) == (9, "input") and metadata_of(back.spec) == meta
    assert json.loads((tmp_path / "run" / "layers.8" / "cfg.json").read_text())["hookpoint"] == "layers.8"


def test_run_folder_metadata_and_detection(tmp_path):
    coder().save_to_disk(tmp_path / "run" / "layers.8")
    coder().save_to_disk(tmp_path / "run" / "layers.9")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "m", "dataset": "d", "ctx_len": 2048}))
    assert detect_format(tmp_path / "run" / "layers.8") == "sparsify"
    meta = metadata_of(load_sae(tmp_path / "run" / "layers.9").spec)
    assert meta == {"model_name": "m", "dataset_path": "d", "context_size": 2048}
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path / "run")
    assert str(e.value) == (
        f"{tmp_path / 'run'}: contents: expected one SAE; this is a sparsify run folder: "
        "pass one of its hookpoint folders, found layers.8, layers.9"
    )


@pytest.mark.parametrize(
    "cfg,key",
    [
        (dict(transcode=True), "transcode"),
        (dict(skip_connection=True), "skip_connection"),
        (dict(activation="groupmax"), "activation"),
    ],
)
def test_what_sae_jax_cannot_hold_is_refused_naming_sparsify(tmp_path, cfg, key):
    coder(**cfg).save_to_disk(tmp_path / "layers.8")
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path / "layers.8")
    msg = str(e.value)
    assert "\n" not in msg and "sparsify" in msg
    assert msg.startswith(f"{tmp_path / 'layers.8' / 'cfg.json'}: {key}: expected ")


def test_other_hookpoints_need_a_site_and_relu_is_not_written(tmp_path):
    coder().save_to_disk(tmp_path / "layers.8.mlp")
    with pytest.raises(
        SAEFormatError, match=r"hookpoint: expected a residual hookpoint folder.*found \"layers.8.mlp\""
    ):
        load_sae(tmp_path / "layers.8.mlp")
    assert load_sae(tmp_path / "layers.8.mlp", hook_layer=8, hook_site="output").spec.hook_layer == 8
    relu = SAE(SAEParams(jnp.zeros((D, N)), jnp.zeros(N), jnp.zeros((N, D)), jnp.zeros(D)), SAESpec("relu", D, N))
    with pytest.raises(SAEFormatError, match="architecture: expected topk for format sparsify"):
        save_sae(relu, tmp_path / "x", "sparsify")
