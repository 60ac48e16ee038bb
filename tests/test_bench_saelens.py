"""The SAELens side of the benchmarks (bench/saelens_runner.py, bench/saelens_synthetic.py), on tiny shapes.

The runner trains with SAELens's own trainer, saves with SAELens, reads back through our loader and scores with
`sae_jax.run.final_eval`. The score must be what SAELens's own forward (`SAE.load_from_disk`, then encode/decode)
gives on the same held-out batches: explained variance within 1e-6 (torch and XLA sum the float32 products of
x_hat in different orders; measured differences are 1e-8 to 3e-8 here), and the same L0 within 1/64 (a code on the
edge of its threshold may flip between the two orders; none did when measured).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # importing sae_lens must not reach for the hub

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import saelens_runner, saelens_synthetic  # noqa: E402
from sae_jax.config import load_config  # noqa: E402
from sae_jax.data import make_source  # noqa: E402
from sae_jax.run import estimate_scale  # noqa: E402

TINY = [
    "sae.d_in=16",
    "sae.expansion=4",
    "data.batch_size=64",
    "data.synthetic.n_features=32",
    "data.synthetic.active=3",
    "data.synthetic.hierarchy_parents=2",
    "train.steps=20",
    "train.lr=1e-2",
    "train.lr_warmup_steps=2",
    "train.dead_tokens=256",
    "run.eval_batches=4",
]
CASES = {
    "relu": ["train.l1_coefficient=1"],
    "topk": ["sae.k=3"],
    "batchtopk": ["sae.k=3"],
    "jumprelu": ["sae.l0_coefficient=0.5", "sae.k=3"],  # k: realistic.yaml's per-token phase (ours only)
}


def held_out(cfg) -> np.ndarray:
    """The batches final_eval scores: after the scale estimate's and the training steps'."""
    src = make_source(cfg)
    for _ in range(cfg.train.scale_batches + cfg.train.steps):
        src.next_batch()
    return np.concatenate([src.next_batch() for _ in range(cfg.run.eval_batches)])


@pytest.mark.parametrize("arch", sorted(CASES))
def test_runner_scores_what_saelens_own_forward_computes(tmp_path, arch):
    cfg = load_config(
        ROOT / "configs" / "realistic.yaml",
        TINY + CASES[arch] + [f"sae.architecture={arch}", f"run.out_dir={tmp_path}"],
    )
    ev = saelens_runner.train_saelens(cfg, tmp_path)

    from sae_lens import SAE as LensSAE

    lens = LensSAE.load_from_disk(str(tmp_path / "sae"))
    x = held_out(cfg)
    with torch.no_grad():
        f = lens.encode(torch.from_numpy(x))
        x_hat = lens.decode(f).numpy().astype(np.float64)
    x64 = x.astype(np.float64)
    ev_lens = 1 - np.sum((x_hat - x64) ** 2) / np.sum((x64 - x64.mean()) ** 2)  # metrics.moments: one scalar mean
    assert ev["tokens"] == x.shape[0]
    assert abs(ev["explained_variance"] - ev_lens) < 1e-6
    assert ev["explained_variance"] > 0.5  # 20 steps trained it: 0.56 (topk family) to 0.78 (jumprelu)
    assert abs(ev["l0"] - float((f != 0).sum(-1).double().mean())) <= 1 / 64
    assert 0 < ev["ground_truth"]["mcc"] <= 1
    # SAELens trained on our scale: the run's own estimate from the same first batches.
    saved = json.loads((tmp_path / "saelens.json").read_text())
    assert saved["scale"] == estimate_scale(make_source(cfg), cfg.train.scale_batches, cfg.sae.d_in)
    assert saelens_runner.finished(cfg, tmp_path) == ev


def test_yardstick_scores_both_sides_on_the_same_samples(tmp_path):
    argv = ["--out", str(tmp_path), "--arch", "topk", "--steps", "10", "--batch-size", "64", "--features", "16"]
    argv += ["--d", "8", "--samples", "2000", "--set", "sae.expansion=4", "--set", "train.lr=1e-2"]
    argv += ["--set", "train.lr_warmup_steps=2"]
    assert saelens_synthetic.main(argv) == 0

    rows = json.loads((tmp_path / "yardstick.json").read_text())
    assert [(r["side"], r["arch"]) for r in rows] == [("sae-jax", "topk"), ("SAELens", "topk")]
    assert rows[0]["true_l0"] == rows[1]["true_l0"] > 0  # SAELens's eval drew the same samples for both
    k = saelens_synthetic.SWEEPS["topk"][1][1]
    for r in rows:
        assert 0 < r["sae_l0"] <= k
        assert 0 < r["mcc"] <= 1 and 0 <= r["dead_latents"] <= 32
    assert np.load(tmp_path / "data" / "activations.npy").shape == ((10 + 10 + 4) * 64, 8)
    assert f"| sae-jax | topk | k={k} |" in (tmp_path / "yardstick.md").read_text()
