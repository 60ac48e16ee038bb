"""Text rows -> token batches -> shuffled activation batches: exact contents, resumption, errors."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_jax.chat import format_chat
from sae_jax.config import ConfigError
from sae_jax.data import text as text_module
from sae_jax.data.activations import ActivationSource, llama_harvest
from sae_jax.data.demo_chats import write_demo_chats
from sae_jax.data.text import TextConfig, TextSource

SPECIAL = np.arange(128000, 128256)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = write_demo_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", 40, seed=0)
    return path, [json.loads(line)["conversation"] for line in path.read_text().splitlines()]


def embed_harvest(d: int):
    """A pure stand-in for the model: a fixed random embedding of the token plus 0.01 * position."""
    table = np.random.default_rng(0).standard_normal((128256, d)).astype(np.float32)
    return lambda ids, mask: table[ids] + 0.01 * np.arange(ids.shape[1], dtype=np.float32)[None, :, None]


def take(source, n):
    states, batches = [], []
    for _ in range(n):
        states.append(json.loads(json.dumps(source.state())))
        batches.append(source.next_batch())
    return states, batches


# --- demo rows ------------------------------------------------------------------------


def test_demo_chats_are_deterministic_and_lmsys_shaped(tmp_path):
    a = write_demo_chats(tmp_path / "a.jsonl", 25, seed=3).read_bytes()
    assert write_demo_chats(tmp_path / "b.jsonl", 25, seed=3).read_bytes() == a
    assert write_demo_chats(tmp_path / "c.jsonl", 25, seed=4).read_bytes() != a
    rows = [json.loads(line) for line in a.decode().splitlines()]
    assert len(rows) == 25
    for row in rows:
        conv = row["conversation"]
        assert 2 <= len(conv) <= 6 and row["turn"] == len(conv) // 2
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(isinstance(t["content"], str) and t["content"].strip() for t in conv)
    assert len({row["conversation"][0]["content"] for row in rows}) >= 20


# --- token batches --------------------------------------------------------------------


@pytest.mark.parametrize("exclude_special", [True, False])
def test_truncated_batches_are_formatted_rows(tok, chats, exclude_special):
    path, convs = chats
    src = TextSource(
        TextConfig(path=str(path), context_size=48, seqs_per_batch=3, exclude_special=exclude_special), tok
    )
    batches = [src.next_batch() for _ in range(2)]
    assert src.state() == {"epoch": 0, "row": 6, "offset": 0}
    for i, conv in enumerate(convs[:6]):
        b, s = batches[i // 3], i % 3
        assert b.input_ids.shape == (3, 48) and b.input_ids.dtype == np.int32 and b.attention_mask.dtype == np.int32
        expected = format_chat(tok, conv).input_ids[:48]
        n = len(expected)
        assert b.input_ids[s, :n].tolist() == expected
        assert b.attention_mask[s].tolist() == [1] * n + [0] * (48 - n)
        assert (b.input_ids[s, n:] == tok.eos_token_id).all()
        special = np.isin(b.input_ids[s], SPECIAL)
        assert b.keep[s].tolist() == (b.attention_mask[s].astype(bool) & ~(special & exclude_special)).tolist()


def test_packed_batches_cut_the_row_stream(tok, chats):
    path, convs = chats
    src = TextSource(TextConfig(path=str(path), context_size=32, seqs_per_batch=4, pack=True), tok)
    batches = [src.next_batch() for _ in range(5)]
    stream = [i for conv in convs for i in format_chat(tok, conv).input_ids]
    assert np.concatenate([b.input_ids.ravel() for b in batches]).tolist() == stream[: 5 * 4 * 32]
    assert all(b.attention_mask.all() for b in batches)
    assert all((b.keep == ~np.isin(b.input_ids, SPECIAL)).all() for b in batches)
    assert src.state()["offset"] > 0  # cut mid-row


@pytest.mark.parametrize("pack, read_rows", [(False, 64), (True, 64), (False, 3), (True, 2)])
def test_text_resumes_exactly_across_epochs(tok, tmp_path, monkeypatch, pack, read_rows):
    monkeypatch.setattr(text_module, "READ_ROWS", read_rows)  # rows tokenized per call: a read-ahead detail
    path = write_demo_chats(tmp_path / "small.jsonl", 7, seed=1)
    cfg = TextConfig(path=str(path), context_size=40, seqs_per_batch=3, pack=pack)
    states, batches = take(TextSource(cfg, tok), 14)
    assert states[-1]["epoch"] >= 1
    if pack:  # the stream wraps around: epoch after epoch of the same rows
        epoch = [
            i
            for line in path.read_text().splitlines()
            for i in format_chat(tok, json.loads(line)["conversation"]).input_ids
        ]
        flat = np.concatenate([b.input_ids.ravel() for b in batches]).tolist()
        assert flat == (epoch * (len(flat) // len(epoch) + 1))[: len(flat)]
    for i in (0, 1, 5, 9, 13):
        fresh = TextSource(cfg, tok)
        fresh.restore(states[i])
        for j in range(i, 14):
            assert all(np.array_equal(x, y) for x, y in zip(fresh.next_batch(), batches[j])), (i, j)


def test_plain_text_parquet(tok, tmp_path):
    texts = ["First line of text.", "", "  Second, with spaces and ünïcode."]
    pq.write_table(pa.table({"text": texts, "id": [1, 2, 3]}), tmp_path / "t.parquet")
    cfg = TextConfig(
        path=str(tmp_path / "t.parquet"),
        field="text",
        streaming=False,
        cache_dir=str(tmp_path / "hf"),
        context_size=16,
        seqs_per_batch=2,
    )
    b = TextSource(cfg, tok).next_batch()
    for s, text in enumerate([texts[0], texts[2]]):  # the empty row holds only BOS: nothing to keep, skipped
        expected = [128000] + tok(text, add_special_tokens=False)["input_ids"]
        assert b.input_ids[s, : len(expected)].tolist() == expected and b.attention_mask[s].sum() == len(expected)
    b = TextSource(dataclasses.replace(cfg, exclude_special=False), tok).next_batch()
    assert b.input_ids[1, :2].tolist() == [128000, tok.eos_token_id] and b.attention_mask[1].sum() == 1


def test_bad_input_fails_in_one_line(tok, chats, tmp_path):
    path, _ = chats
    with pytest.raises(FileNotFoundError, match=r"/nope\.jsonl: no such file$"):
        TextSource(TextConfig(path=str(tmp_path / "nope.jsonl")), tok)
    with pytest.raises(
        ConfigError, match=r"^data\.text\.path: expected an existing file, found no such file '.*nope\.jsonl'$"
    ):
        TextConfig(path=str(tmp_path / "nope.jsonl")).check("data.text")
    with pytest.raises(ValueError, match=r"chats\.jsonl: row 0 has no field 'messages'; found \['conversation', .*\]$"):
        TextSource(TextConfig(path=str(path), field="messages"), tok)
    with pytest.raises(
        ValueError, match=r"chats\.jsonl: row 0 field 'turn': expected a string or a list of turns, found int$"
    ):
        TextSource(TextConfig(path=str(path), field="turn"), tok)
    (tmp_path / "bad.jsonl").write_text('{"conversation": [{"role": "human", "content": "x"}]}\n')
    with pytest.raises(
        ValueError, match=r"bad\.jsonl: row 0 field 'conversation': conversation\[0\]\.role: expected one of"
    ):
        TextSource(TextConfig(path=str(tmp_path / "bad.jsonl")), tok)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    src = TextSource(TextConfig(path=str(tmp_path / "empty.jsonl"), field="text"), tok)
    with pytest.raises(ValueError, match=r"empty\.jsonl: no row has tokens to keep in field 'text'$"):
        src.next_batch()


# --- activation batches ---------------------------------------------------------------


def text_source(tok, path, context_size=64, seqs_per_batch=4):
    return TextSource(TextConfig(path=str(path), context_size=context_size, seqs_per_batch=seqs_per_batch), tok)


def test_activations_resume_exactly(tok, chats):
    path, _ = chats
    make = lambda: ActivationSource(
        text_source(tok, path), embed_harvest(8), d_in=8, batch_size=50, seed=7, buffer_tokens=600
    )
    states, batches = take(make(), 40)
    assert all(b.shape == (50, 8) and b.dtype == np.float32 for b in batches)
    rounds = [s["round"] for s in states]
    assert rounds[-1] >= 4 and max(len(json.dumps(s)) for s in states) < 120
    first_of_round = rounds.index(2)
    for i in (0, 1, first_of_round - 1, first_of_round, first_of_round + 1, 25, 39):
        fresh = make()
        fresh.restore(states[i])
        for j in range(i, 40):
            assert np.array_equal(fresh.next_batch(), batches[j]), (i, j)
    other_seed = ActivationSource(text_source(tok, path), embed_harvest(8), 8, 50, seed=8, buffer_tokens=600)
    assert not np.array_equal(other_seed.next_batch(), batches[0])


def test_activations_are_kept_tokens_each_once_and_mixed(tok, chats):
    path, _ = chats
    keeps = []

    def tagging_harvest(ids, mask):  # activation = (call, sequence, position, token id)
        keeps.append(np.isin(ids, SPECIAL, invert=True) & (mask == 1))
        c, s, t = np.meshgrid(len(keeps) - 1, np.arange(ids.shape[0]), np.arange(ids.shape[1]), indexing="ij")
        return np.stack([c[0], s[0], t[0], ids], axis=-1).astype(np.float32)

    src = ActivationSource(text_source(tok, path), tagging_harvest, d_in=4, batch_size=64, seed=0, buffer_tokens=2000)
    batches = [src.next_batch() for _ in range(30)]
    served = np.concatenate(batches).astype(np.int64)
    assert len({tuple(r[:3]) for r in served}) == len(served)  # no token twice
    assert all(keeps[c][s, t] for c, s, t, _ in served)  # only kept positions
    assert not np.isin(served[:, 3], SPECIAL).any()
    left = (len(src._served) - src.offset) + len(src._deferred)
    assert len(served) + left == sum(int(k.sum()) for k in keeps)  # every kept token harvested is served or buffered
    sequences = [len({(c, s) for c, s, _, _ in b.astype(np.int64)}) for b in batches]
    assert min(sequences) >= 8, sequences  # unshuffled, 64 consecutive tokens span 1 or 2 sequences


def test_real_tiny_llama(tok, chats, tmp_path):
    from sae_jax.llama import load, write_tiny_checkpoint

    model = load(write_tiny_checkpoint(tmp_path / "tiny", num_hidden_layers=3, dtype="float32"), dtype="float32")
    path, _ = chats
    harvest = llama_harvest(model, 2, "input")
    make = lambda: ActivationSource(
        text_source(tok, path, context_size=32, seqs_per_batch=2),
        harvest,
        d_in=64,
        batch_size=32,
        seed=0,
        buffer_tokens=256,
    )
    states, batches = take(make(), 6)
    assert all(b.shape == (32, 64) and b.dtype == np.float32 and np.isfinite(b).all() for b in batches)
    fresh = make()
    fresh.restore(states[3])
    assert all(np.array_equal(fresh.next_batch(), batches[j]) for j in range(3, 6))
    # Batch 0's rows are residuals of kept tokens of the first text batches (here computed as one [8, 32] forward).
    text = text_source(tok, path, context_size=32, seqs_per_batch=2)
    tb = [text.next_batch() for _ in range(4)]  # half 0 (>= 128 kept tokens) lies within 4 batches of 2 x 32
    ids, mask, keep = (np.concatenate([getattr(b, f) for b in tb]) for f in ("input_ids", "attention_mask", "keep"))
    rows = np.asarray(harvest(ids, mask))[keep]
    nearest = np.abs(batches[0][:, None, :] - rows[None]).max(-1).min(-1)
    assert nearest.max() < 1e-5
