"""A damaged latest checkpoint is named in a warning, set aside, and the run resumes from the one before.

Every case copies one finished reference run (30 steps, checkpoints at 10, 20,
30), damages checkpoint 30 (or more), deletes the exported SAE and trains
again with the same config. It must end bit-identical to the reference: the
whole TrainState, the exported SAE and metrics.jsonl. Orbax checksums its
array files; the fingerprint kept in `meta` catches the rest (plain-JSON meta,
a readable state that is not the one saved with it).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from sae_helpers import TINY_RUN

from sae_jax.checkpoint import Checkpoints
from sae_jax.config import load_config
from sae_jax.run import train
from sae_jax.trainer import abstract_state

SETS = TINY_RUN + ["run.keep=3", "train.scale_batches=2"]


def cfg(out_dir: Path):
    return load_config(None, SETS + [f"run.out_dir={out_dir}"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(cfg(out), progress=False)
    return out, result


def copy_run(reference, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    shutil.rmtree(run / "sae")
    (run / "eval.json").unlink()
    return run


def data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in (step_dir / "state").rglob("*") if p.parent.name == "d" and p.is_file())


def rewrite(path: Path, f) -> None:
    path.write_bytes(f(path.read_bytes()))


def flip_middle(b: bytes) -> bytes:
    return b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1 :]


def edit_meta(step_dir: Path, **changes) -> None:
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    (step_dir / "meta" / "metadata").write_text(json.dumps({**meta, **changes}))


DAMAGE = {
    "array files truncated to half": lambda d: [rewrite(p, lambda b: b[: len(b) // 2]) for p in data_files(d)],
    "array files zeroed": lambda d: [rewrite(p, lambda b: bytes(len(b))) for p in data_files(d)],
    "one byte flipped in one array file": lambda d: rewrite(data_files(d)[0], flip_middle),
    "state/_METADATA deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "ocdbt manifests deleted": lambda d: [p.unlink() for p in (d / "state").rglob("manifest.ocdbt")],
    "state item deleted": lambda d: shutil.rmtree(d / "state"),
    "meta: garbage bytes": lambda d: (d / "meta" / "metadata").write_bytes(b"\x00\xff{garbage"),
    "meta: valid JSON, no fields": lambda d: (d / "meta" / "metadata").write_text("{}"),
    "meta: input scale changed": lambda d: edit_meta(d, scale=1.5),
    "meta: data position changed": lambda d: edit_meta(d, data={"index": 3}),
    "meta item deleted": lambda d: shutil.rmtree(d / "meta"),
    "state swapped with step 20's": lambda d: (
        shutil.rmtree(d / "state"),
        shutil.copytree(d.parent / "20" / "state", d / "state"),
    ),
    "step directory emptied": lambda d: (shutil.rmtree(d), d.mkdir()),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_is_skipped_and_run_ends_bit_identical(reference, tmp_path, caplog, damage):
    run = copy_run(reference, tmp_path)
    DAMAGE[damage](run / "checkpoints" / "30")
    with caplog.at_level(logging.WARNING, logger="sae_jax.checkpoint"):
        result = train(cfg(run), progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "sae_jax.checkpoint"]
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint {run / 'checkpoints' / '30'} is unreadable (")
    assert warnings[0].endswith("moved to 30.unreadable, trying the one before")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20", "30", "30.unreadable"]
    assert_same_run(reference, run, result)


@pytest.mark.parametrize("damaged", [["30", "20"], ["30", "20", "10"]])
def test_several_damaged_checkpoints_fall_back_further(reference, tmp_path, caplog, damaged):
    """Two damaged: resume from 10. All three: start over (the input scale is estimated again, the same)."""
    run = copy_run(reference, tmp_path)
    for step in damaged:
        DAMAGE["array files zeroed"](run / "checkpoints" / step)
    with caplog.at_level(logging.WARNING, logger="sae_jax.checkpoint"):
        result = train(cfg(run), progress=False)
    named = [r.getMessage().split(" is unreadable")[0] for r in caplog.records if r.name == "sae_jax.checkpoint"]
    assert named == [f"checkpoint {run / 'checkpoints' / s}" for s in damaged]
    aside = [f"{s}.unreadable" for s in damaged]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(["10", "20", "30"] + aside)
    assert_same_run(reference, run, result)


HARMLESS = {
    "_CHECKPOINT_METADATA deleted": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "_CHECKPOINT_METADATA garbage": lambda d: (d / "_CHECKPOINT_METADATA").write_text("{{{"),
    "array_metadatas deleted": lambda d: shutil.rmtree(d / "state" / "array_metadatas"),
    # The restore target carries the mesh's shardings (one device is a 1x1 mesh), so orbax never reads this file.
    "state/_sharding zeroed": lambda d: rewrite(d / "state" / "_sharding", lambda b: bytes(len(b))),
}


@pytest.mark.parametrize("damage", HARMLESS)
def test_damage_to_files_restore_does_not_need_is_harmless(reference, tmp_path, caplog, damage):
    run = copy_run(reference, tmp_path)
    HARMLESS[damage](run / "checkpoints" / "30")
    with caplog.at_level(logging.WARNING, logger="sae_jax.checkpoint"):
        result = train(cfg(run), progress=False)
    assert [r for r in caplog.records if r.name == "sae_jax.checkpoint"] == []
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()][-1] == 30
    assert_same_run(reference, run, result)


def test_orbax_temporaries_left_by_a_kill_are_removed(reference, tmp_path, caplog):
    """What a kill inside a save leaves (a half-written `<step>.orbax-checkpoint-tmp`), for a step
    saved again and for one never saved again; and an export killed midway (`.sae.*.tmp`)."""
    run = copy_run(reference, tmp_path)
    for step in ("30", "999"):
        shutil.copytree(run / "checkpoints" / "20", run / "checkpoints" / f"{step}.orbax-checkpoint-tmp")
        DAMAGE["array files truncated to half"](run / "checkpoints" / f"{step}.orbax-checkpoint-tmp")
    shutil.rmtree(run / "checkpoints" / "30")
    (run / ".sae.k1ll3d.tmp" / "params").mkdir(parents=True)
    (run / ".metrics.jsonl.abc.tmp").write_text('{"step": 1')
    with caplog.at_level(logging.WARNING, logger="sae_jax.checkpoint"):
        result = train(cfg(run), progress=False)
    assert [r for r in caplog.records if r.name == "sae_jax.checkpoint"] == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20", "30"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "eval.json", "metrics.jsonl", "sae"]
    assert_same_run(reference, run, result)


def test_partial_last_metrics_line_is_dropped(reference, tmp_path):
    """A kill while appending to metrics.jsonl leaves half a line; the rerun drops it and logs the step again."""
    run = copy_run(reference, tmp_path)
    shutil.rmtree(run / "checkpoints" / "30")
    lines = (run / "metrics.jsonl").read_text().splitlines()[:4]  # steps 5..20
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"loss": 0.5, "recon')
    assert_same_run(reference, run, train(cfg(run), progress=False))


def assert_same_run(reference, run: Path, result) -> None:
    from sae_jax.formats import load_sae

    ref_dir, ref = reference
    assert int(result.state.step) == 30 and result.scale == ref.scale
    assert_bits_equal(result.state, ref.state)
    assert_bits_equal(load_sae(run / "sae").params, load_sae(ref_dir / "sae").params)
    strip = lambda p: [
        {k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in p.read_text().splitlines()
    ]
    assert strip(run / "metrics.jsonl") == strip(ref_dir / "metrics.jsonl")
    assert (run / "eval.json").read_text() == (ref_dir / "eval.json").read_text()  # the same held-out batches
    # and the checkpoint now at 30 is the reference's, fingerprint included
    c = Checkpoints(run / "checkpoints", keep=3)
    step, state, meta = c.restore_latest(abstract_state(cfg(run)))  # as run.train restores it
    c.close()
    assert step == 30
    assert_bits_equal(state, ref.state)


def assert_bits_equal(x, y) -> None:
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(lx) == len(ly)
    for u, v in zip(lx, ly):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()
