"""Convert an SAE to a release .pt/.safetensors file, a SAELens folder or a sparsify hookpoint folder
(`sae-jax convert`; a folder means saelens). `--format pt|safetensors|saelens|sparsify` is `sae-jax convert --to`.
"""

import sys
from pathlib import Path

from sae_jax.cli import main as cli
from sae_jax.cli.convert import SUFFIXES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--to" if a == "--format" else a for a in argv]
    positional = [a for a in argv if not a.startswith("-")]
    if "--to" not in argv and len(positional) >= 2 and Path(positional[1]).suffix not in SUFFIXES:
        argv += ["--to", "saelens"]
    return cli(["convert", *argv], prog="jax_to_torch.py", error_prefix="jax_to_torch")


if __name__ == "__main__":
    sys.exit(main())
