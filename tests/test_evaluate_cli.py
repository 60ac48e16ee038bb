"""`python evaluate.py`: a run on chat rows through a tiny model, its files, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sae_helpers import entry_point, run_entry, without_progress

from sae_jax.config import TextConfig
from sae_jax.evaluate import text_batches


@pytest.fixture(scope="module")
def evaluate_py():
    return entry_point("evaluate")


def test_evaluate_prints_the_table_and_writes_its_files(ws, evaluate_py, capsys, tmp_path):
    args = [
        "--sae",
        ws.sae,
        "--model",
        ws.model,
        "--data",
        ws.chats,
        "--tokens",
        300,
        "--context-size",
        64,
        "--seqs",
        4,
        "--out",
        tmp_path / "ev",
    ]
    rc, out, err = run_entry(evaluate_py, args, capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"SAE {ws.sae} on {ws.model}, data {ws.chats}"
    assert lines[1].startswith("layer 2 input: ") and lines[1].endswith(" sequences")
    end = lines.index("site check (explained variance of this SAE on each residual):")
    table = {line[:36].strip(): line[36:].strip() for line in lines[2:end]}
    assert (
        table["explained variance"] == "1.0000"
        and table["loss recovered"] == "1.0000"
        and table["delta LM loss"] == "0.0000"
    )
    assert table["dead latents (never fired)"] == "0.00%" and table["L0 (active latents per token)"] == "64.00"
    assert (
        lines[end + 2] == "  input of layer 2 = output of layer 1         1.0000  <- best"
    )  # a tie everywhere: the SAE's own site wins
    assert lines[end + 1] == "  input of layer 1 = output of layer 0         1.0000" and len(lines) == end + 6
    assert (
        lines[-1]
        == f"wrote {tmp_path / 'ev' / 'eval.json'}, {tmp_path / 'ev' / 'feature_density.npy'}, {tmp_path / 'ev' / 'feature_density.png'}"
    )
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["tokens"] >= 300 and saved["loss_recovered"] == pytest.approx(1.0, abs=1e-6) and saved["layer"] == 2


def test_held_out_batches_never_wrap_around(ws, tok):
    cfg = TextConfig(path=str(ws.chats), context_size=64, seqs_per_batch=8, tokenizer=str(ws.model))
    assert len(list(text_batches(cfg, 0, tok))) == 5  # 40 rows, one per sequence
    assert len(list(text_batches(cfg, 16, tok))) == 3
    with pytest.raises(
        ValueError,
        match=r"chats.jsonl: expected at least one batch \(8 sequences\) of rows from row 36 on, found fewer",
    ):
        next(text_batches(cfg, 36, tok))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"--sae": "narrow"},
            "error: SAE {narrow} on model {model}: width d_in expected the model's hidden size 64, found 32",
        ),
        (
            {"--data": "missing"},
            "error: data.path: expected an existing file, found no such file '{tmp}/missing.jsonl'",
        ),
        ({"--model": "missing"}, "error: {tmp}/missing: not a directory (expected a Hugging Face model folder)"),
        ({"--sae": "missing"}, "error: {tmp}/missing: no such file or directory"),
        (
            {"--hook-layer": 4},
            "error: SAE {sae} on model {model}: hook_layer expected 0..3 (the model has 4 layers), found 4",
        ),
    ],
)
def test_bad_input_is_one_line(ws, evaluate_py, capsys, tmp_path, change, message):
    paths = {"narrow": ws.narrow_sae, "missing": tmp_path / "missing"}
    args = {"--sae": ws.sae, "--model": ws.model, "--data": ws.chats, "--tokens": 10}
    for k, v in change.items():
        args[k] = paths.get(v, v) if k != "--data" else tmp_path / "missing.jsonl"
    rc, out, err = run_entry(evaluate_py, [x for kv in args.items() for x in kv], capsys)
    assert (rc, out) == (1, "")
    assert (
        without_progress(err) == message.format(narrow=ws.narrow_sae, model=ws.model, sae=ws.sae, tmp=tmp_path) + "\n"
    )


def test_the_script_exits_1_with_one_line_and_no_traceback(ws, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_jax",
            "evaluate",
            "--sae",
            str(ws.narrow_sae),
            "--model",
            str(ws.model),
            "--data",
            str(ws.chats),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 1 and p.stdout == ""
    assert (
        without_progress(p.stderr)
        == f"error: SAE {ws.narrow_sae} on model {ws.model}: width d_in expected the model's hidden size 64, found 32\n"
    )
