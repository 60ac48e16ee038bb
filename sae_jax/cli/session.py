"""What the subcommands share: the model/SAE/tokenizer arguments, loading them, and progress lines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from sae_jax.sae import SITES


class Session(NamedTuple):
    model: object  # sae_jax.llama.Llama
    sae: object  # sae_jax.sae.SAE
    tokenizer_name: str  # a tokenizer folder or "llama3-offline"


PROGRESS = "sae-jax: "  # every progress line starts so; an error line starts with "error: "


def say(line: str) -> None:
    """A progress line on stderr, so stdout keeps only results."""
    print(PROGRESS + line, file=sys.stderr, flush=True)


def sae_path(path: str) -> str:
    """`path`, refused with the right path when it is a run directory rather than the SAE inside it."""
    p = Path(path)
    if p.is_dir() and (p / "sae" / "spec.json").is_file() and not (p / "spec.json").exists():
        raise ValueError(f"--sae {path}: expected an SAE, found a run directory; its SAE is {p / 'sae'}")
    return path


def add_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument(
        "--sae",
        required=model_required,
        help="the SAE: a sae-jax folder, release .pt/.safetensors, or a SAELens folder",
    )
    p.add_argument(
        "--model", required=model_required, help="a local Hugging Face Llama folder (config.json + model.safetensors)"
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype of the model (default float32)")
    p.add_argument("--hook-layer", type=int, help="override the SAE's hook layer")
    p.add_argument(
        "--hook-site",
        choices=SITES,
        help="override the SAE's hook site (input: entering the layer; output: leaving it)",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer folder or 'llama3-offline' (default: the model folder's, else llama3-offline)"
    )


def tokenizer_name(model_dir: str | Path, name: str | None) -> str:
    """`name`, else the model folder if it holds a tokenizer, else the offline Llama-3 tokenizer."""
    if name:
        return name
    return str(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else "llama3-offline"


def open_session(args: argparse.Namespace) -> Session:
    """Load the model and SAE named by `add_args`' arguments and check they fit each other."""
    from sae_jax.attach import check_compatible
    from sae_jax.formats import load_sae, quiet_orbax
    from sae_jax.llama import load

    quiet_orbax()
    say(f"loading SAE {args.sae} and model {args.model}")
    sae = load_sae(sae_path(args.sae), hook_layer=args.hook_layer, hook_site=args.hook_site)
    model = load(args.model, dtype=args.dtype or "float32")
    check_compatible(sae, model, what=f"SAE {args.sae} on model {args.model}")
    return Session(model, sae, tokenizer_name(args.model, args.tokenizer))


def load_checked_tokenizer(name: str, model):
    """The tokenizer `name`, refused if it has ids the model's vocabulary lacks."""
    from sae_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(name)
    if len(tok) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer {name}: expected at most the model's vocab_size {model.config.vocab_size} ids, found {len(tok)}"
        )
    return tok
