"""`sae-jax plot RUN_DIR [RUN_DIR ...]`: training curves against tokens, several runs overlaid.

Default metrics: loss, mse, l0, explained_variance, dead_fraction (those present); held-out eval_* points drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("plot", help="plot training curves of one or more runs", description=__doc__)
    p.add_argument("metrics", nargs="+", help="run directories (their metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--out", help="PNG to write (default: training_curves.png beside the first run's metrics.jsonl)")
    p.add_argument(
        "--metric", action="append", help="a metric to plot; repeat for several (default: the standard ones)"
    )


def run(args: argparse.Namespace) -> int:
    from sae_jax.plots import plot_curves, run_name

    first = Path(args.metrics[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) / "training_curves.png"
    runs = [Path(m) for m in args.metrics]
    data = plot_curves(runs if len(runs) > 1 else first, out, tuple(args.metric) if args.metric else None)
    per_run = data if len(runs) > 1 else {run_name(first): data}
    for run, curves in per_run.items():
        last = ", ".join(f"{k} {v[-1]:.4g}" for k, (_, v) in curves.items() if v.size)
        n = max(len(t) for t, _ in curves.values())
        print(f"{run}: {len(curves)} panels, {n} points; last: {last}")
    print(f"wrote {out}")
    return 0
