"""Loading HF folders: config parsing in both layouts, sharded files, and one-line errors naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from llama_helpers import token_batch
from safetensors.numpy import load_file, save_file

from sae_jax.llama import (
    Llama,
    LlamaConfig,
    LlamaLoadError,
    RopeScaling,
    load,
    load_config,
    logits,
    residual,
    write_tiny_checkpoint,
)
from sae_jax.llama.weights import weight_table

SMALL = dict(num_hidden_layers=2, vocab_size=64)  # errors need no depth or vocab


@pytest.fixture
def folder(tmp_path):
    return write_tiny_checkpoint(tmp_path / "m", **SMALL)


def rewrite(folder, edit):
    """Apply `edit` to the folder's tensor dict and save it back."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def one_line_error(folder, *needles):
    with pytest.raises(LlamaLoadError) as e:
        load(folder)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_config_both_layouts_parse_to_the_llama_3_2_facts(tmp_path):
    new = load_config(write_tiny_checkpoint(tmp_path / "new", **SMALL))
    old = load_config(write_tiny_checkpoint(tmp_path / "old", old_format=True, **SMALL))
    assert new == old == LlamaConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
        vocab_size=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True, max_position_embeddings=131072, dtype="bfloat16",
    )  # fmt: skip
    assert new.groups == 2
    assert hash(new) == hash(old)  # usable as a jit-static argument


def test_tied_checkpoint_has_no_lm_head_and_logits_use_the_embedding(folder):
    keys = load_file(folder / "model.safetensors").keys()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    m = load(folder)
    assert m.lm_head is None
    ids = token_batch(0, 2, 17, 64)
    x = m.norm(residual(m, ids, m.config.num_layers - 1, "output"))  # the last layer's output
    expected = np.asarray(x) @ np.asarray(m.embed[...], np.float32).T
    np.testing.assert_allclose(np.asarray(logits(m, ids)), expected, rtol=1e-5, atol=1e-6)


def test_untied_checkpoint_loads_lm_head(tmp_path):
    m = load(write_tiny_checkpoint(tmp_path / "u", tie_word_embeddings=False, **SMALL))
    assert m.lm_head is not None and m.lm_head[...].shape == (64, 64)


def test_weight_table_is_exactly_the_model_parameters():
    cfg = LlamaConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, vocab_size=64, tie_word_embeddings=False)  # fmt: skip
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = {path: v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    table = weight_table(cfg)
    assert params == {s.path: s.shape for s in table.values()}
    assert len(table) == 2 + 9 * 3 + 1  # embed, norm, 9 per layer, lm_head
    # load's skeleton (rngs=None): the same parameters and dtypes, zeros in place of the random weights.
    skeleton = nnx.to_flat_state(nnx.state(Llama(cfg, rngs=None), nnx.Param))
    shapes = {path: (v.shape, v.dtype) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {path: (v.shape, v.dtype) for path, v in skeleton} == shapes
    zeroed = [np.asarray(v[...]) for path, v in skeleton if path[-1] != "weight"]  # the norms' weights are ones
    assert len(zeroed) == 7 * 3 + 2 and not any(a.any() for a in zeroed)


def test_sharded_checkpoint_loads_the_same_model(tmp_path, folder):
    tensors = load_file(folder / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, sharded / name, metadata={"format": "pt"})
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = token_batch(1, 2, 17, 64)
    np.testing.assert_array_equal(
        np.asarray(residual(load(sharded), ids, 1)), np.asarray(residual(load(folder), ids, 1))
    )


def test_wrong_path_is_one_line(tmp_path):
    with pytest.raises(LlamaLoadError, match=r"^\S*nowhere: not a directory") as e:
        load(tmp_path / "nowhere")
    assert "\n" not in str(e.value)


def test_folder_without_weights_is_one_line(folder):
    (folder / "model.safetensors").unlink()
    one_line_error(folder, "no model.safetensors or model.safetensors.index.json")


def test_missing_tensor_names_file_key_and_shape(folder):
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    msg = one_line_error(folder, "model.safetensors", "missing tensor 'model.layers.1.mlp.up_proj.weight'", "[128, 64]")
    assert msg.endswith("found none")


def test_unexpected_tensor_names_file_key_and_shape(folder):
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    one_line_error(folder, "model.safetensors", "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'", "[64]")


def test_lm_head_in_a_tied_checkpoint_is_unexpected(folder):
    rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    one_line_error(folder, "unexpected tensor 'lm_head.weight'", "tie_word_embeddings=true")


def test_shape_contradicting_config_names_key_expected_and_found(folder):
    # 4 kv heads' worth of k_proj where config.json says num_key_value_heads=2.
    rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    one_line_error(
        folder,
        "model.safetensors",
        "'model.layers.0.self_attn.k_proj.weight'",
        "expected shape [32, 64]",
        "found [64, 64]",
    )


def test_several_problems_report_the_first_and_a_count(folder):
    rewrite(folder, lambda t: [t.pop("model.norm.weight"), t.pop("model.layers.0.mlp.down_proj.weight")])
    one_line_error(folder, "missing tensor 'model.layers.0.mlp.down_proj.weight'", "(and 1 more problems)")


def test_shard_listed_but_absent_is_one_line(tmp_path, folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    weight_map = {k: "model-00002-of-00002.safetensors" for k in weight_table(load_config(folder))}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one_line_error(folder, "model.safetensors.index.json", "shard 'model-00002-of-00002.safetensors': no such file")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.pop("hidden_size"), "hidden_size: expected int, found the key missing"),
        (lambda d: d.update(num_hidden_layers="12"), "num_hidden_layers: expected an integer, found str '12'"),
        (
            lambda d: d["rope_parameters"].update(rope_type="yarn"),
            "rope_parameters.rope_type: expected 'llama3' or 'default', found 'yarn'",
        ),
        (
            lambda d: d["rope_parameters"].pop("factor"),
            "rope_parameters: factor: expected float, found the key missing",
        ),
        (lambda d: d.update(num_key_value_heads=3), "num_heads: expected a multiple of num_kv_heads=3, found 4"),
        (lambda d: d.update(attention_bias=True), "attention_bias: expected false, found True"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(folder, edit, needle):
    d = json.loads((folder / "config.json").read_text())
    edit(d)
    (folder / "config.json").write_text(json.dumps(d))
    one_line_error(folder, "config.json", needle)


@pytest.mark.parametrize("layer", [-1, 2, 12])
def test_layer_out_of_range_is_one_line(folder, layer):
    m = load(folder)
    with pytest.raises(ValueError) as e:
        residual(m, token_batch(0, 1, 4, 64), layer)
    assert str(e.value) == f"layer: expected 0 <= layer <= 1 (the model has 2 layers), found {layer}"


def test_unknown_site_is_one_line(folder):
    with pytest.raises(ValueError, match=r"^site: expected one of \('input', 'output'\), found 'post'$"):
        residual(load(folder), token_batch(0, 1, 4, 64), 0, "post")
