"""Recovery of the true features on a small realistic synthetic set (sae_jax.groundtruth), per architecture.

The set: 128 true features in D = 32 (4x more than D), Zipf-like frequencies (a = 0.5), correlated groups of 8
(0.3), 4 parents with 3 children each, magnitudes spread exp(N(0, 0.3^2)); N = 512 latents, 800 steps of 512
tokens. Measured on this set (2-core CPU; bench/frontier.py --quick, bench/results/frontier-quick.md): topk
(unit-norm decoder, k = 5) recovers 0.93 at cos >= 0.9 (MCC 0.97); relu 0.77-0.84 (MCC 0.91-0.93), batchtopk
(k = 4) 0.79 (MCC 0.91), jumprelu 0.76 (MCC 0.90), matryoshka 0.70 (MCC 0.86-0.87, absorption 0.54-0.58, the
lowest beside relu's 0.50 at a far larger L0). Only topk meets the 0.9 target here; two architectures (one per
inference rule: topk and jumprelu) are held to what they reach, so a regression shows, within the suite's time.
"""

import json
from pathlib import Path

import pytest

from sae_jax.config import load_config
from sae_jax.run import train

REALISTIC = Path(__file__).resolve().parents[1] / "configs" / "realistic.yaml"
CASES = {
    "topk": (["sae.architecture=topk", "sae.k=5", "sae.unit_norm_decoder=true", "train.lr=1e-2"], 0.9, 0.95),
    "jumprelu": (
        [
            "sae.architecture=jumprelu",
            "sae.l0_coefficient=10",
            "sae.jumprelu_bandwidth=0.2",
            "sae.jumprelu_pre_act_coefficient=1e-3",
            "train.lr=2e-3",
        ],
        0.7,
        0.88,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recovers_the_true_features_of_a_realistic_set(tmp_path, name):
    sets, recovered, mcc = CASES[name]
    train(load_config(REALISTIC, sets + [f"run.out_dir={tmp_path}"]), progress=False)
    truth = json.loads((tmp_path / "eval.json").read_text())["ground_truth"]
    print(name, truth)
    assert truth["recovered"] >= recovered and truth["mcc"] >= mcc
