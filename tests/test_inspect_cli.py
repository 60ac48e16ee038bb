"""`python inspect_features.py chat|contexts` on a tiny model: what they print, and one-line errors."""

from __future__ import annotations

import json

import pytest
from sae_helpers import entry_point, run_entry, without_progress


@pytest.fixture(scope="module")
def inspect_py():
    return entry_point("inspect")


def common(ws):
    return ["--sae", ws.sae, "--model", ws.model]


def test_chat_from_flags_and_from_a_file_print_the_same(ws, inspect_py, capsys, tmp_path):
    rc, out, err = run_entry(
        inspect_py, ["chat", *common(ws), "--user", "Hi", "--assistant", "Hello there!", "--top", 3], capsys
    )
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "top 3 features, mean activation over 3 assistant tokens:"  # "Hello", " there", "!"
    assert lines[4] == "token by token: which of them fire above 0 (role: system/user/assistant, '-' for framing)"
    assert (
        len(lines) == 5 + 15
    )  # one line per token: BOS, header (3), \n\n, Hi, eot, header (3), \n\n, Hello, there, !, eot
    conv = tmp_path / "conv.json"
    conv.write_text(
        json.dumps(
            {"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}
        )
    )
    rc, again, _ = run_entry(inspect_py, ["chat", *common(ws), "--conversation", conv, "--top", 3], capsys)
    assert rc == 0 and again == out


def test_contexts_prints_each_feature_s_top_tokens(ws, inspect_py, capsys):
    args = [
        "contexts",
        *common(ws),
        "--data",
        ws.chats,
        "--feature",
        0,
        "--feature",
        64,
        "--tokens",
        200,
        "--top",
        3,
        "--context-size",
        64,
        "--seqs",
        4,
    ]
    rc, out, err = run_entry(inspect_py, args, capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert (
        lines[0] == "feature 0: top 3 activations" and lines[4] == "feature 64: top 3 activations" and len(lines) == 8
    )
    acts = [float(line.split()[0]) for line in lines[1:4]]
    assert acts == sorted(acts, reverse=True) and all("[[" in line and "]]" in line for line in lines[1:4])


@pytest.mark.parametrize(
    "args, message",
    [
        (["chat", "--user", "Hi"], "error: conversation: expected assistant tokens to average over, found none"),
        (
            ["chat"],
            "error: conversation: expected --conversation FILE or --user/--assistant/--system text, found neither",
        ),
        (["chat", "--conversation", "nope.json"], "error: nope.json: no such file (expected a JSON conversation)"),
        (
            ["contexts", "--data", "CHATS", "--feature", 128],
            "error: feature: expected an id in 0..127 (the SAE has 128 latents), found 128",
        ),
    ],
)
def test_bad_input_is_one_line(ws, inspect_py, capsys, args, message):
    args = [ws.chats if a == "CHATS" else a for a in args]
    rc, out, err = run_entry(inspect_py, [args[0], *common(ws), *args[1:]], capsys)
    assert (rc, out, without_progress(err)) == (1, "", message + "\n")
