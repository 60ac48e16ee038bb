"""A run directory that cannot be written, and a disk that fills up mid-run.

Tests run as root, where chmod stops nothing; what does stop a write is a path
under a regular file (ENOTDIR), a directory in /proc or /sys, and a file-size
limit (RLIMIT_FSIZE: a write past it fails with EFBIG, as a full disk fails
with ENOSPC; Python ignores the SIGXFSZ that comes with it). The file-size
limit is set in a small launcher that then execs train.py, so the limited
process never forks from this multithreaded one.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from sae_helpers import without_progress

from sae_jax.checkpoint import CheckpointError, Checkpoints
from sae_jax.config import ConfigError, load_config
from sae_jax.formats import load_sae
from sae_jax.formats.common import cause
from sae_jax.run import train

ROOT = Path(__file__).resolve().parents[1]
SETS = [
    "sae.d_in=8",
    "sae.expansion=4",
    "data.batch_size=32",
    "train.steps=40",
    "train.lr=1e-2",
    "train.lr_warmup_steps=3",
    "run.save_every=10",
    "run.log_every=10",
    "train.scale_batches=2",
]
# Sizes at this config: config.yaml ~1 KB, metrics.jsonl ~1.3 KB at the end, the exported SAE's
# largest file ~2.5 KB, a checkpoint's array file ~7 KB.
CKPT_LIMIT, EXPORT_LIMIT = 4096, 2048


def cfg(out_dir, **extra):
    return load_config(None, SETS + [f"run.out_dir={out_dir}"] + [f"{k}={v}" for k, v in extra.items()])


def run_cli(out_dir: Path, fsize: int | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = [str(ROOT / "train.py"), "--no-progress", "--config", str(ROOT / "tests" / "defaults.yaml")]
    for s in SETS + [f"run.out_dir={out_dir}", *extra]:
        args += ["--set", s]
    if fsize is not None:
        launcher = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
            "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
        )
        cmd = [sys.executable, "-c", launcher, *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, train(cfg(out), progress=False)


def assert_bits_equal(x, y) -> None:
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(lx) == len(ly)
    for u, v in zip(lx, ly):
        assert np.asarray(u).tobytes() == np.asarray(v).tobytes()


# --- a run directory that cannot be written ------------------------------------


def test_out_dir_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ConfigError, match=re.escape(f"run.out_dir: cannot create {tmp_path / 'file' / 'run'} (Not a directory)")
    ):
        train(cfg(tmp_path / "file" / "run"), progress=False)


def test_out_dir_that_is_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ConfigError, match=re.escape(f"run.out_dir: expected a directory, found a file at {tmp_path / 'file'}")
    ):
        train(cfg(tmp_path / "file"), progress=False)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("out_dir", ["/proc/self", "/sys/kernel"])
def test_out_dir_the_kernel_will_not_let_us_write_is_one_line(out_dir):
    with pytest.raises(ConfigError, match=rf"^run\.out_dir: cannot write in {out_dir} \([A-Z][a-z ]+\)$"):
        train(cfg(out_dir), progress=False)


@pytest.mark.parametrize("out_dir", ["/proc/self/run", "/proc/version/run"])
def test_out_dir_the_kernel_will_not_let_us_create_is_one_line(out_dir):
    with pytest.raises(ConfigError, match=rf"^run\.out_dir: cannot create {out_dir} \([A-Z][a-z ]+\)$"):
        train(cfg(out_dir), progress=False)


def test_checkpoints_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a directory")
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(tmp_path / 'run' / 'checkpoints'))}: expected a checkpoint directory, found a file$",
    ):
        train(cfg(tmp_path / "run"), progress=False)


def test_unwritable_out_dir_through_the_cli_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli(tmp_path / "file" / "run")
    assert r.returncode == 1 and r.stdout == ""
    assert (
        without_progress(r.stderr)
        == f"error: run.out_dir: cannot create {tmp_path / 'file' / 'run'} (Not a directory)\n"
    )


def test_outputs_get_the_usual_permissions(reference):
    """The temporary files behind atomic writes are owner-only; the outputs must not stay so (umask 022 here)."""
    run, _ = reference
    old = os.umask(0o022)
    os.umask(old)
    for p in (run / "config.yaml", run / "sae", run / "sae" / "spec.json"):
        want = (0o777 if p.is_dir() else 0o666) & ~old
        assert stat.S_IMODE(p.stat().st_mode) == want, p


# --- the disk fills up -------------------------------------------------------------


def test_full_disk_during_a_checkpoint_save_is_one_line_and_resumable(reference, tmp_path):
    run = tmp_path / "run"
    train(cfg(run), stop_after=20, progress=False)  # checkpoints 10 and 20
    r = run_cli(run, fsize=CKPT_LIMIT)
    assert r.returncode == 1 and r.stdout == ""
    assert without_progress(r.stderr) == (
        f"error: checkpoint {run / 'checkpoints' / '30'} could not be written (File too large); "
        "the checkpoints before it are kept, rerun to resume\n"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    c = Checkpoints(run / "checkpoints", keep=3)  # the earlier checkpoints read back, fingerprints included
    step, _, _ = c.restore_latest(jax.eval_shape(lambda: reference[1].state))
    c.close()
    assert step == 20
    resumed = train(cfg(run), progress=False)  # space again: the same command finishes the run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["20", "30", "40"]
    assert_bits_equal(resumed.state, reference[1].state)
    assert_bits_equal(load_sae(run / "sae").params, load_sae(reference[0] / "sae").params)


def test_full_disk_during_the_export_leaves_no_half_written_sae(tmp_path):
    # W_enc of 8 x 128 float32 is 4 KiB: whichever file orbax puts it in is over EXPORT_LIMIT (at expansion 4 its
    # 1 KiB arrays land in one file or several, by timing, and the export may fit).
    wide = {"sae.expansion": 16}
    run, ref = tmp_path / "run", tmp_path / "ref"
    train(cfg(ref, **wide), progress=False)
    shutil.copytree(ref, run)
    shutil.rmtree(run / "sae")
    (run / "eval.json").unlink()
    r = run_cli(run, fsize=EXPORT_LIMIT, extra=tuple(f"{k}={v}" for k, v in wide.items()))
    assert r.returncode == 1 and r.stdout == ""
    assert (
        without_progress(r.stderr)
        == f"error: {run / 'sae'}: could not be written (File too large); the destination is as it was\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    assert train(cfg(run, **wide), progress=False).sae is not None
    assert_bits_equal(load_sae(run / "sae").params, load_sae(ref / "sae").params)


@pytest.mark.parametrize(
    "code, text", [(28, "No space left on device"), (27, "File too large"), (13, "Permission denied")]
)
def test_cause_reads_the_os_error_out_of_tensorstore_messages(code, text):
    """tensorstore reports I/O failures as ValueError with the errno at the end; ENOSPC is reported like EFBIG."""
    e = ValueError(
        f'OUT_OF_RANGE: Error writing "key/0" in OCDBT database at local file "/x/": Failed to write 2931 bytes to file 5: {text} [os_error_code=\'{code}\']'
    )
    assert cause(e) == text
    assert cause(OSError(code, text)) == text
    assert cause(RuntimeError(f"Error while serializing: I/O error: {text} (os error {code})")) == text
    assert (
        cause(ValueError("DATA_LOSS: checksum mismatch [tensorstore_spec='{...}']\nmore"))
        == "ValueError: DATA_LOSS: checksum mismatch"
    )


@pytest.mark.parametrize("dst", ["out.pt", "out.safetensors"])  # torch.save's OSError, safetensors' own error type
def test_full_disk_during_a_convert_leaves_nothing(reference, tmp_path, dst):
    launcher = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({EXPORT_LIMIT // 2}, {EXPORT_LIMIT // 2})); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    src = reference[0] / "sae"
    r = subprocess.run(
        [sys.executable, "-c", launcher, str(ROOT / "convert" / "jax_to_torch.py"), str(src), str(tmp_path / dst)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert (
        without_progress(r.stderr)
        == f"jax_to_torch: error: {tmp_path / dst}: could not be written (File too large); the destination is as it was\n"
    )
    assert list(tmp_path.iterdir()) == []
