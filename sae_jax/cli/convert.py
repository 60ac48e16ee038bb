"""`sae-jax convert SRC DST`: an SAE from any format sae-jax reads to the one DST names.

SRC: a sae-jax folder, a release .pt/.pth/.safetensors file, a SAELens folder or a sparsify hookpoint folder.
The format to write comes from --to, else DST's suffix (.pt/.pth, .safetensors); a folder needs --to. Formats
other than jax take raw activations, so an input_scale other than 1 is folded into their weights, in float64 and
rounded once; a bfloat16/float16 fold that cannot be held exactly is refused (pass --dtype float32).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sae_jax.sae import SITES

SUFFIXES = {".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}
TARGETS = ("jax", "pt", "safetensors", "saelens", "sparsify")


def add(sub) -> None:
    p = sub.add_parser("convert", help="convert an SAE between formats", description=__doc__)
    p.add_argument("src", help="sae-jax folder, release .pt/.pth/.safetensors file, SAELens or sparsify folder")
    p.add_argument("dst", help="file or folder to write")
    p.add_argument("--to", choices=TARGETS, help="format to write (default: by DST's suffix)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype written (default: the SAE's)")
    p.add_argument("--hook-layer", type=int, help="decoder layer whose residual the SAE reads (default: SRC's, else 9)")
    p.add_argument("--hook-site", choices=SITES, help="input: entering the layer; output: leaving it (default: SRC's)")
    p.add_argument("--model-name", help="SAELens metadata.model_name, e.g. meta-llama/Llama-3.2-1B-Instruct")
    p.add_argument("--context-size", type=int, help="SAELens metadata.context_size (tokens per training sequence)")
    p.add_argument("--dataset-path", help="SAELens metadata.dataset_path, e.g. lmsys/lmsys-chat-1m")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def target(dst: str, to: str | None) -> str:
    """The format to write: `to`, else by DST's suffix; a folder destination must name one."""
    fmt = to or SUFFIXES.get(Path(dst).suffix)
    if fmt is None:
        raise ValueError(f"--to: expected one of {', '.join(TARGETS)} for folder {dst}, found none")
    return fmt


def run(args: argparse.Namespace) -> int:
    from sae_jax.formats import load_sae, quiet_orbax, save_sae

    quiet_orbax()
    fmt = target(args.dst, args.to)
    fields = {"model_name": args.model_name, "context_size": args.context_size, "dataset_path": args.dataset_path}
    metadata = {k: v for k, v in fields.items() if v is not None}
    sae = load_sae(args.src, hook_layer=args.hook_layer, hook_site=args.hook_site)
    dst = save_sae(sae, args.dst, fmt, overwrite=args.overwrite, metadata=metadata or None, dtype=args.dtype)
    s = sae.spec
    folded = f", input_scale {s.input_scale} folded" if s.input_scale != 1.0 and fmt != "jax" else ""
    where = f", layer {s.hook_layer} {s.hook_site}" if fmt == "jax" else ""
    print(f"wrote {dst} ({fmt}: {s.architecture}, D={s.d_in}, N={s.n_latents}, {args.dtype or s.dtype}{where}{folded})")
    return 0
