"""The recipes through the whole loop: stop and resume bit-identical, the export a jumprelu with its threshold."""

import json

import numpy as np
import pytest
from test_train_run import assert_same_params, tiny

from sae_jax.formats import load_sae
from sae_jax.run import train

RECIPES = {
    "batchtopk": {"sae.architecture": "batchtopk", "sae.k": 2, "train.auxk_k": 4},
    "jumprelu": {
        "sae.architecture": "jumprelu",
        "sae.jumprelu_sparsity": "tanh",
        "sae.jumprelu_pre_act_coefficient": 1e-3,
    },
    "matryoshka": {"sae.architecture": "matryoshka", "sae.k": 2, "train.auxk_k": 4, "sae.pre_encoder_bias": True},
    # The sparse kernel (k_max 4 of N = 32: some tokens over it), through the loop, the resume and the export.
    "batchtopk-sparse": {
        "sae.architecture": "batchtopk",
        "sae.k": 2,
        "train.auxk_k": 4,
        "train.kernel": "sparse",
        "train.sparse_k_max": 4,
    },
    "matryoshka-sparse-unit": {
        "sae.architecture": "matryoshka",
        "sae.k": 2,
        "train.auxk_k": 4,
        "train.kernel": "sparse",
        "train.sparse_k_max": 4,
        "sae.unit_norm_decoder": True,
        "sae.auxk_normalize": True,
    },
    # Coded per token for the first 80% of 30 steps: the resumed part (from step 17) crosses the switch at 24.
    "matryoshka-token-phase": {
        "sae.architecture": "matryoshka",
        "sae.k": 2,
        "train.auxk_k": 4,
        "sae.batchtopk_token_topk_frac": 0.8,
    },
    # jumprelu coded per token for the first 80%: the resumed part crosses the switch at 24.
    "jumprelu-token-phase": {
        "sae.architecture": "jumprelu",
        "sae.k": 2,
        "train.auxk_k": 4,
        "sae.jumprelu_token_topk_frac": 0.8,
    },
    "topk-unit": {
        "sae.architecture": "topk",
        "sae.k": 2,
        "train.auxk_k": 4,
        "sae.unit_norm_decoder": True,
        "sae.auxk_normalize": True,
    },
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_stopped_and_rerun_is_bit_identical_for_every_recipe(tmp_path, name):
    sets = {**RECIPES[name], "train.dead_tokens": 64}  # latents die within the run, so AuxK and its branch take part
    whole = train(tiny(tmp_path / "whole", **sets), progress=False)
    train(tiny(tmp_path / "part", **sets), stop_after=17, progress=False)
    resumed = train(tiny(tmp_path / "part", **sets), progress=False)
    assert_same_params(whole.state, resumed.state)
    assert_same_params(whole.sae.params, resumed.sae.params)
    saved = load_sae(tmp_path / "part" / "sae")
    assert saved.spec == resumed.sae.spec
    assert_same_params(saved.params, resumed.sae.params)
    if name.startswith(("batchtopk", "matryoshka")):
        theta = np.asarray(saved.params.threshold)
        assert saved.spec.architecture == "jumprelu" and theta.min() == theta.max() > 0
    truth = json.loads((tmp_path / "part" / "eval.json").read_text())["ground_truth"]
    assert truth["n_true_features"] == 512 and 0 <= truth["recovered"] <= 1 and 0 < truth["mcc"] <= 1
    if "-sparse" in name:
        lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
        assert all(r["kernel_sparse"] == 1.0 for r in lines) and any(r["over_budget_fraction"] > 0 for r in lines)
    if name.endswith("unit"):
        W = np.asarray(whole.state.params.W_dec)
        np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1, rtol=1e-6)
