"""`sae-jax evaluate`: an SAE in its model on held-out text (reconstruction, sparsity, LM loss, site check).

    sae-jax evaluate --config configs/demo.yaml [--skip-rows 3000]   # model, text and run/sae from a train config
    sae-jax evaluate --sae PATH --model HF_DIR --data CHATS.jsonl [--tokens N] [--out DIR]

Prints a table; with --out writes eval.json, feature_density.npy and feature_density.png.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from sae_jax.cli.session import add_args, say


def add(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate an SAE in its model on held-out text",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args(p, model_required=False)
    p.add_argument("--config", help="a train config: its data.model, data.text and run.out_dir/sae are the defaults")
    p.add_argument("--data", help="held-out text: a local .jsonl/.json/.parquet file or a hub dataset id")
    p.add_argument("--field", help="row field: a list of {role, content} turns or a string (default: conversation)")
    p.add_argument("--split", help="dataset split (default: train)")
    p.add_argument("--context-size", type=int, help="tokens per sequence (default 1024, or the config's)")
    p.add_argument("--seqs", type=int, help="sequences per forward pass (default 8, or the config's)")
    p.add_argument(
        "--skip-rows", type=int, default=0, help="start this many rows into the data (hold out what training read)"
    )
    p.add_argument("--tokens", type=int, default=100_000, help="kept tokens to evaluate on (default 100000)")
    p.add_argument(
        "--no-lm", action="store_true", help="skip the LM losses (reconstruction, density and site check only)"
    )
    p.add_argument(
        "--dense-threshold", type=float, default=0.1, help="a latent firing on more than this fraction is dense"
    )
    p.add_argument("--out", help="folder to write eval.json, feature_density.npy and feature_density.png")


def run(args: argparse.Namespace) -> int:
    from sae_jax.cli.session import load_checked_tokenizer, open_session, tokenizer_name
    from sae_jax.config import TextConfig, load_config

    text = TextConfig()
    if args.config:
        cfg = load_config(args.config)
        if cfg.data.source != "llama":
            return _synthetic(cfg, args)
        text = cfg.data.text
        args.model = args.model or cfg.data.model.path
        args.dtype = args.dtype or cfg.data.model.dtype
        args.sae = args.sae or str(Path(cfg.run.out_dir) / "sae")
    for name, value in (("--sae", args.sae), ("--model", args.model)):
        if not value:
            raise ValueError(f"{name}: expected a path (or --config), found none")
    changes = dict(
        path=args.data, field=args.field, split=args.split, context_size=args.context_size, seqs_per_batch=args.seqs
    )
    changes = {k: v for k, v in changes.items() if v is not None}
    changes["tokenizer"] = args.tokenizer or (text.tokenizer if args.config else tokenizer_name(args.model, None))
    text = dataclasses.replace(text, **changes)
    text.check("data")

    from sae_jax.evaluate import evaluate, text_batches

    s = open_session(args)
    tok = load_checked_tokenizer(text.tokenizer, s.model)
    say(f"evaluating on {args.tokens} tokens of {text.path}")
    result = evaluate(
        s.model,
        s.sae,
        text_batches(text, args.skip_rows, tok),
        args.tokens,
        lm=not args.no_lm,
        dense_threshold=args.dense_threshold,
        progress=True,
    )
    print(f"SAE {args.sae} on {args.model}, data {text.path}")
    print(result.table())
    if args.out:
        out = result.save(args.out)
        print(f"wrote {out / 'eval.json'}, {out / 'feature_density.npy'}, {out / 'feature_density.png'}")
    else:
        print("next: add --out DIR to keep eval.json and the feature density plot")
    return 0


def _synthetic(cfg, args: argparse.Namespace) -> int:
    """A run on synthetic or stored activations: its SAE scored on batches of the same source (synthetic: unseen)."""
    import json

    from sae_jax.data import make_source
    from sae_jax.formats import load_sae, quiet_orbax
    from sae_jax.run import score

    quiet_orbax()
    sae_dir = args.sae or str(Path(cfg.run.out_dir) / "sae")
    sae = load_sae(sae_dir)
    source = make_source(cfg)
    n = max(1, -(-args.tokens // cfg.data.batch_size))
    if cfg.data.source == "synthetic":  # past what training and its final eval read: unseen batches
        t = cfg.train
        source.restore({"index": t.scale_batches + t.steps + cfg.run.eval_batches})
        which = "unseen"
    else:
        which = "the first (training) batches of the"
    say(f"scoring {sae_dir} on {n} batches of {cfg.data.batch_size} tokens: {which} {cfg.data.source} activations")
    result = score(sae, source, n, cfg)
    print(f"SAE {sae_dir} on {cfg.data.source} data ({result['tokens']} tokens)")
    truth = result.pop("ground_truth", None)
    for k, v in result.items():
        print(f"  {k:24s} {v:.6g}" if isinstance(v, float) else f"  {k:24s} {v}")
    if truth is not None:
        from sae_jax.groundtruth import summary

        print(summary(truth))
        result["ground_truth"] = truth
    if args.out:
        from sae_jax.atomic import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'eval.json'}")
    return 0
