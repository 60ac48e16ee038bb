"""`residual` runs only the layers before its read: proven on the traced program and with poisoned weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llama_helpers import token_batch

from sae_jax.llama import load, residual, write_tiny_checkpoint
from sae_jax.llama.model import Block

DOTS_PER_LAYER = 9  # q, k, v, scores, weights@v, o, gate, up, down


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("t"), vocab_size=64))


def dot_count(fn, *args) -> int:
    return sum(e.primitive.name == "dot_general" for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns)


@pytest.mark.parametrize(
    "layer, site, layers_run", [(9, "input", 9), (9, "output", 10), (0, "input", 0), (11, "output", 12)]
)
def test_traced_program_holds_only_the_needed_layers(model, layer, site, layers_run):
    ids = jnp.asarray(token_batch(0, 2, 17, 64))
    assert dot_count(lambda m, i: residual(m, i, layer, site), model, ids) == DOTS_PER_LAYER * layers_run


def test_layer_calls_are_counted(model, monkeypatch):
    calls = []
    original = Block.__call__
    monkeypatch.setattr(Block, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    residual(model, token_batch(0, 2, 17, 64), 9)
    assert len(calls) == 9


def test_nan_weights_after_the_read_do_not_reach_it(model):
    ids = token_batch(0, 2, 17, 64)
    clean = np.asarray(residual(model, ids, 9))
    poisoned = jax.tree.map(lambda a: a, model)  # a copy with its own Params
    for block in poisoned.layers[9:]:
        block.attn.q[...] = jnp.full_like(block.attn.q[...], jnp.nan)
        block.mlp.down[...] = jnp.full_like(block.mlp.down[...], jnp.nan)
    assert np.isnan(np.asarray(residual(poisoned, ids, 10))).all()  # the poison is live
    got = np.asarray(residual(poisoned, ids, 9))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, clean)
