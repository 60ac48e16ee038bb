"""The `sae-jax` command line: one parser, one subcommand per job, errors rendered in one place.

    sae-jax train --config configs/demo.yaml
    sae-jax evaluate --config configs/demo.yaml
    sae-jax inspect chat --sae runs/demo/sae --model demo/tiny-llama --user Hi --assistant Hello
    sae-jax steer --sae runs/demo/sae --model demo/tiny-llama --prompt "Tell me a story." --feature 3 --alpha 4
    sae-jax convert release.pt out/sae --to jax
    sae-jax plot runs/demo

Each subcommand is a module here with `add(subparsers)` and `run(args) -> int`; the
library it calls never reads sys.argv. Heavy imports wait until a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sae_jax.errors import one_line

COMMANDS = ("train", "evaluate", "inspect", "steer", "convert", "plot")


def parser(prog: str = "sae-jax") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"sae_jax.cli.{name}").add(sub)
    return p


class _Alone:
    """Stands in for the subparsers so that a root script (`train.py`) parses one subcommand as itself."""

    def __init__(self, prog: str):
        self.prog = prog

    def add_parser(self, name: str, help: str = "", **kw) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=self.prog, **kw)
        p.set_defaults(command=name)
        self.last = p
        return p


def main(argv: list[str] | None = None, prog: str = "sae-jax", error_prefix: str = "") -> int:
    """Parse `argv` (default sys.argv[1:]) and run the subcommand; expected errors end in one line.

    With `prog` other than sae-jax (a root script's shim), argv[0] names the subcommand and the rest is parsed
    as that script's own arguments.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if prog == "sae-jax":
        args = parser(prog).parse_args(argv)
    else:
        alone = _Alone(prog)
        importlib.import_module(f"sae_jax.cli.{argv[0]}").add(alone)
        args = alone.last.parse_args(argv[1:])
    module = importlib.import_module(f"sae_jax.cli.{args.command}")
    return one_line(lambda: module.run(args), error_prefix)
