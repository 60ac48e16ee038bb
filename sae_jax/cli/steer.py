"""`sae-jax steer`: greedy generation with one SAE latent steered at the SAE's site, beside the plain one.

    sae-jax steer --sae PATH --model HF_DIR --prompt "Tell me a story." --feature 123 --alpha 4 --alpha 8

The prompt is chat-formatted as a user turn (--raw: plain text after BOS). Mode add: x' = x + alpha *
W_dec[feature] at every position (the notebook's encode / add alpha / decode / add back the error); clamp
sets the latent to alpha. Unlike the notebook's hooks, layer L's attention and MLP still run.
"""

from __future__ import annotations

import argparse

from sae_jax.cli.session import add_args


def add(sub) -> None:
    p = sub.add_parser(
        "steer",
        help="generate with one latent steered",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args(p)
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--feature", type=int, required=True, help="the latent to steer")
    p.add_argument("--alpha", type=float, action="append", required=True, help="steering strength; repeat for several")
    p.add_argument(
        "--mode", choices=("add", "clamp"), default="add", help="add alpha to the latent, or clamp it to alpha"
    )
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    p.add_argument("--raw", action="store_true", help="no chat format: BOS + the prompt text")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sae_jax.attach import check_feature
    from sae_jax.chat import format_chat
    from sae_jax.cli.session import load_checked_tokenizer, open_session
    from sae_jax.llama.generate import generate
    from sae_jax.steer import steering_edit

    s = open_session(args)
    check_feature(s.sae, args.feature)
    tok = load_checked_tokenizer(s.tokenizer_name, s.model)
    if args.raw:
        ids = [tok.bos_token_id, *tok(args.prompt, add_special_tokens=False)["input_ids"]]
    else:
        ids = format_chat(tok, [{"role": "user", "content": args.prompt}], add_generation_prompt=True).input_ids
    ids = np.asarray([ids], np.int32)
    vocab = s.model.config.vocab_size
    eos = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")) if isinstance(i, int) and i < vocab]
    text = lambda t: repr(tok.decode([int(i) for i in t[0]]))
    sp = s.sae.spec
    print(f"prompt ({ids.shape[1]} tokens): {args.prompt!r}")
    print(f"plain: {text(generate(s.model, ids, args.max_new_tokens, eos_ids=eos))}")
    for alpha in args.alpha:
        edit = steering_edit(s.sae, args.feature, alpha, args.mode)
        out = generate(s.model, ids, args.max_new_tokens, edit=edit, eos_ids=eos)
        print(f"feature {args.feature} {args.mode} {alpha:g} at layer {sp.hook_layer} {sp.hook_site}: {text(out)}")
    return 0
