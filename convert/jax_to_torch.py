"""Convert an SAE (sae-jax directory, or any format load_sae reads) to a release .pt/.safetensors file, a SAELens
folder or a sparsify hookpoint folder.

An input_scale other than 1 is folded into the weights (these formats take raw activations), in float64 and
rounded once; where the dtype cannot hold the fold exactly (bfloat16/float16) it is refused: pass --dtype float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sae_jax.formats import SAEFormatError, load_sae, quiet_orbax, save_sae

_BY_SUFFIX = {".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("src", help="sae-jax directory (spec.json + params/), or any format load_sae reads")
    p.add_argument("dst", help="file or folder to write")
    p.add_argument("--format", choices=("pt", "safetensors", "saelens", "sparsify"), help="default: pt for *.pt/*.pth, safetensors for *.safetensors, else saelens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype written (default: the SAE's)")
    p.add_argument("--model-name", help="SAELens metadata.model_name, e.g. meta-llama/Llama-3.2-1B-Instruct")
    p.add_argument("--context-size", type=int, help="SAELens metadata.context_size (tokens per training sequence)")
    p.add_argument("--dataset-path", help="SAELens metadata.dataset_path, e.g. lmsys/lmsys-chat-1m")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = p.parse_args(argv)
    quiet_orbax()
    fmt = args.format or _BY_SUFFIX.get(Path(args.dst).suffix, "saelens")
    fields = {"model_name": args.model_name, "context_size": args.context_size, "dataset_path": args.dataset_path}
    metadata = {k: v for k, v in fields.items() if v is not None}
    try:
        sae = load_sae(args.src)
        dst = save_sae(sae, args.dst, fmt, overwrite=args.overwrite, metadata=metadata or None, dtype=args.dtype)
    except (SAEFormatError, OSError) as e:
        print(f"jax_to_torch: error: {e}", file=sys.stderr)
        return 1
    s = sae.spec
    dtype = args.dtype or s.dtype
    print(f"wrote {dst} ({fmt}: {s.architecture}, D={s.d_in}, N={s.n_latents}, {dtype}, input_scale {s.input_scale} folded)"
          if s.input_scale != 1.0 else f"wrote {dst} ({fmt}: {s.architecture}, D={s.d_in}, N={s.n_latents}, {dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
