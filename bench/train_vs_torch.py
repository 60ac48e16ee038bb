"""Whole-process training: `python train.py` against the PyTorch reference trainer (bench/torch_train.py).

    python bench/train_vs_torch.py                          # release shape, 20 and 40 steps, 1 pair each
    python bench/train_vs_torch.py --shape small --steps 20 --pairs 2

Both processes train a relu SAE on the same synthetic batches from init for
the same steps, log metrics, checkpoint and export at the end (train.py's
final eval is off: run.eval_batches=0, as the reference has none). Each runs
under /usr/bin/time -v, one after the other (the order alternates per pair);
wall time and peak RSS come from there. Start-up, imports, compilation, the
checkpoint and the allocator all count. train.py runs with its defaults
(train.kernel auto; malloc kept, see sae_jax/malloc.py); the reference with
PyTorch's (Adam fused=True). Matmul precision: float32 on both sides (JAX on
CPU computes float32 matmuls in float32; the reference pins
torch.set_float32_matmul_precision("highest")).
The last line is JSON with every number and the ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"release": (2048, 16, 256), "small": (512, 16, 256), "smoke": (64, 4, 32)}  # (D, expansion, B)
LR, LOG_EVERY = 5e-5, 10


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run cmd under /usr/bin/time -v -> (wall seconds, peak RSS GB); exits on failure with the child's output."""
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(
            f"train_vs_torch: {' '.join(cmd[:3])} failed (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        )
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", out.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    h, m, s = (float(g or 0) for g in wall.groups())
    return 3600 * h + 60 * m + s, int(rss.group(1)) / 1e6


def commands(shape: str, steps: int, out: str) -> dict[str, list[str]]:
    D, expansion, B = SHAPES[shape]
    sets = [
        f"sae.d_in={D}",
        f"sae.expansion={expansion}",
        f"data.batch_size={B}",
        f"train.steps={steps}",
        f"train.lr={LR}",
        f"run.out_dir={out}/jax",
        f"run.log_every={LOG_EVERY}",
        f"run.save_every={steps}",
        "run.eval_batches=0",
        f"train.lr_warmup_steps={steps // 10}",
        "train.l1_coefficient=5.0",
    ]
    jax_cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/synthetic.yaml",
        *[x for s in sets for x in ("--set", s)],
    ]
    torch_cmd = [
        sys.executable,
        "bench/torch_train.py",
        "--out",
        f"{out}/torch",
        "--d-in",
        str(D),
        "--expansion",
        str(expansion),
        "--batch",
        str(B),
        "--steps",
        str(steps),
        "--lr",
        str(LR),
        "--log-every",
        str(LOG_EVERY),
        "--lr-warmup",
        str(steps // 10),
    ]
    return {"jax": jax_cmd, "torch": torch_cmd}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="release", choices=list(SHAPES))
    p.add_argument("--steps", default="20,40", help="comma list of step counts, one pair (or --pairs) each")
    p.add_argument("--pairs", type=int, default=1)
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from bench.common import json_line, table

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    import torch

    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        "matmul precision: JAX float32 (CPU), torch 'highest' (no TF32)",
        flush=True,
    )
    rows = []
    for steps in (int(s) for s in a.steps.split(",")):
        for pair in range(a.pairs):
            got = {}
            for name in ("jax", "torch") if pair % 2 == 0 else ("torch", "jax"):
                with tempfile.TemporaryDirectory() as out:
                    got[name] = timed(commands(a.shape, steps, out)[name], env)
            (jw, jr), (tw, tr) = got["jax"], got["torch"]
            rows.append(
                dict(
                    shape=a.shape,
                    steps=steps,
                    pair=pair,
                    jax_s=jw,
                    torch_s=tw,
                    speedup=tw / jw,
                    jax_gb=jr,
                    torch_gb=tr,
                    rss_ratio=jr / tr,
                )
            )
            print(
                f"steps {steps} pair {pair}: train.py {jw:.1f} s {jr:.2f} GB, torch {tw:.1f} s {tr:.2f} GB", flush=True
            )
    print(
        table(
            rows,
            [
                ("shape", "shape", "s"),
                ("steps", "steps", "d"),
                ("jax_s", "train.py s", ".1f"),
                ("torch_s", "torch s", ".1f"),
                ("speedup", "torch/ours wall", ".2f"),
                ("jax_gb", "ours GB", ".2f"),
                ("torch_gb", "torch GB", ".2f"),
                ("rss_ratio", "ours/torch RSS", ".2f"),
            ],
        )
    )
    print(json_line("train_vs_torch", rows=rows))


if __name__ == "__main__":
    main()
