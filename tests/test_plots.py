"""Plots: the numbers each figure draws, PNG files written whole, and one-line errors for bad metrics files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_jax.plots import plot_curves, plot_density, read_metrics

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(steps, batch=1024, **extra):
    return [
        dict(
            step=s,
            tokens=s * batch,
            loss=100.0 / s,
            mse=1.0 / s,
            l0=60 + s,
            explained_variance=1 - 1 / s,
            dead_fraction=0.0,
            grad_norm=2.0,
            **extra,
        )
        for s in steps
    ]


def test_curves_plot_each_metric_against_tokens_and_a_resumed_step_keeps_its_last_row(tmp_path):
    resumed = (
        rows([50, 100, 150]) + [dict(rows([100])[0], loss=7.0)] + rows([150, 200])
    )  # 150 logged twice after a resume
    src = write_metrics(tmp_path / "metrics.jsonl", resumed)
    data = plot_curves(tmp_path, tmp_path / "curves.png")
    assert list(data) == ["loss", "mse", "l0", "explained_variance", "dead_fraction"]
    tokens, loss = data["loss"]
    np.testing.assert_array_equal(tokens, [51200, 102400, 153600, 204800])
    np.testing.assert_array_equal(loss, [2.0, 7.0, 100 / 150, 0.5])
    np.testing.assert_array_equal(data["l0"][1], [110, 160, 210, 260])
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    assert [r["step"] for r in read_metrics(src)] == [50, 100, 150, 200]


def test_chosen_metrics_and_gaps(tmp_path):
    r = rows([1, 2, 3])
    del r[1]["grad_norm"]
    write_metrics(tmp_path / "m.jsonl", r)
    data = plot_curves(tmp_path / "m.jsonl", tmp_path / "g.png", ("grad_norm",))
    np.testing.assert_array_equal(data["grad_norm"][0], [1024, 3072])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected metric rows, found none"),
        ('{"step": 1, "tokens": 5}\nnot json\n', "line 2: expected a JSON object, found 'not json'"),
        ('{"tokens": 5}\n', "line 1: expected an object with integer 'step' and numeric 'tokens'"),
    ],
)
def test_bad_metrics_files_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message):
        plot_curves(tmp_path, tmp_path / "x.png")


def test_a_missing_metric_or_file_names_what_exists(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", rows([1]))
    with pytest.raises(
        ValueError,
        match=r"metrics \['fvu'\]: expected among \['dead_fraction', 'explained_variance', 'grad_norm', 'l0', 'loss', 'mse'\]",
    ):
        plot_curves(tmp_path, tmp_path / "x.png", ("fvu",))
    with pytest.raises(
        FileNotFoundError, match=r"nothing: no such file \(expected a run directory or its metrics.jsonl\)"
    ):
        plot_curves(tmp_path / "nothing", tmp_path / "x.png")


def test_density_histogram_draws_log10_of_the_latents_that_fired(tmp_path):
    density = np.array([0.0, 0.1, 0.001, 0.0, 1.0])
    drawn = plot_density(density, tmp_path / "d.png", title="t")
    np.testing.assert_allclose(drawn, [-1, -3, 0])
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG
    plot_density(np.zeros(4), tmp_path / "dead.png")  # nothing fired: still a figure
    assert (tmp_path / "dead.png").read_bytes()[:8] == PNG


def test_plot_curves_command(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", rows([10, 20]))
    ok = subprocess.run(
        [sys.executable, "-m", "sae_jax", "plot", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == (
        f"{tmp_path.name}: 5 panels, 2 points; "
        f"last: loss 5, mse 0.05, l0 80, explained_variance 0.95, dead_fraction 0\nwrote {tmp_path / 'training_curves.png'}\n"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "sae_jax", "plot", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == f"error: {tmp_path / 'nope'}: no such file (expected a run directory or its metrics.jsonl)\n"


def test_several_runs_overlay_with_their_held_out_points(tmp_path):
    for name, steps in (("a", [10, 20, 30]), ("b", [10, 20])):
        (tmp_path / name).mkdir()
        evals = [dict(r, eval_l0=r["l0"] - 5.0) if r["step"] == 20 else r for r in rows(steps)]
        write_metrics(tmp_path / name / "metrics.jsonl", evals)
    data = plot_curves([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png", ("l0", "mse"))
    assert list(data) == ["a", "b"]
    np.testing.assert_array_equal(data["a"]["l0"][1], [70, 80, 90])
    np.testing.assert_array_equal(data["b"]["mse"][0], [10240, 20480])
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_jax",
            "plot",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "c.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "a: 5 panels, 3 points; last: loss 3.333, mse 0.03333, l0 90, explained_variance 0.9667, dead_fraction 0",
        "b: 5 panels, 2 points; last: loss 5, mse 0.05, l0 80, explained_variance 0.95, dead_fraction 0",
        f"wrote {tmp_path / 'c.png'}",
    ], r.stdout + r.stderr


def test_density_axis_is_fixed_and_marks_dead_and_dense(tmp_path):
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig
    Figure.savefig = lambda fig, *a, **k: saved.setdefault("ax", fig.axes[0]) and original(fig, *a, **k)
    try:
        plot_density(np.array([0.0, 0.0, 0.5, 1e-3]), tmp_path / "d.png", dense_threshold=0.1, tokens=10_000)
    finally:
        Figure.savefig = original
    ax = saved["ax"]
    assert ax.get_yscale() == "log" and ax.get_xlim()[0] < -7 and ax.get_xlim()[1] > 0
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [-1.0]  # the dense threshold, log10(0.1)
    assert max(p.get_height() for p in ax.patches) == 2  # the dead bar: two latents never fired
