"""PNG plots: the feature-density histogram and a run's training curves against tokens.

Figures are built with matplotlib's object API (no pyplot, no global state) and
written atomically. The functions return the numbers they plotted, so tests
and callers can check them without reading pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sae_jax.atomic import atomic_file

CURVES = ("loss", "mse", "l0", "explained_variance", "dead_fraction")  # plotted by default, when present


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_density(
    density,
    path: str | Path,
    *,
    title: str = "",
    bins: int = 50,
    dense_threshold: float = 0.1,
    tokens: int | None = None,
) -> np.ndarray:
    """Histogram of log10(density) over latents that fired, on a fixed axis so runs compare; returns the log10 values.

    density: [N] fractions in [0, 1]. The x-axis runs from 1e-7 (or 1/tokens) to 1, the count axis is
    logarithmic, dead latents are one bar at the left edge and the dense threshold is a line.
    """
    from matplotlib.figure import Figure

    density = np.asarray(density, np.float64)
    alive = np.log10(density[density > 0])
    lo = math.floor(min(-7.0, math.log10(1.0 / tokens) if tokens else -7.0, alive.min(initial=0.0)))
    dead = int(np.sum(density == 0))
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    edges = np.linspace(lo, 0.0, bins + 1)
    if alive.size:
        ax.hist(alive, bins=edges, color="tab:blue", label="latents that fired")
    width = edges[1] - edges[0]
    if dead:
        ax.bar(lo - 1.5 * width, dead, width=width, color="tab:red", label="never fired (dead)")
    ax.axvline(math.log10(dense_threshold), color="tab:orange", ls="--", label=f"dense (> {dense_threshold:g})")
    ax.set_xlim(lo - 3 * width, 0.05)
    ax.set_yscale("log")
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents (log scale)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title}{'; ' if title else ''}{dead} of {density.size} latents never fired")
    _save(fig, Path(path))
    return alive


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (or a run directory's); a later row for a step replaces an earlier one."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a run directory or its metrics.jsonl)")
    rows: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {n}: expected a JSON object, found {line[:60]!r}") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("step"), int)
            or not isinstance(row.get("tokens"), (int, float))
        ):
            raise ValueError(
                f"{path}: line {n}: expected an object with integer 'step' and numeric 'tokens', found {line[:60]!r}"
            )
        rows[row["step"]] = row
    if not rows:
        raise ValueError(f"{path}: expected metric rows, found none")
    return [rows[s] for s in sorted(rows)]


# What a metric's numbers are in. Training runs on inputs scaled to mean norm sqrt(D) (train.scale_batches);
# eval.json and `evaluate` report the exported SAE on raw activations.
UNITS = {
    "loss": "scaled inputs",
    "mse": "scaled inputs, mean norm sqrt(D)",
    "l0": "latents per token",
    "explained_variance": "1 - MSE / Var(x)",
    "dead_fraction": "of latents",
    "grad_norm": "scaled units",
}
FRACTIONS = ("explained_variance", "dead_fraction", "dense_fraction")  # drawn on a fixed [0, 1] axis


def run_name(metrics: str | Path) -> str:
    """The run a metrics path belongs to: its directory's name."""
    p = Path(metrics)
    return (p if p.is_dir() else p.parent).resolve().name


def plot_curves(metrics: str | Path | list, path: str | Path, names: tuple[str, ...] | None = None) -> dict:
    """One PNG with a panel per metric against tokens, titled with the run(s); held-out `eval_<name>` points drawn
    on their metric's panel; several runs (a list of paths) overlaid.

    Returns {name: (tokens [n], values [n])} as plotted for one run, and {run: that} for a list. `names` defaults
    to those of CURVES the files have; a named metric they lack is a ValueError.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    runs = list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]
    tables = {}
    for m in runs:
        rows = read_metrics(m)
        label = run_name(m) if run_name(m) not in tables else str(m)
        tables[label] = rows
    present = {k for rows in tables.values() for r in rows for k, v in r.items() if _number(v)}
    if names is None:
        names = tuple(n for n in CURVES if n in present)
    missing = [n for n in names if n not in present]
    if missing or not names:
        shown = sorted(present - {"step", "tokens"})
        raise ValueError(
            f"{runs[0] if len(runs) == 1 else runs}: metrics {missing or 'to plot'}: expected among {shown}, found none"
        )
    data = {label: {n: _series(rows, n) for n in names} for label, rows in tables.items()}
    cols = min(len(names), 3)
    fig = Figure(figsize=(4.5 * cols, 3.2 * math.ceil(len(names) / cols) + 0.4), layout="constrained")
    fig.suptitle("training curves: " + ", ".join(tables))
    for i, n in enumerate(names):
        ax = fig.add_subplot(math.ceil(len(names) / cols), cols, i + 1)
        for j, (label, rows) in enumerate(tables.items()):
            color = f"C{j}"
            ax.plot(*data[label][n], color=color, label=label if len(tables) > 1 else "train batch")
            held = _series(rows, f"eval_{n}")
            if held[0].size:
                ax.plot(*held, "o", color=color, mfc="white", ms=4, label="held-out" if len(tables) == 1 else None)
        ax.set_title(n + (f" ({UNITS[n]})" if n in UNITS else ""), fontsize=9)
        ax.set_xlabel("tokens")
        if n in FRACTIONS:
            ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, 1.2M
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    if len(names) % cols:  # the grid's last slot: what each run ended at, instead of an empty panel
        ax = fig.add_subplot(math.ceil(len(names) / cols), cols, len(names) + 1)
        ax.axis("off")
        lines = [
            f"{label}: step {rows[-1]['step']}, "
            + ", ".join(f"{n} {rows[-1][n]:.4g}" for n in names if _number(rows[-1].get(n)))
            for label, rows in tables.items()
        ]
        ax.text(0, 1, "last logged\n" + "\n".join(_wrap(l) for l in lines), va="top", fontsize=7, family="monospace")
    _save(fig, Path(path))
    return data[next(iter(data))] if len(runs) == 1 else data


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    have = [r for r in rows if _number(r.get(name))]
    return np.array([r["tokens"] for r in have], np.float64), np.array([r[name] for r in have], np.float64)


def _wrap(line: str, width: int = 48) -> str:
    import textwrap

    return "\n  ".join(textwrap.wrap(line, width))
