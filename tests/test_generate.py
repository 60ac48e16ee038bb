"""Greedy generation: the KV cache against full recomputation and against transformers' `generate`.

Reference: transformers' PyTorch `LlamaForCausalLM.from_pretrained(...).generate(do_sample=False)`
on the same tiny folder, in float32. Greedy tokens are compared exactly: both
sides compute in float32 from the same bf16 weights (logits agree to ~1e-6
relative, see llama_helpers.TOL) and init_std 0.2 makes the top two logits of
every step differ by far more than that (the test checks the smallest margin).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from llama_helpers import tiny

from sae_jax.llama import load, logits
from sae_jax.llama.generate import _step, cache_size, generate

NEW = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("gen") / "tiny", num_hidden_layers=4)


@pytest.fixture(scope="module")
def model(folder):
    return load(folder)


@pytest.fixture(scope="module")
def prompts():
    """[2, 9] ids and mask: row 0 nine tokens, row 1 six tokens left-padded with three pads (id 0)."""
    ids = np.random.default_rng(1).integers(1, 512, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def hf_tokens(folder, prompts):
    from transformers import LlamaForCausalLM

    ids, mask = prompts
    m = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        out = m.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def test_cached_greedy_equals_transformers_generate(model, prompts, hf_tokens):
    ids, mask = prompts
    ours = generate(model, ids, NEW, attention_mask=mask)
    assert ours.shape == (2, NEW)
    np.testing.assert_array_equal(ours, hf_tokens)


def test_cache_equals_recomputing_full_logits(model, prompts, hf_tokens):
    ids, mask = prompts
    np.testing.assert_array_equal(generate(model, ids, NEW, attention_mask=mask, use_cache=False), hf_tokens)


def test_greedy_margins_are_wide_enough_to_compare_exactly(model, prompts, hf_tokens):
    ids, mask = prompts
    seq = np.concatenate([ids, hf_tokens], 1)
    full = np.asarray(logits(model, jnp.asarray(seq[:1])))[0, ids.shape[1] - 1 : -1]  # row 0, each step's logits
    top2 = np.sort(full, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3 * np.abs(full).max()


def test_a_left_padded_row_generates_what_it_would_alone(model, prompts, hf_tokens):
    ids, _ = prompts
    np.testing.assert_array_equal(generate(model, ids[1:, 3:], NEW)[0], hf_tokens[1])


def test_eos_stops_a_row_and_pads_it(model, prompts, hf_tokens):
    ids, mask = prompts
    eos = int(hf_tokens[0, 2])  # row 0's third token
    assert eos not in hf_tokens[1] and eos not in hf_tokens[0, :2]
    out = generate(model, ids, NEW, attention_mask=mask, eos_ids=[eos], pad_id=7)
    np.testing.assert_array_equal(out[0], [*hf_tokens[0, :3], *[7] * (NEW - 3)])
    np.testing.assert_array_equal(out[1], hf_tokens[1])
    both = generate(model, ids[:1], NEW, eos_ids=[eos])
    np.testing.assert_array_equal(both, hf_tokens[:1, :3])  # every row stopped: generation ends early


def test_decode_step_compiles_once_per_cache_size(model, prompts):
    ids, mask = prompts
    generate(model, ids, 4, attention_mask=mask)
    before = _step._cache_size()
    other = np.random.default_rng(5).integers(1, 512, ids.shape).astype(np.int32)
    generate(model, other, 5, attention_mask=np.ones_like(other))  # same (B, T) and cache size: nothing new to compile
    assert _step._cache_size() == before
    assert cache_size(9 + 4) == cache_size(9 + 5) == 128 and cache_size(129) == 256


@pytest.mark.parametrize(
    "ids, mask, n, message",
    [
        (np.zeros((3,), np.int32), None, 2, "input_ids: expected shape [B, T] with T >= 1, found [3]"),
        (np.zeros((1, 4), np.int32), np.array([[1, 1, 1, 0]]), 2, "attention_mask: expected left padding"),
        (np.zeros((1, 4), np.int32), np.ones((1, 3)), 2, "attention_mask: expected shape [1, 4], found [1, 3]"),
        (np.zeros((1, 4), np.int32), None, 0, "max_new_tokens: expected >= 1, found 0"),
    ],
)
def test_bad_input_is_a_one_line_error(model, ids, mask, n, message):
    with pytest.raises(ValueError) as e:
        generate(model, ids, n, attention_mask=mask)
    assert message in str(e.value) and "\n" not in str(e.value)
