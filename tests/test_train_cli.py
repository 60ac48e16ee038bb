"""`python train.py`: bad configs end in one line on stderr, non-zero exit, no traceback."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sae_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def train_here(capsys, *args) -> subprocess.CompletedProcess:
    """What `python train.py ARGS` runs (the shim's one call), in this process: for the errors found before any
    work starts, where a new interpreter per case would only add its start-up. The tests below that train, stop
    or print usage run the real script."""
    capsys.readouterr()
    rc = main(["train", *map(str, args)], prog="train.py")
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "yaml_text, sets, expected",
    [
        ("train: {stpes: 10}\n", [], "train.stpes: unknown key"),
        ("train: {steps: ten}\n", [], "train.steps: expected an integer, found str 'ten'"),
        ("train: {lr: -0.001}\n", [], "train.lr: expected a finite number > 0, found -0.001"),
        (
            "sae: {architecture: topk, d_in: 8, expansion: 2, k: 17}\n",
            [],
            "sae.k: expected 1 <= k <= N = 16 for topk, found 17",
        ),
        (
            "data: {source: disk, disk: {path: /no/such/acts}}\n",
            [],
            "data.disk.path: expected an existing file or folder",
        ),
        (
            "",
            ["sae.architecture=gated"],
            "sae.architecture: expected 'relu' or 'topk' or 'batchtopk' or 'jumprelu' or 'matryoshka', found 'gated'",
        ),
        ("", ["train"], "--set train: expected key.path=value"),
        ("[1, 2]\n", [], "expected a mapping at the top level"),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, yaml_text, sets, expected):
    args = ["--config", write(tmp_path, yaml_text)]
    for s in sets:
        args += ["--set", s]
    r = train_here(capsys, *args)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert expected in r.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_config_file_is_one_line(tmp_path, capsys):
    r = train_here(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: expected a YAML config file, found no such file"


def test_help_config_documents_every_key(capsys):
    r = train_here(capsys, "--help-config")
    assert r.returncode == 0
    assert "train.l1_coefficient = 5.0: lambda in loss" in r.stdout
    assert "sae.hook_site = 'input'" in r.stdout


def test_no_config_prints_usage_and_starts_nothing(tmp_path):
    r = run_train(cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("usage: train.py [-h] [--config CONFIG]")
    assert (
        r.stderr.splitlines()[-1]
        == "error: --config: expected a YAML config (for example configs/demo.yaml), found none"
    )
    assert list(tmp_path.iterdir()) == []


def test_unknown_key_suggests_the_closest(tmp_path, capsys):
    r = train_here(capsys, "--config", write(tmp_path, "train: {l1_coeficient: 2}\n"))
    assert r.returncode == 1
    assert r.stderr == "error: train.l1_coeficient: unknown key; did you mean 'l1_coefficient'?\n"


def test_config_paths_resolve_against_the_config_file(tmp_path):
    from sae_jax.config import load_config

    (tmp_path / "cfgs").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.npy").write_bytes(b"")
    p = tmp_path / "cfgs" / "c.yaml"
    p.write_text("data: {source: disk, disk: {path: ../shards}}\nrun: {out_dir: ../runs/x}\n")
    cfg = load_config(p, ["data.text.path=lmsys/lmsys-chat-1m"])
    assert (cfg.data.disk.path, cfg.run.out_dir) == (str(tmp_path / "shards"), str(tmp_path / "runs" / "x"))
    assert cfg.data.text.path == "lmsys/lmsys-chat-1m"  # --set values are as given (a hub id here)


def tiny_run_args(tmp_path, *sets: str) -> list[str]:
    """train.py's arguments for a tiny synthetic run in tmp_path/run (D=8, N=16, 16-token batches), plus `sets`."""
    base = [
        f"run.out_dir={tmp_path / 'run'}",
        "sae.d_in=8",
        "sae.expansion=2",
        "data.batch_size=16",
        "train.lr_warmup_steps=1",
        *sets,
    ]
    return ["--no-progress", "--config", write(tmp_path, "{}\n"), *(x for s in base for x in ("--set", s))]


def test_train_cli_trains_resumes_and_exports(tmp_path):
    args = tiny_run_args(tmp_path, "train.steps=6", "run.save_every=3")
    r = run_train(*args)
    assert r.returncode == 0, r.stderr
    assert f"trained 6 steps; SAE exported to {tmp_path / 'run' / 'sae'}" in r.stdout
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "run").rglob("*")}
    r2 = run_train(*args)  # the same command again: nothing left to do, same result, no file touched
    assert r2.returncode == 0 and "trained 6 steps" in r2.stdout
    assert r2.stdout.splitlines()[0] == f"run {tmp_path / 'run'} is complete (6 steps); nothing to do"
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "run").rglob("*")} == before


def test_config_contradicting_the_model_writes_nothing(tmp_path):
    from llama_helpers import tiny

    tiny(tmp_path / "model", num_hidden_layers=2)
    (tmp_path / "chats.jsonl").write_text('{"conversation": [{"role": "user", "content": "hi"}]}\n')
    cfg = write(
        tmp_path,
        "sae: {d_in: 8, expansion: 2, hook_layer: 1}\ndata: {source: llama, model: {path: model}, "
        "text: {path: chats.jsonl, tokenizer: llama3-offline}}\nrun: {out_dir: run}\n",
    )
    r = run_train("--no-progress", "--config", cfg)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith(f"error: sae.d_in: expected the hidden size of {tmp_path / 'model'}")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_names_the_checkpoint_kept(tmp_path):
    import signal
    import time

    args = [sys.executable, str(ROOT / "train.py")]
    args += tiny_run_args(tmp_path, "train.steps=100000", "run.save_every=5", "run.log_every=5", "run.eval_every=0")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    done = lambda: [c for c in (tmp_path / "run" / "checkpoints").glob("*") if c.name.isdigit()]  # finalized ones
    while not done() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted: checkpoint (\d+) kept; rerun the same command to resume", last), err
    kept = int(last.split()[2])
    assert kept % 5 == 0 and (tmp_path / "run" / "checkpoints" / str(kept)).is_dir()
    assert "Traceback" not in err


def test_evaluate_scores_a_synthetic_run_against_its_true_directions(tmp_path):
    cfg = write(
        tmp_path,
        "sae: {d_in: 8, expansion: 2}\ndata: {batch_size: 16}\ntrain: {steps: 4, lr_warmup_steps: 1}\n"
        "run: {out_dir: run, eval_batches: 1}\n",
    )
    assert run_train("--no-progress", "--config", cfg).returncode == 0
    r = subprocess.run(
        [sys.executable, "-m", "sae_jax", "evaluate", "--config", cfg, "--tokens", "32", "--out", str(tmp_path / "ev")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"SAE {tmp_path / 'run' / 'sae'} on synthetic data (32 tokens)"
    assert lines[-2].startswith("ground truth: recovered ") and " MCC " in lines[-2]
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["tokens"] == 32 and 0 <= saved["ground_truth"]["mcc"] <= 1
    assert saved["ground_truth"]["n_true_features"] == 512
