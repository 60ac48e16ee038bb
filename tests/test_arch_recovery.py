"""Recovery of the true features on a small realistic synthetic set (sae_jax.groundtruth), per architecture.

The set, configs/realistic.yaml: 128 true features in D = 32 (4x more than D), Zipf-like frequencies (a = 0.5),
correlated groups of 8 (0.3), 4 parents with 3 children each, magnitudes spread exp(N(0, 0.3^2)); N = 512
latents, 800 steps of 512 tokens. Each recipe at its natural L0 (the true one is 5; relu's L1 sets its own and
counts small activations), the yaml's training settings and the recipe's defaults otherwise. Measured (2-core
CPU, seeds 0 / 1 of train.seed and data.seed): recovered at cos >= 0.9, MCC
  topk (unit-norm decoder, k = 5)   0.922 / 0.938   0.967 / 0.969
  relu (L1 1.5, L0 ~18)             0.914 / 0.906   0.956 / 0.955
  batchtopk (k = 5)                 0.844 / 0.828   0.941 / 0.941
  matryoshka (k = 5, prefix N/2)    0.891 / 0.906   0.946 / 0.949
  jumprelu (lambda 1, L0 ~4.6)      0.852 / 0.859   0.929 / 0.926
Before the generator's mix went from @ to einsum (a ~1e-7 change in the data) the same runs gave batchtopk
0.867 / 0.891, matryoshka 0.883 / 0.883, jumprelu 0.852 / 0.867, topk 0.930 / 0.938, relu 0.914 / 0.914: batchtopk
moves by up to 0.06 from run to run. batchtopk, matryoshka and jumprelu miss the 0.9 target here because of the
magnitude spread: the features they miss are the weak ones (median typical magnitude 0.68 against 1.03
overall), whose latents never win a place (batchtopk: firing on 0.2% of tokens, none of them the feature's), and
with magnitude_spread 0 they recover 0.922, 0.914 and 0.969. The test runs seed 0; each floor is the lowest of
those measurements less 2-3 features, so a regression shows.
"""

import json
from pathlib import Path

import pytest

from sae_jax.config import load_config
from sae_jax.run import train

REALISTIC = Path(__file__).resolve().parents[1] / "configs" / "realistic.yaml"
CASES = {  # name: (settings, recovered >=, mcc >=)
    "topk": (["sae.architecture=topk", "sae.k=5", "sae.unit_norm_decoder=true"], 0.9, 0.95),
    "relu": (["sae.architecture=relu", "train.l1_coefficient=1.5"], 0.9, 0.94),
    "batchtopk": (["sae.architecture=batchtopk", "sae.k=5"], 0.8, 0.92),
    "matryoshka": (["sae.architecture=matryoshka", "sae.k=5"], 0.85, 0.93),
    "jumprelu": (["sae.architecture=jumprelu"], 0.82, 0.91),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recovers_the_true_features_of_a_realistic_set(tmp_path, name):
    sets, recovered, mcc = CASES[name]
    train(load_config(REALISTIC, sets + [f"run.out_dir={tmp_path}"]), progress=False)
    truth = json.loads((tmp_path / "eval.json").read_text())["ground_truth"]
    print(name, truth)
    assert truth["recovered"] >= recovered and truth["mcc"] >= mcc
