"""Feature inspection: a conversation's top features token by token, and a feature's top contexts, against brute force."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from llama_helpers import tiny
from sae_helpers import exact_sae

from sae_jax.chat import format_chat
from sae_jax.data.text import TokenBatch
from sae_jax.inspect_features import (
    Context,
    chat_features,
    check_feature,
    codes,
    context_text,
    format_chat_features,
    format_contexts,
    top_contexts,
)
from sae_jax.llama import load, residuals
from sae_jax.sae import SAE, SAESpec, encode, init_params

D, L = 64, 2
CONVERSATION = [
    {"role": "user", "content": "What is a river?"},
    {"role": "assistant", "content": "A river is a natural stream of water.\nIt flows to the sea."},
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The real 128256-token vocabulary, so chat-formatted ids fit."""
    return load(tiny(tmp_path_factory.mktemp("inspect") / "tiny", num_hidden_layers=4, vocab_size=128256))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tiny(tmp_path_factory.mktemp("inspect") / "small", num_hidden_layers=4))


def random_sae(architecture="relu", k=None) -> SAE:
    spec = SAESpec(architecture, D, 256, k=k, hook_layer=L)
    p = init_params(jax.random.key(0), spec, dec_norm=1.0)
    p.b_enc = jax.random.normal(jax.random.key(1), (256,)) * 0.3
    return SAE(p, spec)


def test_top_features_are_the_largest_means_over_the_assistant_tokens(chat_model, tok):
    sae = exact_sae(D, L)  # codes are [relu(x), relu(-x)]: every coordinate of the residual is a feature
    chat = format_chat(tok, CONVERSATION)
    cf = chat_features(chat_model, sae, chat, top=5)
    x = np.asarray(residuals(chat_model, np.asarray([chat.input_ids]), [L])[L])[0]
    f = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1)
    mean = f[np.asarray(chat.mask("assistant"))].mean(0)
    np.testing.assert_allclose(cf.codes, f, rtol=1e-5, atol=1e-4)  # jitted vs eager forward: float32 rounding only
    ours = cf.codes[np.asarray(chat.mask("assistant"))].mean(0)
    np.testing.assert_array_equal(cf.top_ids, np.argsort(-ours, kind="stable")[:5])
    np.testing.assert_array_equal(cf.top_ids, np.argsort(-mean, kind="stable")[:5])
    np.testing.assert_allclose(cf.top_means, np.sort(mean)[::-1][:5], rtol=1e-5)
    assert sum(chat.mask("assistant")) == 15


def test_token_by_token_lines_show_the_top_features_above_the_threshold(chat_model, tok):
    chat = format_chat(tok, CONVERSATION)
    cf = chat_features(chat_model, exact_sae(D, L), chat, top=4)
    text = format_chat_features(cf, tok, threshold=1.0).splitlines()
    T = len(chat.input_ids)
    assert len(text) == 1 + 4 + 1 + T
    assert text[0] == "top 4 features, mean activation over 15 assistant tokens:"
    assert text[1] == f"  feature {cf.top_ids[0]:>6}  {cf.top_means[0]:10.4f}"
    t = chat.mask("assistant").index(True) + 1  # the assistant's second token
    active = [f"{i}:{cf.codes[t, i]:.3f}" for i in cf.top_ids if cf.codes[t, i] > 1.0]
    assert active  # the line below shows something
    assert text[6 + t] == f"  {t:>4} a {repr(tok.decode([chat.input_ids[t]])):<24} {'  '.join(active)}"
    assert text[6].startswith("     0 - '<|begin_of_text|>'")


def test_no_tokens_of_the_role_is_a_one_line_error(chat_model, tok):
    chat = format_chat(tok, CONVERSATION[:1])
    with pytest.raises(ValueError, match="^conversation: expected assistant tokens to average over, found none$"):
        chat_features(chat_model, exact_sae(D, L), chat)


def batches(seed=0, n=3, S=4, T=20):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 512, (S, T)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[1, 12:] = 0
        keep = mask.astype(bool)
        keep[:, 0] = False
        out.append(TokenBatch(ids, mask, keep))
    return out


@pytest.mark.parametrize("architecture, k", [("relu", None), ("topk", 8)])
def test_codes_of_chosen_features_equal_the_full_codes_indexed(model, architecture, k):
    sae = random_sae(architecture, k)
    b = batches(n=1)[0]
    full = codes(model, sae, b.input_ids, b.attention_mask)
    np.testing.assert_allclose(
        codes(model, sae, b.input_ids, b.attention_mask, [5, 200, 5]), full[..., [5, 200, 5]], rtol=1e-5, atol=1e-4
    )
    x = residuals(model, b.input_ids, [L], b.attention_mask)[L]
    np.testing.assert_allclose(full, np.asarray(encode(sae, x)), rtol=1e-5, atol=1e-4)


def test_top_contexts_equal_brute_force(model):
    sae = random_sae()
    sae.params.b_enc = sae.params.b_enc.at[0].set(-1e3)  # latent 0 never fires
    bs = batches()
    f = np.concatenate([codes(model, sae, b.input_ids, b.attention_mask) for b in bs])  # [12, 20, 256]
    keep = np.concatenate([b.keep for b in bs])
    ids = np.concatenate([b.input_ids for b in bs])
    fires = ((f > 0) & keep[..., None]).sum((0, 1))
    busy, rare = int(np.argmax(fires)), int(np.argmin(np.where(fires > 0, fires, 10**9)))
    top = int(fires[rare]) + 3  # the rare latent fills fewer slots than asked for, the busy one all
    assert fires[busy] > top and fires[0] == 0
    found = top_contexts(model, sae, bs, [busy, rare, 0], 10**9, top=top, before=3, after=2)
    for i in (busy, rare):
        a = np.where(keep & (f[..., i] > 0), f[..., i], -np.inf)
        order = np.argsort(-a, axis=None, kind="stable")[: min(top, fires[i])]
        got = found[i]
        assert [(c.sequence, c.position) for c in got] == [divmod(int(p), 20) for p in order]
        np.testing.assert_allclose(
            [c.activation for c in got], a.ravel()[order], rtol=1e-5, atol=1e-5
        )  # narrow vs full encoder matmul
        for c in got:
            s, t = c.sequence, c.position
            lo = max(0, t - 3)
            want = [int(v) for j, v in enumerate(ids[s, lo : t + 3], lo) if bs[s // 4].attention_mask[s % 4, j]]
            assert list(c.ids) == want and c.ids[c.at] == ids[s, t]
    assert len(found[rare]) == fires[rare] and found[0] == []


def test_n_tokens_bounds_the_scan(model):
    sae = random_sae()
    bs = batches()
    first = top_contexts(model, sae, bs[:1], [7], 10**9, top=50)[7]
    assert top_contexts(model, sae, bs, [7], int(bs[0].keep.sum()), top=50)[7] == first
    assert max(c.sequence for c in first) < 4


def test_context_text_marks_the_token_and_shows_newlines(tok):
    ids = tok("The river\nflows", add_special_tokens=False)["input_ids"]
    at = [tok.decode([i]) for i in ids].index(" river")
    c = Context(2.5, 3, 7, tuple(ids), at)
    assert context_text(tok, c) == "The[[ river]]\\nflows"
    assert format_contexts({9: [c], 4: []}, tok).splitlines() == [
        "feature 9: top 1 activations",
        "      2.5000      3:7     The[[ river]]\\nflows",
        "feature 4: top 0 activations (never fired on these tokens)",
    ]


def test_feature_ids_are_checked():
    sae = random_sae()
    assert check_feature(sae, np.int64(255)) == 255
    for bad in (256, -1, 1.5, True):
        with pytest.raises(
            ValueError, match=r"^feature: expected an id in 0\.\.255 \(the SAE has 256 latents\), found "
        ):
            check_feature(sae, bad)
    with pytest.raises(ValueError, match="found 300"):
        top_contexts(None, sae, [], [1, 300], 10)
