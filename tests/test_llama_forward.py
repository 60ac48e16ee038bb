"""The one forward, `run_layers`: segments compose, an edit lands once at its site, the cache path is the plain
one; and the Llama's dtype arguments take strings, numpy and JAX dtypes alike."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from llama_helpers import token_batch
from safetensors import safe_open

from sae_jax.llama import Edit, load, logits, run_layers, write_tiny_checkpoint
from sae_jax.llama.model import KVCache, positions_and_mask

V, T = 64, 9


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fwd"), num_hidden_layers=4, vocab_size=V, init_std=0.2)


@pytest.fixture(scope="module")
def model(folder):
    return load(folder)


def add(p, x):
    return x + p


def test_segments_with_an_edit_compose_to_the_whole_forward(model):
    """The edit (at residual 2) at the end of the first segment, at the start of the second, inside the first."""
    graphdef, state = nnx.split(model)
    edit = Edit(jnp.full((64,), 3.0), 2, "input", add)

    @jax.jit
    def run(state, ids):
        m = nnx.merge(graphdef, state)
        positions, mask = positions_and_mask(ids.shape)
        out = []
        for cut, edited in ((2, 0), (2, 1), (3, 0)):
            x, _ = run_layers(m, m.embed_tokens(ids), positions, mask, 0, cut, edit=edit if edited == 0 else None)
            x, _ = run_layers(m, x, positions, mask, cut, 4, edit=edit if edited == 1 else None)
            out.append(m.head(x))
        return out, logits(m, ids, edit=edit), logits(m, ids)

    segments, whole, plain = run(state, jnp.asarray(token_batch(0, 2, T, V)))
    for got in segments:  # fp32 rounding only; an edit applied twice or not at all is off by > 1e-2
        np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    assert np.abs(whole - plain).max() > 1e-2  # the edit is live


def test_an_edit_outside_the_layers_run_is_refused(model):
    ids = token_batch(0, 1, T, V)
    positions, mask = positions_and_mask(ids.shape)
    with pytest.raises(ValueError, match=r"^edit: expected a site in residuals 0\.\.1 \(the layers run\), found 2$"):
        run_layers(model, model.embed_tokens(ids), positions, mask, 0, 1, edit=Edit(0.0, 1, "output", add))


def test_the_cached_forward_is_the_plain_forward(model):
    """Prefill T tokens into a 16-slot cache, then one more token; logits as without a cache (fp32 rounding only)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state, ids):
        m = nnx.merge(graphdef, state)
        cache, steps = KVCache.empty(m.config, 2, 16, m.dtype), []
        for start, stop in ((0, T), (T, T + 1)):
            tokens = ids[:, start:stop]
            cache, mask = cache.admit(jnp.ones(tokens.shape, bool))
            positions = jnp.broadcast_to(jnp.arange(start, stop), tokens.shape)
            x, cache = run_layers(m, m.embed_tokens(tokens), positions, mask, cache=cache)
            steps.append(m.head(x))
        return jnp.concatenate(steps, 1), logits(m, ids), cache

    cached, plain, cache = both(state, jnp.asarray(token_batch(1, 2, T + 1, V)))
    assert int(cache.index) == T + 1 and bool(cache.valid[:, : T + 1].all()) and not cache.valid[:, T + 1 :].any()
    np.testing.assert_allclose(cached, plain, rtol=0, atol=1e-5 * np.abs(plain).max())


@pytest.mark.parametrize(
    "dtype", ["bfloat16", jnp.bfloat16, ml_dtypes.bfloat16, np.dtype("float32"), jnp.float32, np.float32]
)
def test_load_takes_string_numpy_and_jax_dtypes(folder, dtype):
    assert load(folder, dtype=dtype).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype, found", [(np.float16, "'float16'"), ("fp32", "'fp32'"), (None, "None")])
def test_a_dtype_load_cannot_compute_in_is_a_one_line_error(folder, dtype, found):
    with pytest.raises(ValueError) as e:
        load(folder, dtype=dtype)
    assert str(e.value) == f"dtype: expected one of ('float32', 'bfloat16'), found {found}"


def test_tiny_checkpoints_take_numpy_dtypes(tmp_path):
    out = write_tiny_checkpoint(tmp_path, num_hidden_layers=1, vocab_size=V, dtype=np.float16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "F16"
