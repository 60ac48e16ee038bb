"""Plot a run's training curves against tokens: `python plot_curves.py RUN_DIR_OR_METRICS.jsonl [--out PNG]`.

Default metrics: loss, mse, l0, explained_variance, dead_fraction (those present).
"""

import argparse
import sys
from pathlib import Path

from sae_jax.cli import fail_in_one_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("metrics", help="a run directory (its metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", help="PNG to write (default: training_curves.png beside metrics.jsonl)")
    p.add_argument("--metric", action="append", help="a metric to plot; repeat for several (default: the standard ones)")
    args = p.parse_args(argv)

    from sae_jax.plots import plot_curves

    src = Path(args.metrics)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "training_curves.png"
    data = plot_curves(src, out, tuple(args.metric) if args.metric else None)
    last = ", ".join(f"{k} {v[-1]:.4g}" for k, (_, v) in data.items())
    n = max(len(t) for t, _ in data.values())
    print(f"wrote {out}: {len(data)} panels, {n} points; last: {last}")
    return 0


if __name__ == "__main__":
    sys.exit(fail_in_one_line(main))
