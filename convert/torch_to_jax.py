"""Convert a release .pt/.safetensors file, a SAELens folder or a sparsify hookpoint folder to the sae-jax format."""

from __future__ import annotations

import argparse
import sys

from sae_jax.formats import SAEFormatError, load_sae, quiet_orbax, save_sae
from sae_jax.sae import SITES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("src", help="release .pt/.pth/.safetensors file, a SAELens folder (cfg.json + sae_weights.safetensors) or a sparsify hookpoint folder (cfg.json + sae.safetensors)")
    p.add_argument("dst", help="directory to write (spec.json + params/)")
    p.add_argument("--hook-layer", type=int, help="decoder layer whose residual the SAE reads (default: SAELens's hook_name, sparsify's folder name, else 9)")
    p.add_argument("--hook-site", choices=SITES, help="input: entering the layer (the notebook's hook); output: leaving it (default: SAELens's hook_name, else input)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = p.parse_args(argv)
    quiet_orbax()
    try:
        sae = load_sae(args.src, hook_layer=args.hook_layer, hook_site=args.hook_site)
        dst = save_sae(sae, args.dst, "jax", overwrite=args.overwrite)
    except (SAEFormatError, OSError) as e:
        print(f"torch_to_jax: error: {e}", file=sys.stderr)
        return 1
    s = sae.spec
    print(f"wrote {dst} (jax: {s.architecture}, D={s.d_in}, N={s.n_latents}, {s.dtype}, layer {s.hook_layer} {s.hook_site})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
