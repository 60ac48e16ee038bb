"""Which latents fire where: a conversation's top features, and a feature's top-activating contexts.

    cf = chat_features(model, sae, format_chat(tok, conversation), top=10)
    print(format_chat_features(cf, tok, threshold=0.5))      # the notebook's view
    ctx = top_contexts(model, sae, batches, [123], n_tokens=100_000)
    print(format_contexts(ctx, tok))

`chat_features` averages the codes over the assistant's content tokens and
ranks latents by that mean, then lists, token by token, which of those top
latents fire above a threshold (what the notebook shows). `top_contexts` scans
kept tokens of a dataset for the largest activations of chosen latents.
"""

from __future__ import annotations

import functools
import heapq
from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.attach import check_compatible, check_feature, narrow
from sae_jax.chat import ROLES, ChatTokens
from sae_jax.data.text import TokenBatch
from sae_jax.llama.model import Llama, residuals, site_index
from sae_jax.sae import SAE, encode


@functools.partial(jax.jit, static_argnums=0, static_argnames="site")
def _codes(graphdef, state, sae, input_ids, attention_mask, idx, *, site: int):
    f = encode(sae, residuals(nnx.merge(graphdef, state), input_ids, (site,), attention_mask)[site])
    return f if idx is None else f[..., idx]


def codes(model: Llama, sae: SAE, input_ids, attention_mask=None, features: Sequence[int] | None = None) -> np.ndarray:
    """The SAE's codes at its site: input_ids [B, T] -> [B, T, N] float32 (or [B, T, F] of `features`)."""
    check_compatible(sae, model)
    sae, idx = narrow(sae, features) if features is not None else (sae, None)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    site = site_index(model.config, sae.spec.hook_layer, sae.spec.hook_site)
    return np.asarray(_codes(graphdef, state, sae, ids, mask, idx, site=site))


class ChatFeatures(NamedTuple):
    tokens: ChatTokens  # the formatted conversation, T tokens
    codes: np.ndarray  # [T, N] float32
    role: str  # whose tokens were averaged
    top_ids: np.ndarray  # [K] latent ids, by decreasing mean activation over `role`'s tokens
    top_means: np.ndarray  # [K] those means


def chat_features(model: Llama, sae: SAE, tokens: ChatTokens, top: int = 10, role: str = "assistant") -> ChatFeatures:
    """The `top` latents by mean activation over `role`'s content tokens of one formatted conversation."""
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, found {role!r}")
    which = np.asarray(tokens.mask(role))
    if not which.any():
        raise ValueError(f"conversation: expected {role} tokens to average over, found none")
    f = codes(model, sae, np.asarray([tokens.input_ids], np.int32))[0]
    mean = f[which].mean(0)
    top = min(top, mean.size)
    order = np.argsort(-mean, kind="stable")[:top]
    return ChatFeatures(tokens, f, role, order, mean[order])


def token_text(tokenizer, token_id: int) -> str:
    """One token's text as a quoted Python literal, so spaces and newlines show."""
    return repr(tokenizer.decode([int(token_id)]))


def format_chat_features(cf: ChatFeatures, tokenizer, threshold: float = 0.0) -> str:
    """The top latents with their means, then per token its text and which top latents exceed `threshold`."""
    n = int(np.sum(cf.tokens.mask(cf.role)))
    lines = [f"top {len(cf.top_ids)} features, mean activation over {n} {cf.role} tokens:"]
    lines += [f"  feature {i:>6}  {m:10.4f}" for i, m in zip(cf.top_ids, cf.top_means)]
    lines.append(f"token by token: which of them fire above {threshold:g} (role: {'/'.join(ROLES)}, '-' for framing)")
    for t, (tid, r) in enumerate(zip(cf.tokens.input_ids, cf.tokens.roles)):
        active = [(i, cf.codes[t, i]) for i in cf.top_ids if cf.codes[t, i] > threshold]
        feats = "  ".join(f"{i}:{v:.3f}" for i, v in active)
        who = ROLES[r][0] if r >= 0 else "-"
        lines.append(f"  {t:>4} {who} {token_text(tokenizer, tid):<24} {feats}".rstrip())
    return "\n".join(lines)


class Context(NamedTuple):
    activation: float
    sequence: int  # index of the sequence in the scanned stream
    position: int  # index of the token in its sequence
    ids: tuple[int, ...]  # the token ids of the window around it
    at: int  # where the token sits in `ids`


def top_contexts(
    model: Llama,
    sae: SAE,
    batches: Iterable[TokenBatch],
    features: Sequence[int],
    n_tokens: int,
    *,
    top: int = 10,
    before: int = 12,
    after: int = 4,
    progress: bool = False,
) -> dict[int, list[Context]]:
    """{feature: its `top` largest activations over the kept tokens, largest first}, over `n_tokens` kept tokens.

    Each context holds up to `before` tokens before the token and `after` after it.
    Latents that never fire on the scanned tokens get an empty list. `progress`: a bar of kept tokens.
    """
    from tqdm import tqdm

    features = [check_feature(sae, i) for i in features]
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="scanning", disable=not progress, dynamic_ncols=True)
    heaps: dict[int, list] = {i: [] for i in features}
    seen, seq = 0, 0
    for batch in batches:
        if seen >= n_tokens:
            break
        f = codes(model, sae, batch.input_ids, batch.attention_mask, features)  # [S, T, F]
        keep = np.asarray(batch.keep, bool)
        seen += int(keep.sum())
        bar.update(min(int(keep.sum()), n_tokens - bar.n))
        for j, i in enumerate(features):
            a = np.where(keep & (f[..., j] > 0), f[..., j], -np.inf)
            flat = a.ravel()
            k = min(top, flat.size)
            for p in np.argpartition(-flat, k - 1)[:k]:
                if not np.isfinite(flat[p]):
                    continue
                s, t = divmod(int(p), a.shape[1])
                item = (float(flat[p]), -(seq + s), -t)  # ties: the earlier token wins
                if len(heaps[i]) < top:
                    heapq.heappush(heaps[i], (item, _window(batch, s, t, before, after)))
                elif item > heaps[i][0][0]:
                    heapq.heapreplace(heaps[i], (item, _window(batch, s, t, before, after)))
        seq += len(batch.input_ids)
    bar.close()
    return {
        i: [Context(a, -s, -t, ids, at) for (a, s, t), (ids, at) in sorted(heaps[i], reverse=True)] for i in features
    }


def _window(batch: TokenBatch, s: int, t: int, before: int, after: int) -> tuple[tuple[int, ...], int]:
    ids, mask = batch.input_ids[s], batch.attention_mask[s]
    lo, hi = max(0, t - before), min(len(ids), t + after + 1)
    window = [(int(i), j) for j, i in enumerate(ids[lo:hi], lo) if mask[j]]
    return tuple(i for i, _ in window), [j for _, j in window].index(t)


def context_text(tokenizer, c: Context) -> str:
    """The window's text with the token marked as [[token]], newlines shown as \\n."""
    left = tokenizer.decode(list(c.ids[: c.at]))
    mid = tokenizer.decode([c.ids[c.at]])
    right = tokenizer.decode(list(c.ids[c.at + 1 :]))
    return f"{left}[[{mid}]]{right}".replace("\n", "\\n")


def format_contexts(contexts: dict[int, list[Context]], tokenizer) -> str:
    """Per feature, its contexts as `activation  seq:pos  text`."""
    lines = []
    for i, cs in contexts.items():
        lines.append(f"feature {i}: top {len(cs)} activations" + ("" if cs else " (never fired on these tokens)"))
        lines += [f"  {c.activation:10.4f}  {c.sequence:>5}:{c.position:<5} {context_text(tokenizer, c)}" for c in cs]
    return "\n".join(lines)
