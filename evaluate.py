"""Evaluate an SAE in its model on held-out text: reconstruction, sparsity, LM loss, and which site it fits.

    python evaluate.py --sae PATH --model HF_DIR --data CHATS.jsonl [--tokens N] [--out DIR]
    python evaluate.py --config configs/demo.yaml [--skip-rows 3000]     # model, text and run/sae from a train config

Prints a table; with --out writes eval.json, feature_density.npy and feature_density.png.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from sae_jax.cli import fail_in_one_line


def main(argv=None) -> int:
    from sae_jax.session import add_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p, model_required=False)
    p.add_argument("--config", help="a train config: its data.model, data.text and run.out_dir/sae are the defaults")
    p.add_argument("--data", help="held-out text: a local .jsonl/.json/.parquet file or a hub dataset id")
    p.add_argument("--field", help="row field: a list of {role, content} turns or a string (default: conversation)")
    p.add_argument("--split", help="dataset split (default: train)")
    p.add_argument("--context-size", type=int, help="tokens per sequence (default 1024, or the config's)")
    p.add_argument("--seqs", type=int, help="sequences per forward pass (default 8, or the config's)")
    p.add_argument("--skip-rows", type=int, default=0, help="start this many rows into the data (hold out what training read)")
    p.add_argument("--tokens", type=int, default=100_000, help="kept tokens to evaluate on (default 100000)")
    p.add_argument("--no-lm", action="store_true", help="skip the LM losses (reconstruction, density and site check only)")
    p.add_argument("--dense-threshold", type=float, default=0.1, help="a latent firing on more than this fraction of tokens is dense")
    p.add_argument("--out", help="folder to write eval.json, feature_density.npy and feature_density.png")
    args = p.parse_args(argv)

    from sae_jax.config import TextConfig, load_config
    from sae_jax.evaluate import evaluate, text_batches
    from sae_jax.session import load_checked_tokenizer, open_session, tokenizer_name

    text = TextConfig()
    if args.config:
        cfg = load_config(args.config)
        text = cfg.data.text
        args.model = args.model or cfg.data.model.path
        args.dtype = args.dtype or cfg.data.model.dtype
        args.sae = args.sae or str(Path(cfg.run.out_dir) / "sae")
    for name, value in (("--sae", args.sae), ("--model", args.model)):
        if not value:
            raise ValueError(f"{name}: expected a path (or --config), found none")
    changes = dict(path=args.data, field=args.field, split=args.split, context_size=args.context_size, seqs_per_batch=args.seqs)
    changes = {k: v for k, v in changes.items() if v is not None}
    changes["tokenizer"] = args.tokenizer or (text.tokenizer if args.config else tokenizer_name(args.model, None))
    text = dataclasses.replace(text, **changes)
    text.check("data")
    s = open_session(args)
    tok = load_checked_tokenizer(text.tokenizer, s.model)
    result = evaluate(s.model, s.sae, text_batches(text, args.skip_rows, tok), args.tokens, lm=not args.no_lm,
                      dense_threshold=args.dense_threshold)
    print(f"SAE {args.sae} on {args.model}, data {text.path}")
    print(result.table())
    if args.out:
        out = result.save(args.out)
        print(f"wrote {out / 'eval.json'}, {out / 'feature_density.npy'}, {out / 'feature_density.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(fail_in_one_line(main))
