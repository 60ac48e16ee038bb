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


def plot_density(density, path: str | Path, *, title: str = "", bins: int = 50) -> np.ndarray:
    """Histogram of log10(density) over latents that fired; density: [N] fractions in [0, 1]. Returns the log10 values."""
    from matplotlib.figure import Figure

    density = np.asarray(density, np.float64)
    alive = np.log10(density[density > 0])
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if alive.size:
        ax.hist(alive, bins=bins, color="tab:blue")
    dead = int(np.sum(density == 0))
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}{'; ' if title else ''}{dead} of {density.size} latents never fired")
    _save(fig, Path(path))
    return alive


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (or a run directory holding one); a later row for the same step replaces an earlier."""
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
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not isinstance(row.get("tokens"), (int, float)):
            raise ValueError(f"{path}: line {n}: expected an object with integer 'step' and numeric 'tokens', found {line[:60]!r}")
        rows[row["step"]] = row
    if not rows:
        raise ValueError(f"{path}: expected metric rows, found none")
    return [rows[s] for s in sorted(rows)]


def plot_curves(metrics: str | Path, path: str | Path, names: tuple[str, ...] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One PNG with a panel per metric against tokens; returns {name: (tokens [n], values [n])} as plotted.

    `names` defaults to those of CURVES the file has; a named metric it lacks is a ValueError.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    rows = read_metrics(metrics)
    present = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if names is None:
        names = tuple(n for n in CURVES if n in present)
    missing = [n for n in names if n not in present]
    if missing or not names:
        raise ValueError(f"{metrics}: metrics {missing or 'to plot'}: expected among {sorted(present - {'step', 'tokens'})}, found none")
    data = {}
    for n in names:
        have = [r for r in rows if isinstance(r.get(n), (int, float))]
        data[n] = (np.array([r["tokens"] for r in have], np.float64), np.array([r[n] for r in have], np.float64))
    cols = min(len(names), 3)
    fig = Figure(figsize=(4.5 * cols, 3.2 * math.ceil(len(names) / cols)), layout="constrained")
    for i, n in enumerate(names):
        ax = fig.add_subplot(math.ceil(len(names) / cols), cols, i + 1)
        ax.plot(*data[n], color="tab:blue")
        ax.set_title(n)
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 400k, 1.2M
        ax.grid(alpha=0.3)
    _save(fig, Path(path))
    return data
