"""Steering: the edit is the notebook's recipe, alpha 0 is the plain model (and transformers), the site is honoured."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from llama_helpers import tiny
from sae_helpers import exact_sae

from sae_jax.llama import Edit, load, logits
from sae_jax.llama.generate import generate
from sae_jax.sae import SAE, SAESpec, decode, encode, init_params
from sae_jax.steer import steer, steering_edit

D, L, NEW = 64, 2, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("steer") / "tiny", num_hidden_layers=4)


@pytest.fixture(scope="module")
def model(folder):
    return load(folder)


@pytest.fixture(scope="module")
def sae():
    """A random SAE at the input of layer 2 with input_scale 2 (so raw and scaled units differ); biases make some latents fire."""
    spec = SAESpec("relu", D, 256, hook_layer=L, input_scale=2.0)
    p = init_params(jax.random.key(0), spec, dec_norm=1.0)
    p.b_enc = jax.random.normal(jax.random.key(1), (256,)) * 0.5
    return SAE(p, spec)


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(3).integers(1, 512, (1, 7)).astype(np.int32)


def test_add_edit_is_the_notebooks_encode_add_decode_add_error(sae):
    x = jax.random.normal(jax.random.key(2), (2, 5, D)) * 3
    f = encode(sae, x)
    recipe = decode(sae, f.at[..., 17].add(4.0)) + (x - decode(sae, f))
    np.testing.assert_allclose(steering_edit(sae, 17, 4.0)(x), recipe, rtol=0, atol=1e-5)
    assert np.array_equal(steering_edit(sae, 17, 0.0)(x), x)  # exactly the identity at alpha 0


def test_clamp_edit_sets_the_latent_then_adds_back_the_error(sae):
    x = jax.random.normal(jax.random.key(2), (2, 5, D)) * 3
    f = encode(sae, x)
    recipe = decode(sae, f.at[..., 17].set(4.0)) + (x - decode(sae, f))
    np.testing.assert_allclose(steering_edit(sae, 17, 4.0, "clamp")(x), recipe, rtol=0, atol=1e-5)


def test_alpha_zero_is_plain_greedy_which_is_transformers_greedy(model, folder, sae, prompt):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = m.generate(torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain = generate(model, prompt, NEW)
    np.testing.assert_array_equal(plain, ref[:, prompt.shape[1] :].numpy())
    np.testing.assert_array_equal(steer(model, sae, prompt, 17, 0.0, NEW), plain)


def test_steering_changes_the_text_and_the_cache_agrees_with_recomputation(model, sae, prompt):
    plain = generate(model, prompt, NEW)
    edit = steering_edit(sae, 17, 40.0)
    cached = generate(model, prompt, NEW, edit=edit)
    assert not np.array_equal(cached, plain)
    np.testing.assert_array_equal(cached, generate(model, prompt, NEW, edit=edit, use_cache=False))
    clamp = steering_edit(sae, 17, 40.0, "clamp")
    np.testing.assert_array_equal(
        generate(model, prompt, NEW, edit=clamp), generate(model, prompt, NEW, edit=clamp, use_cache=False)
    )


def test_the_output_of_layer_l_is_the_input_of_layer_l_plus_1_and_not_of_layer_l(model, prompt):
    add = lambda p, x: x + p
    v = jax.random.normal(jax.random.key(4), (D,)) * 10
    out_l = logits(model, prompt, edit=Edit(v, L, "output", add))
    np.testing.assert_array_equal(out_l, logits(model, prompt, edit=Edit(v, L + 1, "input", add)))
    assert np.abs(out_l - logits(model, prompt, edit=Edit(v, L, "input", add))).max() > 1e-2


def test_steering_reuses_the_compiled_steps_for_a_new_alpha_or_feature(model, sae, prompt):
    from sae_jax.llama.generate import _step

    steer(model, sae, prompt, 3, 1.0, 3)
    n = _step._cache_size()
    steer(model, sae, prompt, 9, -5.0, 3)
    assert _step._cache_size() == n


@pytest.mark.parametrize(
    "feature, mode, message",
    [
        (256, "add", "feature: expected an id in 0..255 (the SAE has 256 latents), found 256"),
        (-1, "add", "feature: expected an id in 0..255 (the SAE has 256 latents), found -1"),
        (3, "scale", "mode: expected one of ('add', 'clamp'), found 'scale'"),
    ],
)
def test_bad_feature_or_mode_is_a_one_line_error(model, sae, prompt, feature, mode, message):
    with pytest.raises(ValueError) as e:
        steer(model, sae, prompt, feature, 1.0, 2, mode=mode)
    assert str(e.value) == message


def test_an_sae_of_another_width_is_refused(model, prompt):
    with pytest.raises(ValueError, match="^SAE: width d_in expected the model's hidden size 64, found 32$"):
        steer(model, exact_sae(32, L), prompt, 0, 1.0, 2)
