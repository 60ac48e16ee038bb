"""`sae-jax inspect chat|contexts`: what an SAE's latents respond to.

    sae-jax inspect chat --sae PATH --model HF_DIR --user "Hi" --assistant "Hello! How can I help?"
    sae-jax inspect chat --sae PATH --model HF_DIR --conversation conv.json   # [{role, content}, ...]
    sae-jax inspect contexts --sae PATH --model HF_DIR --data CHATS.jsonl --feature 12 --feature 40

chat: the top latents by mean activation over the assistant's tokens, then token
by token which of them fire above --threshold (the notebook's view).
contexts: each latent's top-activating tokens over a dataset, with their context.
"""

from __future__ import annotations

import argparse

from sae_jax.cli.session import add_args, say


def add(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="top features of a conversation, or top contexts of features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    views = p.add_subparsers(dest="view", metavar="VIEW", required=True)
    chat = views.add_parser("chat", help="top features of one conversation, token by token")
    add_args(chat)
    chat.add_argument("--conversation", help="JSON file: [{role, content}, ...] or {conversation: [...]}")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--user", help="the user's message")
    chat.add_argument("--assistant", help="the assistant's reply")
    chat.add_argument("--top", type=int, default=10, help="how many top features (default 10)")
    chat.add_argument("--threshold", type=float, default=0.0, help="show a feature on a token when above this")
    chat.add_argument(
        "--role",
        choices=("system", "user", "assistant"),
        default="assistant",
        help="whose tokens to average over (default assistant)",
    )
    ctx = views.add_parser("contexts", help="top-activating contexts of features over a dataset")
    add_args(ctx)
    ctx.add_argument("--data", required=True, help="a local .jsonl/.json/.parquet file or a hub dataset id")
    ctx.add_argument("--field", default="conversation", help="row field: {role, content} turns or a string")
    ctx.add_argument("--feature", type=int, action="append", required=True, help="a latent id; repeat for several")
    ctx.add_argument("--tokens", type=int, default=100_000, help="kept tokens to scan (default 100000)")
    ctx.add_argument("--top", type=int, default=10, help="contexts per feature (default 10)")
    ctx.add_argument("--before", type=int, default=12, help="tokens of context before (default 12)")
    ctx.add_argument("--after", type=int, default=4, help="tokens of context after (default 4)")
    ctx.add_argument("--context-size", type=int, default=256, help="tokens per sequence (default 256)")
    ctx.add_argument("--seqs", type=int, default=8, help="sequences per forward pass (default 8)")


def run(args: argparse.Namespace) -> int:
    from sae_jax import inspect_features as F
    from sae_jax.attach import check_feature
    from sae_jax.chat import read_conversation
    from sae_jax.cli.session import load_checked_tokenizer, open_session, tokenizer_name

    if args.view == "chat":
        given = (("system", args.system), ("user", args.user), ("assistant", args.assistant))
        turns = [{"role": r, "content": c} for r, c in given if c]
        if bool(args.conversation) == bool(turns):
            raise ValueError(
                "conversation: expected --conversation FILE or --user/--assistant/--system text, found "
                + ("both" if turns else "neither")
            )
        conversation = read_conversation(args.conversation) if args.conversation else turns
        s = open_session(args)
        from sae_jax.chat import format_chat

        tok = load_checked_tokenizer(s.tokenizer_name, s.model)
        cf = F.chat_features(s.model, s.sae, format_chat(tok, conversation), args.top, args.role)
        print(F.format_chat_features(cf, tok, args.threshold))
        return 0

    from sae_jax.config import TextConfig
    from sae_jax.evaluate import text_batches

    text = TextConfig(
        path=args.data,
        field=args.field,
        context_size=args.context_size,
        seqs_per_batch=args.seqs,
        tokenizer=tokenizer_name(args.model, args.tokenizer),
    )
    text.check("data")
    s = open_session(args)
    for i in args.feature:
        check_feature(s.sae, i)
    tok = load_checked_tokenizer(text.tokenizer, s.model)
    say(f"scanning {args.tokens} tokens of {args.data} for {len(args.feature)} features")
    found = F.top_contexts(
        s.model,
        s.sae,
        text_batches(text, 0, tok),
        args.feature,
        args.tokens,
        top=args.top,
        before=args.before,
        after=args.after,
        progress=True,
    )
    print(F.format_contexts(found, tok))
    return 0
