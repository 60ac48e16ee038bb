"""Training on Llama activations through the config: wiring, errors, resume."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from sae_jax.config import ConfigError, load_config
from sae_jax.data import make_source
from sae_jax.data.demo_chats import write_demo_chats
from sae_jax.llama.tiny import write_tiny_checkpoint
from sae_jax.run import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    write_tiny_checkpoint(
        d / "model",
        num_hidden_layers=12,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        init_std=0.1,
    )
    write_demo_chats(d / "chats.jsonl", 200, seed=0)
    return d


def cfg_for(assets, out, *extra):
    return load_config(
        None,
        [
            "data.source=llama",
            f"data.model.path={assets / 'model'}",
            "data.model.dtype=float32",
            f"data.text.path={assets / 'chats.jsonl'}",
            "data.text.context_size=64",
            "data.text.seqs_per_batch=4",
            "data.text.pack=true",
            "data.text.buffer_tokens=1024",
            "data.batch_size=128",
            "sae.d_in=32",
            "sae.expansion=4",
            "train.steps=12",
            "train.lr_warmup_steps=2",
            "train.scale_batches=2",
            "run.save_every=4",
            "run.log_every=4",
            f"run.out_dir={out}",
            *extra,
        ],
    )


def test_llama_source_yields_the_layer_9_input(assets, tmp_path):
    from sae_jax import llama
    from sae_jax.data.text import TextSource

    cfg = cfg_for(assets, tmp_path)
    batch = make_source(cfg).next_batch()
    assert batch.shape == (128, 32) and batch.dtype == np.float32
    # Every served row is the residual entering layer 9 (not 8, not 10) at a kept token of the text.
    model, text = llama.load(assets / "model"), TextSource(cfg.data.text)
    reads = {site: [] for site in [(8, "input"), (9, "input"), (9, "output")]}
    for _ in range(6):
        tb = text.next_batch()
        for (layer, where), out in reads.items():
            out.append(np.asarray(llama.residual(model, tb.input_ids, layer, where, tb.attention_mask))[tb.keep])
    nearest = {
        k: np.min(np.linalg.norm(batch[:, None] - np.concatenate(v)[None], axis=-1), axis=1).max()
        for k, v in reads.items()
    }
    assert nearest[(9, "input")] < 1e-4
    assert nearest[(8, "input")] > 1e-2 and nearest[(9, "output")] > 1e-2


def test_llama_run_resumes_bit_identical(assets, tmp_path):
    whole = train(cfg_for(assets, tmp_path / "whole"), progress=False)
    train(cfg_for(assets, tmp_path / "part"), stop_after=6, progress=False)
    resumed = train(cfg_for(assets, tmp_path / "part"), progress=False)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The export says what it was trained on, in SAELens's fields (carried into SAELens folders).
    c = cfg_for(assets, tmp_path / "whole")
    assert json.loads(whole.sae.spec.metadata) == {
        "model_name": Path(c.data.model.path).name,
        "dataset_path": c.data.text.path,
        "context_size": c.data.text.context_size,
        "prepend_bos": True,
    }


@pytest.mark.parametrize(
    "extra, message",
    [
        (["sae.d_in=48"], "sae.d_in: expected the hidden size of"),
        (["sae.hook_layer=12"], "sae.hook_layer: expected 0 <= layer < 12"),
    ],
)
def test_llama_source_mismatch_is_one_line(assets, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as e:
        make_source(cfg_for(assets, tmp_path, *extra))
    assert "\n" not in str(e.value)


def test_missing_model_folder_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"data.model.path: expected a local Hugging Face folder with config.json"):
        load_config(
            None, ["data.source=llama", f"data.model.path={tmp_path}", f"data.text.path={tmp_path / 'x.jsonl'}"]
        )


def test_release_config_is_the_release_shape(assets):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "llama-3.2-1b-instruct-l9.yaml"
    cfg = load_config(path, [f"data.model.path={assets / 'model'}"])
    assert (cfg.sae.architecture, cfg.sae.d_in, cfg.sae.n_latents) == ("relu", 2048, 32768)
    assert (cfg.sae.hook_layer, cfg.sae.hook_site) == (9, "input")
    assert (cfg.data.batch_size, cfg.data.text.context_size, cfg.data.text.path) == (4096, 1024, "lmsys/lmsys-chat-1m")
    with pytest.raises(ConfigError, match="data.model.path: expected a local Hugging Face folder"):
        load_config(path)  # the default model folder is not on this machine
