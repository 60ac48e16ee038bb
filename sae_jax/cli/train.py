"""`sae-jax train --config X.yaml`: train an SAE; rerunning the same command resumes from the newest checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sae_jax.cli.session import say


def add(sub) -> None:
    p = sub.add_parser("train", help="train an SAE from a YAML config", description=__doc__)
    p.add_argument("--config", help="YAML config; omitted keys take their defaults (see --help-config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key: train.steps=500")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--no-progress", action="store_true", help="a plain line every run.log_every steps, no bar")
    p.set_defaults(usage=p.format_usage)


def run(args: argparse.Namespace) -> int:
    from sae_jax.config import describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    if not args.config:
        print(args.usage().rstrip(), file=sys.stderr)
        print("error: --config: expected a YAML config (for example configs/demo.yaml), found none", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set)

    from sae_jax.malloc import keep_freed_memory

    keep_freed_memory()  # before any JAX computation; see sae_jax/malloc.py
    from sae_jax.formats import quiet_orbax
    from sae_jax.run import is_complete, train, writes_files

    run_dir = Path(cfg.run.out_dir)
    if is_complete(cfg):  # the run's files say it finished: report it, touch nothing
        print(f"run {run_dir} is complete ({cfg.train.steps} steps); nothing to do")
        steps = cfg.train.steps
    else:
        quiet_orbax()
        result = train(cfg, progress=not args.no_progress, say=say)
        if not writes_files():  # one of several processes: process 0 reports
            return 0
        steps = int(result.state.step)
    print(f"trained {steps} steps; SAE exported to {run_dir / 'sae'}")
    summary = run_dir / "eval.json"
    if summary.exists():
        print(held_out_line(json.loads(summary.read_text()), cfg.sae.n_latents))
    say(f"outputs: {run_dir / 'sae'} (the SAE), {run_dir / 'metrics.jsonl'}, {summary}, {run_dir / 'checkpoints'}")
    say("next: " + "; ".join(next_commands(cfg, args.config)))
    return 0


def next_commands(cfg, config: str) -> list[str]:
    """The commands that use a finished run, with its real paths."""
    run_dir = Path(cfg.run.out_dir)
    out = [f"sae-jax evaluate --config {config} --sae {run_dir / 'sae'}"]
    out.append(f"sae-jax plot {run_dir}")
    release = "release.safetensors" if cfg.sae.architecture == "relu" else "saelens --to saelens"
    out.append(f"sae-jax convert {run_dir / 'sae'} {run_dir / release}")
    return out


def held_out_line(e: dict, n_latents: int) -> str:
    """eval.json in one line a reader can judge the SAE by (two on synthetic data: the ground-truth scores)."""
    from sae_jax.groundtruth import summary

    parts = [
        f"explained variance {e['explained_variance']:.4f}",
        f"L0 {e['l0']:.1f} of {n_latents} latents",
        f"dead {100 * e['dead_fraction']:.1f}%",
        f"dense {100 * e['dense_fraction']:.1f}%",
        f"MSE {e['mse']:.4g}",
    ]
    line = f"held-out ({e['tokens']} unseen tokens, raw units): " + ", ".join(parts)
    return line + ("\n" + summary(e["ground_truth"]) if "ground_truth" in e else "")
