"""Parity of sae_jax.llama against transformers' PyTorch LlamaForCausalLM on the same folder.

Reference: `LlamaForCausalLM.from_pretrained(folder, dtype=float32,
attn_implementation="eager")`, i.e. the bf16 checkpoint upcast to float32.
Tolerance: relative error (max abs difference over max abs reference) <= TOL
= 1e-4 in float32; llama_helpers.TOL says why.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_helpers import TOL, rel_err, tiny, token_batch, torch_reference

from sae_jax.llama import load, load_config, logits, residual

B, T, V = 2, 17, 512
LAYERS = (0, 1, 5, 9, 11)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(folder):
    return load(folder)


@pytest.fixture(scope="module")
def ids():
    return token_batch(0, B, T, V)


def padding_mask(kind: str) -> np.ndarray:
    """[B, T] 0/1: row 0 padded by 5, row 1 by 3, on the `kind` side."""
    m = np.ones((B, T), np.int32)
    if kind == "left":
        m[0, :5], m[1, :3] = 0, 0
    else:
        m[0, -5:], m[1, -3:] = 0, 0
    return m


def assert_parity(model, folder, ids, mask=None, positions=None, tol=TOL) -> dict[str, float]:
    """Compare residuals at LAYERS (input and output) and logits with transformers; return the errors."""
    hs, last_out, ref_logits = torch_reference(folder, ids, mask, positions)
    keep = None if mask is None else mask.astype(bool)
    L = model.config.num_layers
    errs = {}
    for layer in LAYERS:
        errs[f"in{layer}"] = rel_err(residual(model, ids, layer, "input", mask, positions), hs[layer], keep)
        out = residual(model, ids, layer, "output", mask, positions)
        errs[f"out{layer}"] = rel_err(out, hs[layer + 1] if layer < L - 1 else last_out, keep)
    # transformers' last hidden state is the final-normed output of the last layer.
    errs["normed"] = rel_err(model.norm(residual(model, ids, L - 1, "output", mask, positions)), hs[L], keep)
    errs["logits"] = rel_err(logits(model, ids, mask, positions), ref_logits, keep)
    assert max(errs.values()) <= tol, errs
    return errs


def test_residuals_and_logits_match_transformers(model, folder, ids):
    errs = assert_parity(model, folder, ids)
    assert len(errs) == 2 * len(LAYERS) + 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers_on_real_tokens(model, folder, ids, side):
    mask = padding_mask(side)
    assert_parity(model, folder, ids, mask)
    # The comparison can see the mask: ignoring it moves real tokens of left-padded rows far past TOL.
    if side == "left":
        hs, _, _ = torch_reference(folder, ids, mask)
        assert rel_err(residual(model, ids, 9, "input"), hs[9], mask.astype(bool)) > 100 * TOL


def test_left_padding_positions_count_pads_like_transformers(model, ids):
    """transformers 5 numbers every row 0..T-1 when given no position_ids; so do we.

    Counting from each row's first real token instead shifts a row's positions
    uniformly, and rope only sees differences, so it changes nothing past rounding.
    """
    mask = padding_mask("left")
    default = residual(model, ids, 9, "input", mask)
    explicit = residual(model, ids, 9, "input", mask, np.broadcast_to(np.arange(T), (B, T)))
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))
    shifted = residual(model, ids, 9, "input", mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    assert rel_err(shifted, default, mask.astype(bool)) <= TOL


def test_far_positions_match_transformers(model, folder, ids):
    """Positions near 9000, where float32 angles round coarsely: both sides must round alike."""
    positions = np.broadcast_to(9000 + np.arange(T), (B, T)).astype(np.int64)
    assert_parity(model, folder, ids, positions=positions)


def test_parity_sees_llama3_rope_scaling(tmp_path, folder, ids):
    """The same weights with plain rope miss the reference by far more than TOL, so the parity tests check the scaling."""
    plain = tiny(tmp_path / "plain")
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (plain / "config.json").write_text(json.dumps(cfg))
    hs, _, _ = torch_reference(folder, ids)
    assert rel_err(residual(load(plain), ids, 9), hs[9]) > 10 * TOL


def test_old_format_config_matches(tmp_path, model, ids):
    old = tiny(tmp_path / "old", old_format=True)
    assert load_config(old) == model.config
    assert_parity(load(old), old, ids)


def test_float32_checkpoint_matches(tmp_path, ids):
    folder = tiny(tmp_path / "f32", dtype="float32")
    m = load(folder)
    assert m.layers[0].attn.q[...].dtype == jnp.float32
    assert_parity(m, folder, ids)


def test_bfloat16_weights_stay_bfloat16(model):
    dtypes = {v.dtype for _, v in jax.tree_util.tree_leaves_with_path(model)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_compute_is_as_close_as_transformers_bfloat16(folder, ids):
    """bf16 compute against the float32 reference errs about as much as transformers' own bf16 forward (~5e-2 here)."""
    import torch
    from transformers import LlamaForCausalLM

    hs, _, ref_logits = torch_reference(folder, ids)
    theirs = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
    with torch.no_grad():
        out = theirs(torch.as_tensor(ids), output_hidden_states=True)
    m = load(folder, dtype="bfloat16")
    x, y = residual(m, ids, 9), logits(m, ids)
    assert (x.dtype, y.dtype) == (jnp.bfloat16, jnp.float32)
    assert rel_err(x, hs[9]) <= 1.5 * rel_err(out.hidden_states[9].float().numpy(), hs[9])
    assert rel_err(y, ref_logits) <= 1.5 * rel_err(out.logits.float().numpy(), ref_logits)


def test_jitted_residual_equals_eager(model, ids):
    mask = padding_mask("left")
    fn = jax.jit(residual, static_argnames=("layer", "site"))
    for layer, site in [(9, "input"), (9, "output"), (0, "input")]:
        eager = residual(model, ids, layer, site, mask)
        jitted = fn(model, jnp.asarray(ids), layer, site, jnp.asarray(mask))
        assert jitted.shape == (B, T, model.config.hidden_size)
        assert rel_err(jitted, eager) <= 1e-5


def test_untied_checkpoint_matches(tmp_path, ids):
    folder = tiny(tmp_path / "untied", tie_word_embeddings=False)
    m = load(folder)
    assert m.lm_head is not None
    assert_parity(m, folder, ids)
