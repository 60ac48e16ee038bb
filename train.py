"""Train an SAE: `python train.py --config configs/X.yaml [--set a.b=value ...]`.

Rerunning the same command resumes from the newest checkpoint in run.out_dir.
"""

import argparse
import json
import sys

from sae_jax.cli import fail_in_one_line
from sae_jax.malloc import keep_freed_memory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config; omitted keys take their defaults (see --help-config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. train.steps=500")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from sae_jax.config import describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    cfg = load_config(args.config, args.set)
    from sae_jax.formats import quiet_orbax
    from sae_jax.run import train, writes_files

    quiet_orbax()

    result = train(cfg, progress=not args.no_progress)
    if not writes_files():  # one of several processes: process 0 reports
        return 0
    print(f"trained {int(result.state.step)} steps; SAE exported to {result.run_dir / 'sae'}")
    if (result.run_dir / "eval.json").exists():
        held_out = json.loads((result.run_dir / "eval.json").read_text())
        print("held-out eval: " + ", ".join(f"{k} {v:.4g}" for k, v in held_out.items()))
    return 0


if __name__ == "__main__":
    keep_freed_memory()  # before any JAX computation; see sae_jax/malloc.py
    sys.exit(fail_in_one_line(main))
