"""Two processes on localhost train as one device does: jax.distributed, 2 fake CPU devices each, gloo collectives.

Every run below is 2 real processes (JAX_COORDINATOR_ADDRESS on a free local
port, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID 0 and 1, XLA_FLAGS giving each 2
CPU devices) with `mesh.distributed=true`, sharing one run directory:

- "cli": `train.py` on {data: 2, model: 2}, the data axis across the processes;
- "stopped": this file as a script (`run.train`) on {data: 2, model: 2}, stopped after step 10;
- "resumed": the same, rerun to the end: it starts at checkpoint 9;
- "damaged": the finished run again on {data: 1, model: 4} (the latents
  across the processes) with checkpoint 12's `meta` garbled on disk (every
  process fails to read it) and process 1 alone failing to read checkpoint 9
  (injected, as a damaged shard only it reads would): both are set aside and
  the run resumes at checkpoint 6;
- a mesh of 2 devices for the processes' 4: both exit 1 with the same one-line error.

The reference is `run.train` of the same config on one process and one
device, in this process. Tolerance 1e-5, tests/test_sharding.py's: the mesh
changes only the order of float32 sums; 12 steps here measure <= 3e-7 of each
param's largest entry. The whole file takes ~40 s on 2 cores.

A process waiting on a collective that never comes would hang the suite:
each run has a deadline, after which both processes are killed and the test
fails with their output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
DEADLINE_S = 120  # one run takes ~8 s on 2 cores
GRACE_S = 10
SETS = [
    "sae.d_in=16",
    "sae.expansion=4",
    "data.batch_size=32",
    "train.steps=12",
    "train.lr=1e-3",
    "train.lr_warmup_steps=0",
    "run.save_every=3",
    "run.keep=3",
    "run.log_every=3",
    "run.eval_every=6",
    "run.eval_batches=2",
]
MESH_2x2 = ["mesh.data=2", "mesh.model=2", "mesh.distributed=true"]
MESH_1x4 = ["mesh.data=1", "mesh.model=4", "mesh.distributed=true"]
OUTPUTS = ["checkpoints", "config.yaml", "eval.json", "metrics.jsonl", "sae"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], logs: Path, codes: tuple[int, int] = (0, 0)) -> list[tuple[str, str]]:
    """Run `argv` as processes 0 and 1 of a 2-process job, output in `logs`; (stdout, stderr) of each, once both exit with `codes`.

    A process that fails leaves the other waiting in a collective: it gets GRACE_S, then both are killed.
    """
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if "_proxy" not in k.lower()
    }  # gRPC to localhost must not go through one
    env.update(
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
    )
    logs.mkdir(parents=True)
    procs = []
    for i in range(2):
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(
                subprocess.Popen(argv, cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=out, stderr=err)
            )
    start, failed_at = time.monotonic(), None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode for p in procs):
            failed_at = now
        if now - start > DEADLINE_S or (failed_at is not None and now - failed_at > GRACE_S):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.1)
    found = tuple(p.returncode for p in procs)
    if found != codes:
        tails = "\n".join(f"--- process {i}:\n{(logs / f'{i}.err').read_text()[-2000:]}" for i in range(2))
        what = "killed after the deadline (a collective waiting on a process?)" if -9 in found else "exit codes"
        pytest.fail(f"2-process run {what}: {found}, expected {codes} within {DEADLINE_S} s\n{tails}")
    return [((logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()) for i in range(2)]


def train_py(out_dir: Path, mesh: list[str] = MESH_2x2) -> list[str]:
    argv = [sys.executable, str(ROOT / "train.py"), "--no-progress", "--config", str(ROOT / "tests" / "defaults.yaml")]
    for s in SETS + mesh + [f"run.out_dir={out_dir}"]:
        argv += ["--set", s]
    return argv


def worker(out_dir: Path, mesh: list[str], stop_after: int = 0, fail_on_process_1: int = 0) -> list[str]:
    return [sys.executable, __file__, str(out_dir), ",".join(mesh), str(stop_after), str(fail_on_process_1)]


def results(outputs: list[tuple[str, str]]) -> list[dict]:
    return [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out, _ in outputs]


def rel_diff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max() / np.abs(np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from sae_jax.config import load_config
    from sae_jax.formats import load_sae
    from sae_jax.run import train

    tmp = tmp_path_factory.mktemp("multihost")
    train(load_config(None, SETS + [f"run.out_dir={tmp / 'one'}"]), progress=False)
    out = {"one": tmp / "one", "cli": tmp / "cli", "part": tmp / "part", "timings": {}}
    t = time.perf_counter()
    out["cli_stdout"] = [o for o, _ in launch(train_py(tmp / "cli"), tmp / "logs" / "cli")]
    out["timings"]["cli"] = time.perf_counter() - t
    out["cli_listing"] = sorted(os.listdir(tmp / "cli"))
    for name, argv in [
        ("stopped", worker(tmp / "part", MESH_2x2, stop_after=10)),
        ("resumed", worker(tmp / "part", MESH_2x2)),
        ("damaged", worker(tmp / "part", MESH_1x4, fail_on_process_1=9)),
    ]:
        if name == "damaged":
            out["resumed_sae"] = load_sae(tmp / "part" / "sae").params
            (tmp / "part" / "checkpoints" / "12" / "meta" / "metadata").write_text("{not json")
        t = time.perf_counter()
        out[name] = results(launch(argv, tmp / "logs" / name))
        out["timings"][name] = time.perf_counter() - t
    sae = {k: load_sae(tmp / d / "sae").params for k, d in [("one", "one"), ("cli", "cli"), ("damaged", "part")]}
    out["rel_diff"] = {
        "cli": rel_diff(sae["cli"], sae["one"]),
        "resumed": rel_diff(out["resumed_sae"], sae["one"]),
        "damaged": rel_diff(sae["damaged"], sae["one"]),
    }
    print("2-process run times (s):", {k: round(v, 1) for k, v in out["timings"].items()})
    print(
        "exported params vs one device, max |diff| / max |param|:", {k: f"{v:.2g}" for k, v in out["rel_diff"].items()}
    )
    return out


def test_train_py_on_two_processes_matches_one_device(runs):
    assert runs["rel_diff"]["cli"] <= TOL
    one, cli = losses(runs["one"]), losses(runs["cli"])
    assert sorted(cli) == [3, 6, 9, 12]
    p0, p1 = runs["cli_stdout"]  # with gloo's connection notes between
    assert f"trained 12 steps; SAE exported to {runs['cli'] / 'sae'}\nheld-out (" in p0
    assert "trained" not in p1 and "held-out" not in p1  # process 0 reports for both
    assert max(abs(cli[s] - one[s]) / abs(one[s]) for s in one) <= TOL
    # The final eval: the gathered, exported SAE on the same held-out batches (absolute below 1: a fraction may be 0).
    flat = lambda e: {
        **{k: v for k, v in e.items() if k != "ground_truth"},  # synthetic runs' scores too
        **{f"ground_truth.{k}": v for k, v in e["ground_truth"].items() if isinstance(v, (int, float))},
    }
    e_one, e_cli = (flat(json.loads((runs[k] / "eval.json").read_text())) for k in ("one", "cli"))
    assert e_cli["tokens"] == e_one["tokens"] == 64
    assert all(abs(e_cli[k] - e_one[k]) <= TOL * max(abs(e_one[k]), 1) for k in e_one)


def test_each_output_is_written_once_by_process_0(runs):
    assert runs["cli_listing"] == OUTPUTS  # no temporaries left by a second writer
    assert sorted(os.listdir(runs["part"])) == OUTPUTS
    for run in (runs["cli"], runs["part"]):  # a second writer would append its own lines
        assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [3, 6, 9, 12]
    for name in ("stopped", "resumed", "damaged"):
        p0, p1 = runs[name]
        assert p1["wrote"] == [], name
    assert runs["stopped"][0]["wrote"] == ["config.yaml"]
    for name in ("resumed", "damaged"):  # metrics.jsonl: cut back to the checkpoint resumed from
        assert runs[name][0]["wrote"] == ["config.yaml", "metrics.jsonl", "sae", "eval.json"], name


def test_stopped_run_resumes_from_its_checkpoint_on_both_processes(runs):
    assert [(r["start"], r["step"], r["exported"]) for r in runs["stopped"]] == [(0, 10, False)] * 2
    assert [(r["start"], r["step"], r["exported"]) for r in runs["resumed"]] == [(9, 12, True)] * 2
    assert runs["rel_diff"]["resumed"] <= TOL


def test_checkpoint_unreadable_on_any_process_is_set_aside_once(runs):
    assert [(r["start"], r["step"]) for r in runs["damaged"]] == [(6, 12)] * 2
    assert runs["damaged"][0]["set_aside"] == ["checkpoints/12.unreadable", "checkpoints/9.unreadable"]
    assert runs["damaged"][1]["set_aside"] == []
    steps = sorted(os.listdir(runs["part"] / "checkpoints"))
    assert steps == ["12", "12.unreadable", "6", "9", "9.unreadable"]
    assert runs["rel_diff"]["damaged"] <= TOL


def test_mesh_short_of_the_processes_devices_fails_on_both_in_one_line(tmp_path):
    outputs = launch(
        train_py(tmp_path / "run", ["mesh.data=2", "mesh.model=1", "mesh.distributed=true"]), tmp_path / "logs", (1, 1)
    )
    for _, err in outputs:
        assert [l for l in err.splitlines() if l.startswith("error:")] == [
            "error: mesh: expected data * model = 4, the devices of all 2 processes, found 2 * 1 = 2"
        ]
        assert "Traceback" not in err


def test_bad_process_count_in_the_environment_is_a_config_error():
    from sae_jax.config import ConfigError
    from sae_jax.sharding import start_distributed

    with pytest.raises(ConfigError) as e:
        start_distributed({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})
    assert str(e.value) == "JAX_NUM_PROCESSES: expected an integer, found 'two'"
    assert not jax.distributed.is_initialized()


# --- the worker: one of the 2 processes ----------------------------------------------------------


def _worker(out_dir: str, mesh: str, stop_after: int, fail_on_process_1: int) -> dict:
    """run.train of SETS + `mesh`; what this process renamed into place under `out_dir` (its writes) and set aside."""
    import orbax.checkpoint as ocp

    from sae_jax.config import load_config
    from sae_jax.run import train

    renamed, replace = [], os.replace

    def recording_replace(src, dst):
        rel = os.path.relpath(dst, out_dir)
        if not rel.startswith(".."):
            renamed.append(rel)
        return replace(src, dst)

    os.replace = recording_replace  # atomic_write_text, atomic_dir and the set-aside all rename into place
    restore = ocp.JsonCheckpointHandler.restore

    def failing_restore(self, directory, *a, **kw):
        where = Path(directory)
        if jax.process_index() == 1 and (where.parent.name, where.name) == (str(fail_on_process_1), "meta"):
            raise ValueError(f"injected: process 1 cannot read checkpoint {fail_on_process_1}")
        return restore(self, directory, *a, **kw)

    ocp.JsonCheckpointHandler.restore = failing_restore
    cfg = load_config(None, SETS + mesh.split(",") + [f"run.out_dir={out_dir}"])
    r = train(cfg, stop_after=stop_after or None, progress=False)
    return {
        "start": r.start,
        "step": int(jax.device_get(r.state.step)),
        "exported": r.sae is not None,
        "wrote": [n for n in renamed if "/" not in n and not n.startswith(".")],
        "set_aside": [n for n in renamed if n.endswith(".unreadable")],
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))), flush=True)
