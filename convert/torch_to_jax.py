"""Convert a release .pt/.safetensors file, a SAELens folder or a sparsify hookpoint folder to the sae-jax format
(`sae-jax convert --to jax`)."""

import sys

from sae_jax.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return cli(["convert", *argv, "--to", "jax"], prog="torch_to_jax.py", error_prefix="torch_to_jax")


if __name__ == "__main__":
    sys.exit(main())
