"""Non-finite inputs, loss, gradients or params: 'stop' ends in one line naming the step and keeps the
last good checkpoint; 'skip' leaves the params as they were and counts the batch in metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from sae_helpers import without_progress

from sae_jax.checkpoint import Checkpoints
from sae_jax.config import load_config
from sae_jax.run import NonFiniteError, train
from sae_jax.trainer import init_state

ROOT = Path(__file__).resolve().parents[1]
B, D, SCALE_BATCHES, STEPS = 32, 8, 2, 20
BAD_STEP = 7  # the step (1-based) whose batch holds the bad row


def sets(out_dir: Path, acts: Path | None = None, **extra) -> list[str]:
    s = [
        f"sae.d_in={D}",
        "sae.expansion=4",
        f"data.batch_size={B}",
        f"train.steps={STEPS}",
        "train.lr=1e-2",
        "train.lr_warmup_steps=3",
        "run.save_every=5",
        "run.log_every=5",
        f"train.scale_batches={SCALE_BATCHES}",
        f"run.out_dir={out_dir}",
    ]
    if acts is not None:
        s += ["data.source=disk", f"data.disk.path={acts}", "data.disk.shuffle=false"]
    return s + [f"{k}={v}" for k, v in extra.items()]


def activations(tmp_path: Path, value: float, step: int = BAD_STEP, row: int = 5) -> Path:
    """One unshuffled shard, long enough for the whole run; `value` at `row` of the batch of `step`.

    The first SCALE_BATCHES batches estimate the input scale; step k then reads batch SCALE_BATCHES + k - 1.
    """
    x = np.random.default_rng(0).standard_normal((B * (SCALE_BATCHES + STEPS), D)).astype(np.float32)
    x[B * (SCALE_BATCHES + step - 1) + row, 3] = value
    path = tmp_path / f"acts_{value}.npy"
    np.save(path, x)
    return path


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), "--no-progress", "--config", str(ROOT / "tests" / "defaults.yaml")]
    for s in args:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def checkpoint_steps(run: Path) -> list[str]:
    return sorted((p.name for p in (run / "checkpoints").iterdir()), key=lambda n: (len(n), n))


def test_nan_input_with_stop_exits_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    r = run_cli(sets(run, activations(tmp_path, float("nan"))))
    assert r.returncode == 1 and r.stdout == ""
    assert without_progress(r.stderr) == (
        f"error: step {BAD_STEP}: non-finite input activations; stopped (train.on_nonfinite=stop), "
        "the last good checkpoint, step 5, is kept\n"
    )
    assert checkpoint_steps(run) == ["5"] and not (run / "sae").exists()
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [5]
    c = Checkpoints(run / "checkpoints", keep=3)
    step, state, _ = c.restore_latest(jax.eval_shape(lambda: init_state(load_config(None, sets(run)))))
    c.close()
    assert step == 5 and int(state.skipped) == 0 and state.first_bad.tolist() == [-1, 0]
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_input_with_stop_names_the_step(tmp_path, value):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=rf"^step {BAD_STEP}: non-finite input activations; .* step 5, is kept$"):
        train(load_config(None, sets(run, activations(tmp_path, value))), progress=False)
    assert checkpoint_steps(run) == ["5"]


def test_nan_input_with_skip_leaves_params_unchanged_and_counts_it(tmp_path):
    acts = activations(tmp_path, float("nan"))
    cfg = lambda name, **kw: load_config(None, sets(tmp_path / name, acts, **{"train.on_nonfinite": "skip", **kw}))
    before = train(cfg("before"), stop_after=BAD_STEP - 1, progress=False).state
    at = train(cfg("at"), stop_after=BAD_STEP, progress=False).state
    whole = train(cfg("whole"), progress=False)
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)), jax.tree.leaves((at.params, at.opt_state))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # the bad batch moved nothing, Adam's count included
    assert int(at.skipped) == 1 and at.first_bad.tolist() == [BAD_STEP - 1, 1]
    assert int(whole.state.step) == STEPS and int(whole.state.skipped) == 1
    skipped = {
        json.loads(l)["step"]: json.loads(l)["skipped"]
        for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    }
    assert skipped == {5: 0, 10: 1, 15: 1, 20: 1}
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(whole.sae.params))
    # the step after the skipped one trains again
    after = train(cfg("after"), stop_after=BAD_STEP + 1, progress=False).state
    assert np.asarray(after.params.W_enc).tobytes() != np.asarray(at.params.W_enc).tobytes()


def test_nan_in_the_scale_estimate_is_one_line(tmp_path):
    """A NaN among the batches that set the input scale: nothing to train from, whatever on_nonfinite says."""
    acts = activations(tmp_path, float("nan"), step=1 - SCALE_BATCHES)
    with pytest.raises(
        NonFiniteError, match=r"^input scale: expected a finite positive mean activation norm, found nan$"
    ):
        train(load_config(None, sets(tmp_path / "run", acts, **{"train.on_nonfinite": "skip"})), progress=False)


def test_learning_rate_that_overflows_the_loss_stops_at_step_2(tmp_path):
    """lr 1e30: step 1 moves the params to ~1e30 (finite); step 2's activations and loss overflow."""
    run = tmp_path / "run"
    extra = {"train.lr": "1e30", "train.lr_warmup_steps": 0, "run.log_every": 1, "run.save_every": 1}
    with pytest.raises(
        NonFiniteError,
        match=r"^step 2: non-finite loss; stopped \(train.on_nonfinite=stop\), the last good checkpoint, step 1, is kept$",
    ):
        train(load_config(None, sets(run, **extra)), progress=False)
    assert checkpoint_steps(run) == ["1"]


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_learning_rate_that_overflows_the_params_stops_before_saving_them(tmp_path, mode):
    """lr 1e300 is inf in float32: the gradients are finite but the update is not. Skipping cannot recover."""
    run = tmp_path / "run"
    extra = {
        "train.lr": "1e300",
        "train.lr_warmup_steps": 0,
        "run.log_every": 1,
        "run.save_every": 1,
        "train.on_nonfinite": mode,
    }
    with pytest.raises(
        NonFiniteError,
        match=r"^by step 1: non-finite params \(an update overflowed; is train.lr too large\?\); stopped, no checkpoint was saved before it$",
    ):
        train(load_config(None, sets(run, **extra)), progress=False)
    assert checkpoint_steps(run) == []


def test_learning_rate_overflow_through_the_cli_is_one_line(tmp_path):
    r = run_cli(sets(tmp_path / "run", **{"train.lr": "1e30", "train.lr_warmup_steps": 0, "run.log_every": 1}))
    assert r.returncode == 1 and r.stdout == ""
    assert (
        without_progress(r.stderr)
        == "error: step 2: non-finite loss; stopped (train.on_nonfinite=stop), no checkpoint was saved before it\n"
    )
