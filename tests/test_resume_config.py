"""Resuming a run directory with a changed config: the kernel may change (run.SPEED_ONLY), what is computed may not.

Reference for the kernel switch: the same run trained dense throughout.
Tolerance: the sparse kernel differs from the dense one only in the order of
float32 sums (tests/test_sparse.py measures <= 1.2e-7 of each param's largest
entry after 8 steps; here the resumed run is 2.4e-7 from the dense one after
20 sparse steps); TOL = 1e-5 as there. Restoring under another mesh is
checked in tests/test_sharding.py, which needs 4 devices.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_train_run import tiny

from sae_jax import run
from sae_jax.config import ConfigError

TOL = 1e-5


def rel(a, b) -> float:
    """Largest |a - b| over leaves, relative to each leaf's largest |b|."""
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)) for x, y in zip(la, lb))


@pytest.mark.parametrize(
    "changed",
    [
        {"train.kernel": "sparse"},
        {"train.kernel": "sparse", "train.sparse_encoder_grad": "scatter", "train.sparse_k_max": 16},
    ],
)
def test_resume_with_another_kernel_continues_from_the_checkpoint(tmp_path, monkeypatch, changed):
    run.train(tiny(tmp_path / "part"), stop_after=10, progress=False)
    starts, loop = [], run._loop
    monkeypatch.setattr(run, "_loop", lambda cfg, state, start, *a: starts.append(start) or loop(cfg, state, start, *a))
    resumed = run.train(tiny(tmp_path / "part", **changed), progress=False)
    assert starts == [10] and int(resumed.state.step) == 30 and resumed.sae is not None
    lines = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10, 15, 20, 25, 30]
    assert ["dense_fallback" in l for l in lines] == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]  # only the sparse kernel logs it
    monkeypatch.undo()
    whole = run.train(tiny(tmp_path / "whole"), progress=False)
    assert rel(resumed.state.params, whole.state.params) <= TOL


@pytest.mark.parametrize(
    "key,value,was", [("train.compute_dtype", "bfloat16", "'float32'"), ("train.lr", 0.02, "0.01")]
)
def test_resume_with_a_config_that_changes_the_numbers_is_refused(tmp_path, key, value, was):
    run.train(tiny(tmp_path), stop_after=10, progress=False)
    with pytest.raises(ConfigError) as e:
        run.train(tiny(tmp_path, **{key: value}), progress=False)
    assert (
        str(e.value) == f"{key}: {tmp_path} holds a run with {was}, this config says {value!r}; use another run.out_dir"
    )
