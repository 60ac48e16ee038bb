"""The PyTorch reference trainer for bench/train_vs_torch.py: what `python train.py` does on synthetic data, in PyTorch.

    python bench/torch_train.py --out DIR --d-in 2048 --expansion 16 --batch 256 --steps 20

Same work as a synthetic relu run of train.py: the synthetic source's batches
(sae_jax/data/synthetic.py, rewritten here in numpy so that this process
imports neither JAX nor sae_jax), the input scale from 10 batches, the
April-2024 init, the loss with lambda warmed up, gradient clipping, Adam with
fused=True on the same warm-up/decay schedule, a metrics line every
`--log-every` steps, a checkpoint (model, optimizer, step) at the end and the
SAE exported with the scale folded in (safetensors, written to a temp name
and renamed). float32 throughout, matmul precision pinned to full float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from safetensors.torch import save_file


class Synthetic:
    """sae_jax.data.synthetic.SyntheticSource's batches: c @ F + noise, batch i a pure function of (seed, i)."""

    def __init__(self, d_in: int, batch: int, n_features=512, active=8.0, noise=0.01, dict_seed=1234, seed=0):
        F = np.random.default_rng(dict_seed).standard_normal((n_features, d_in))
        self.F = (F / np.linalg.norm(F, axis=1, keepdims=True)).astype(np.float32)
        self.batch, self.active, self.noise, self.seed, self.index = batch, active, noise, seed, 0

    def next_batch(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.index])
        self.index += 1
        B, n = self.batch, self.F.shape[0]
        on = rng.random((B, n), dtype=np.float32) < self.active / n
        mags = rng.uniform(0.5, 1.5, (B, n)).astype(np.float32)
        return (on * mags) @ self.F + self.noise * rng.standard_normal((B, self.F.shape[1]), dtype=np.float32)


def lr_at(step: int, a) -> float:
    """train.lr_schedule: linear warm-up, constant, linear decay to 0 over the last lr_decay_frac."""
    decay_start = max(int(round(a.steps * (1 - a.lr_decay_frac))), a.lr_warmup)
    if step < a.lr_warmup:
        return a.lr * step / max(a.lr_warmup, 1)
    if step < decay_start:
        return a.lr
    return a.lr * (1 - (step - decay_start) / max(a.steps - decay_start, 1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--d-in", type=int, default=2048)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lr-warmup", type=int, default=1000)
    p.add_argument("--lr-decay-frac", type=float, default=0.2)
    p.add_argument("--l1", type=float, default=5.0)
    p.add_argument("--l1-warmup-frac", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=10)
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    os.makedirs(a.out, exist_ok=True)
    D, N = a.d_in, a.d_in * a.expansion
    src = Synthetic(D, a.batch)
    norms = [np.linalg.norm(src.next_batch().astype(np.float64), axis=1).mean() for _ in range(10)]
    scale = math.sqrt(D) / float(np.mean(norms))
    W_dec = torch.randn(N, D)
    W_dec = 0.1 * W_dec / W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(N), "W_dec": W_dec, "b_dec": torch.zeros(D)}
    params = {k: torch.nn.Parameter(v.contiguous()) for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=a.lr, fused=True)
    since = torch.zeros(N, dtype=torch.int64)
    t0 = time.perf_counter()
    with open(os.path.join(a.out, "metrics.jsonl"), "w") as mfile:
        for step in range(a.steps):
            x = torch.from_numpy(src.next_batch()) * scale
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a)
            l1 = a.l1 * min(1.0, step / (a.l1_warmup_frac * a.steps)) if a.l1_warmup_frac > 0 else a.l1
            opt.zero_grad(set_to_none=True)
            f = torch.relu(x @ params["W_enc"] + params["b_enc"])
            x_hat = f @ params["W_dec"] + params["b_dec"]
            recon = ((x_hat - x) ** 2).sum(-1).mean()
            loss = recon + l1 * (f * params["W_dec"].norm(dim=1)).sum(-1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            with torch.no_grad():
                since = torch.where((f > 0).any(0), 0, since + a.batch)
            if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
                now = time.perf_counter()
                mfile.write(
                    json.dumps(
                        {
                            "step": step + 1,
                            "loss": float(loss),
                            "l0": float((f > 0).sum(-1).float().mean()),
                            "tokens_per_s": a.log_every * a.batch / (now - t0),
                        }
                    )
                    + "\n"
                )
                mfile.flush()
                t0 = now
    ckpt = os.path.join(a.out, "checkpoint.pt")
    torch.save(
        {"params": params, "opt": opt.state_dict(), "step": a.steps, "since": since, "scale": scale}, ckpt + ".tmp"
    )
    os.replace(ckpt + ".tmp", ckpt)
    with torch.no_grad():  # fold the input scale into the weights, as sae.fold_input_scale does
        out = {
            "W_enc": params["W_enc"] * scale,
            "b_enc": params["b_enc"],
            "W_dec": params["W_dec"] / scale,
            "b_dec": params["b_dec"] / scale,
        }
    path = os.path.join(a.out, "sae.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
