"""SAELens's own trainers (torch) on the realistic synthetic set of bench/frontier.py, scored by sae_jax.groundtruth.

    python bench/saelens_compare.py ARCH K_OR_LAMBDA LR     # ARCH: topk, batchtopk (k) or jumprelu (l0 coefficient)

Same data, scale (mean norm sqrt(D)), token budget (800 x 512), warm-up and decay as our runs; AuxK 1/32 and
dead = not fired over 50k tokens, as ours. Needs `sae-lens` (not a dependency of sae-jax).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_jax.config import load_config
from sae_jax.data import make_source
from sae_jax.data.synthetic import recovered_fraction
from sae_jax.groundtruth import match, unit_rows

arch, k, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "realistic.yaml")
src = make_source(cfg)
scale = np.sqrt(32) / np.mean([np.linalg.norm(src.next_batch(), axis=1).mean() for _ in range(10)])
torch.manual_seed(0)
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

if arch == "jumprelu":
    sae = JumpReLUTrainingSAE(
        JumpReLUTrainingSAEConfig(d_in=32, d_sae=512, jumprelu_bandwidth=0.2, jumprelu_init_threshold=0.01)
    )
else:
    C, S = (
        (BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE)
        if arch == "batchtopk"
        else (TopKTrainingSAEConfig, TopKTrainingSAE)
    )
    sae = S(C(d_in=32, d_sae=512, k=k, aux_loss_coefficient=1 / 32))
coef = lambda i: {"l0": k * min(1.0, i / 40)} if arch == "jumprelu" else {}
opt = torch.optim.Adam(sae.parameters(), lr=lr)
since = torch.zeros(512)
steps = 800
for i in range(steps):
    x = torch.tensor(src.next_batch() * scale)
    for g in opt.param_groups:
        g["lr"] = lr * min(1.0, (i + 1) / 20) * min(1.0, (steps - i) / (0.2 * steps))
    out = sae.training_forward_pass(TrainStepInput(x, coef(i), since >= 50000, i, False))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    fired = (out.feature_acts > 0).any(0)
    since = torch.where(fired, torch.zeros_like(since), since + 512)
W = sae.W_dec.detach().numpy()
F = src.dictionary
rows, cols, _ = match(F, W)
mcc = float(np.mean(np.sum(unit_rows(F)[rows] * unit_rows(W)[cols], 1)))
with torch.no_grad():
    x = torch.tensor(src.batch(10**9)[0] * scale)
    o = sae.training_forward_pass(TrainStepInput(x, coef(steps), since >= 50000, steps, False))
    fvu = float(((o.sae_out - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
print(
    f"SAELens {arch} k={k} lr={lr}: recovered {recovered_fraction(F, W):.3f} MCC {mcc:.3f} train-mode FVU {fvu:.3f} L0 {(o.feature_acts > 0).sum(1).float().mean():.2f}",
    flush=True,
)
