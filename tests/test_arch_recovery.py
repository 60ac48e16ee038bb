"""Recovery of the true features on a small realistic synthetic set (sae_jax.groundtruth), per architecture.

The set, configs/realistic.yaml: 128 true features in D = 32 (4x more than D), Zipf-like frequencies (a = 0.5),
correlated groups of 8 (0.3), 4 parents with 3 children each, magnitudes spread exp(N(0, 0.3^2)); N = 512
latents, 800 steps of 512 tokens. Each recipe at its natural L0 (the true one is 5; relu's L1 sets its own and
counts small activations), the yaml's training settings and the recipe's defaults otherwise. Measured (2-core
CPU, seeds 0 / 1 of train.seed and data.seed): recovered at cos >= 0.9, MCC
  topk (unit-norm decoder, k = 5)        0.922 / 0.945   0.967 / 0.969
  relu (L1 1.75, L0 ~15)                 0.906 / 0.906   0.955 / 0.957   (seeds 2 / 3: 0.914 / 0.898)
  batchtopk (k = 5, per token first 80%) 0.945 / 0.922   0.961 / 0.961   (seeds 2 / 3: 0.914 / 0.922)
  matryoshka (same, prefix N/2)          0.938 / 0.906   0.961 / 0.959   (seeds 2 / 3: 0.930 / 0.945)
  jumprelu (k = 5 per token first 80%,  0.922 / 0.930   0.955 / 0.957   (seeds 2 / 3: 0.945 / 0.914; 4 / 5:
    then lambda 0.5, no pre-act; L0 ~5)                                   0.930 / 0.953)
(in a process with 4 fake CPU devices, as this test runs; seeds 2 / 3 from 1-device runs, before the step's batch
sums became halving adds (sae_jax/sums.py). That change of float32 summation order alone moved relu from 0.914 /
0.906 to 0.898 / 0.914, topk's seed 1 from 0.938 to 0.945, batchtopk's from 0.938 to 0.922 and matryoshka from
0.922 / 0.891 to 0.938 / 0.906: one or two features either way is this set's run-to-run noise).
relu stays within a feature of 0.9 at every L1 tried, seeds 0-3 (4 devices): 1.25: 0.898 / 0.906; 1.5: 0.898 /
0.914 / 0.922 / 0.906; 1.75: 0.906 / 0.906 / 0.914 / 0.898; 2.0: 0.906 / 0.898 / 0.906 / 0.898.
The features batchtopk, matryoshka and jumprelu missed are the weak ones (median typical magnitude 0.68 against 1.03
overall; with magnitude_spread 0, batch-coded, they recover 0.922, 0.914 and 0.969), and topk, same k, finds them:
a batch-wide budget (or jumprelu's per-latent threshold) gives a weak feature's places to the strong features of
crowded tokens, so its latent seldom fires and never learns to tell its feature from the others' interference.
realistic.yaml therefore codes batchtopk and matryoshka per token for the first 80% of training
(`sae.batchtopk_token_topk_frac`); coded by the batch throughout they recovered batchtopk 0.844 / 0.828 (seeds 2 /
3: 0.852 / 0.859), matryoshka 0.891 / 0.906 (0.859 / 0.883). Their theta tracks the batch code at rate 0.05 (the
yaml's; at 0.01 it lagged the switch and inferred L0 4.1-4.2 instead of ~5). jumprelu likewise: trained as jumprelu
throughout (lambda 1, pre-activation loss 3e-3) it recovered 0.852 / 0.859 (MCC 0.933 / 0.927, L0 4.6-4.8), and
none of theta's init, eps, lambda, its warm-up, the tanh penalty, the pre-activation loss's weight, unit-norm rows,
AuxK, Adam beta1 0 or dictionary_learning's target-L0 penalty brought both seeds past 0.87. Coded per token for the
first 80% (`sae.jumprelu_token_topk_frac`, theta fitted to that code), then jumprelu at lambda 0.5 without the
pre-activation loss (which revives dead latents that then crowd the weak features: 0.89 / 0.90 with it), it
recovers the figures above (its seeds 2 / 3 from 1-device runs, 4 / 5 from 4-device ones, all after the halving
adds; a 1-device process gave the same 0.922 / 0.930 on seeds 0 / 1); bench/results/jumprelu-search.md logs the
search. The test runs seed 0; each floor is the lowest of those measurements less 2-3 features, so a regression
shows.
"""

import json
from pathlib import Path

import pytest

from sae_jax.config import load_config
from sae_jax.run import train

# Long-running programs: compiled as users' runs are; the runs share their batches (both in conftest.py).
pytestmark = [pytest.mark.full_xla, pytest.mark.usefixtures("synthetic_once")]

REALISTIC = Path(__file__).resolve().parents[1] / "configs" / "realistic.yaml"
CASES = {  # name: (settings, recovered >=, mcc >=)
    "topk": (["sae.architecture=topk", "sae.k=5", "sae.unit_norm_decoder=true"], 0.9, 0.95),
    "relu": (["sae.architecture=relu", "train.l1_coefficient=1.75"], 0.89, 0.94),
    "batchtopk": (["sae.architecture=batchtopk", "sae.k=5"], 0.91, 0.95),
    "matryoshka": (["sae.architecture=matryoshka", "sae.k=5"], 0.87, 0.95),
    "jumprelu": (["sae.architecture=jumprelu", "sae.k=5"], 0.9, 0.94),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recovers_the_true_features_of_a_realistic_set(tmp_path, name):
    sets, recovered, mcc = CASES[name]
    train(load_config(REALISTIC, sets + [f"run.out_dir={tmp_path}"]), progress=False)
    truth = json.loads((tmp_path / "eval.json").read_text())["ground_truth"]
    print(name, truth)
    assert truth["recovered"] >= recovered and truth["mcc"] >= mcc
