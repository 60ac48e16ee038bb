"""kill -9 at any moment, then the same command again: the run ends bit-identical to one never killed.

`train.py` runs as a subprocess on a tiny synthetic config that saves every 5
steps. It is SIGKILLed at seeded random moments: during start-up, while orbax
is writing a checkpoint (its `<step>.orbax-checkpoint-tmp` directory exists),
between saves, and while the SAE is being exported. Each kill is followed by
the same command; the last one runs to the end. The reference is the same
command never interrupted. Compared bit for bit: the final checkpoint (the
whole TrainState), the exported SAE, and metrics.jsonl (without tokens_per_s).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from sae_jax.checkpoint import Checkpoints
from sae_jax.config import load_config
from sae_jax.formats import load_sae
from sae_jax.trainer import init_state

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 160, 5
SETS = [
    "sae.d_in=8",
    "sae.expansion=4",
    "data.batch_size=32",
    f"train.steps={STEPS}",
    "train.lr=1e-2",
    "train.lr_warmup_steps=3",
    f"run.save_every={SAVE_EVERY}",
    "run.log_every=5",
    "run.keep=3",
    "train.scale_batches=2",
]
TMP = ".orbax-checkpoint-tmp"


def command(out_dir: Path) -> list[str]:
    args = [sys.executable, str(ROOT / "train.py"), "--no-progress", "--config", str(ROOT / "tests" / "defaults.yaml")]
    for s in SETS + [f"run.out_dir={out_dir}"]:
        args += ["--set", s]
    return args


def start(out_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(command(out_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def listing(d: Path) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def logged_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError, KeyError):
        return 0  # a line being written


def kill_when(p: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """Poll (about every 0.2 ms) until `ready()`; then SIGKILL. False if the run ended first."""
    end = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < end:
        if ready():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.0002)
    p.wait()
    return False


def saving_at_least(ckpts: Path, step: int):
    """A save of a step >= `step` has started: its temporary directory exists."""
    return lambda: any(n.endswith(TMP) and int(n.split(".")[0]) >= step for n in listing(ckpts))


def test_kill_9_anywhere_then_rerun_is_bit_identical(tmp_path):
    ref_dir, run = tmp_path / "ref", tmp_path / "run"
    ref = start(ref_dir)  # runs beside the killed ones
    ckpts = run / "checkpoints"
    rng = random.Random(20240607)
    a, b, c = sorted(rng.sample(range(20, STEPS - 20, SAVE_EVERY), 3))
    plan = [
        ("during start-up", lambda: _after(lambda: True, rng.uniform(0.5, 2.5))),
        (f"in the save of step >= {a}", lambda: saving_at_least(ckpts, a)),
        (f"between saves, after step {b}", lambda: _after(lambda: logged_step(run) >= b, rng.uniform(0, 0.02))),
        (f"in the save of step >= {c}", lambda: saving_at_least(ckpts, c)),
        (
            "while exporting the SAE",
            lambda: lambda: any(n.startswith(".sae.") and n.endswith(".tmp") for n in listing(run)),
        ),
    ]
    tmp_left, last_steps = [], []
    for what, make_ready in plan:
        p = start(run)
        assert kill_when(p, make_ready()), f"the run ended before the kill {what}: {p.stderr.read()[-2000:]}"
        assert p.returncode == -signal.SIGKILL
        tmp_left += [n for n in listing(ckpts) if n.endswith(TMP)]
        last_steps.append(max([int(n) for n in listing(ckpts) if n.isdigit()], default=0))
    # Kills landed at different points of the run, and at least one left orbax's temporary directory behind.
    assert last_steps == sorted(last_steps) and last_steps[-1] == STEPS, last_steps
    assert tmp_left, "no kill landed inside a checkpoint write"

    final = subprocess.run(command(run), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert final.stdout.splitlines()[0] == f"trained {STEPS} steps; SAE exported to {run / 'sae'}"
    assert "unreadable" not in final.stderr  # a kill never leaves a checkpoint that looks complete but is not
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    assert final.stdout.splitlines()[1:] == out.splitlines()[1:]  # the held-out eval line

    # Nothing half-written is left: no orbax temporaries, no set-aside checkpoints, no export temporaries.
    assert sorted(listing(ckpts)) == [str(s) for s in sorted(range(STEPS - 10, STEPS + 1, SAVE_EVERY))]
    assert sorted(listing(run)) == ["checkpoints", "config.yaml", "eval.json", "metrics.jsonl", "sae"]
    assert (run / "eval.json").read_text() == (ref_dir / "eval.json").read_text()
    assert_same_final_state(ref_dir, run)
    assert_same_arrays(load_sae(ref_dir / "sae").params, load_sae(run / "sae").params)
    assert metrics(run) == metrics(ref_dir)


def _after(ready, delay: float):
    """`ready`, then `delay` seconds more."""
    seen = []

    def check():
        if not seen and ready():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    return check


def assert_same_final_state(a: Path, b: Path) -> None:
    abstract = jax.eval_shape(lambda: init_state(load_config(None, SETS)))
    states = []
    for run in (a, b):
        c = Checkpoints(run / "checkpoints", keep=3)
        step, state, meta = c.restore_latest(abstract)
        c.close()
        assert step == STEPS
        states.append((state, meta))
    assert states[0][1] == states[1][1]  # data position and input scale
    assert_same_arrays(states[0][0], states[1][0])


def assert_same_arrays(x, y) -> None:
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(lx) == len(ly)
    for u, v in zip(lx, ly):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape
        assert u.tobytes() == v.tobytes()


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s")
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))
    return rows
