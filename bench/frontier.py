"""The quality frontier: every architecture over a sweep of sparsity at a fixed token budget, on realistic
synthetic ground truth, trained by sae-jax and by SAELens's own trainers on the same batches; FVU-vs-L0 and
MCC-vs-L0 in one PNG, the numbers as JSON and a markdown table, and both sides compared at matched L0.

    python bench/frontier.py --out runs/frontier            # the full sweep, both sides (~10 min on 2 loaded CPU cores)
    python bench/frontier.py --out runs/frontier --quick    # the middle two values of each sweep
    python bench/frontier.py --out runs/frontier --reuse    # keep the finished runs in --out, train the rest

Every setting but the swept one comes from configs/realistic.yaml (`--set KEY=VALUE` overrides it for every run,
both sides). Each point of ours is one `sae_jax.run.train` run; each SAELens point is one
`bench.saelens_runner.train_saelens` run (SAELens's `SAETrainer.fit` on the same batches, budget and schedule,
saved by SAELens, read back by our SAELens loader). Both write eval.json through `sae_jax.run.final_eval`: L0 and
FVU (1 - explained variance) on unseen batches and the ground-truth scores, so both sides are scored by one code path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REALISTIC = ROOT / "configs" / "realistic.yaml"  # the set tests/test_arch_recovery.py trains on

# What each architecture sweeps: (key, values). Everything else is the config's.
SWEEPS = {  # the top-k family up to k = 16: SAELens's jumprelu at lambda 0.25 lands at L0 14, past relu alone there
    "relu": ("train.l1_coefficient", [1.0, 1.5, 2.0, 3.0]),
    "topk": ("sae.k", [3, 4, 5, 8, 16]),
    "batchtopk": ("sae.k", [3, 4, 5, 8, 16]),
    # realistic.yaml's jumprelu: the per-token phase at k = 5 starts every point near L0 5 and lambda sets where the
    # last 20% takes it; 0.25-4 spread ours over held-out L0 7.1, 4.9, 3.6, 2.8, 2.0 (seed 0: no bunching) and
    # SAELens's plain jumprelu over 14.2, 6.3, 3.7, 2.6, 1.8.
    "jumprelu": ("sae.l0_coefficient", [0.25, 0.5, 1.0, 2.0, 4.0]),
    "matryoshka": ("sae.k", [3, 4, 5, 8, 16]),
}
# Settings a recipe needs beside its sweep: realistic.yaml's jumprelu codes per token first, with k = 5.
FIXED = {"jumprelu": ["sae.k=5"]}
# SAELens's side: `saelens_runner.saelens_config` translates the config key by key (our relu is SAELens's
# "standard", matryoshka its "matryoshka_batchtopk"); these are SAELens's own recipe choices laid over it, where
# its defaults differ from ours: x - b_dec encoded, and the topk family's code taken on decoder-norm-rescaled
# pre-activations (its stand-in for unit-norm decoder rows).
SAELENS = {
    "relu": {"apply_b_dec_to_input": True},
    "topk": {"apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True},
    "batchtopk": {"apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True},
    "jumprelu": {"apply_b_dec_to_input": True},
    "matryoshka": {"apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True},
}
SIDES = ("sae-jax", "SAELens")
TORCH_THREADS = (
    "threads of SAELens's torch (1: these matmuls gain nothing from more; measured 2.4x faster than 2 on a loaded "
    "2-core machine)"
)
MATCH = 0.1  # matched L0: within +-10%
GAP = 2.1  # at_l0 interpolates between sweep points at most this ratio of L0 apart (k 8 -> 16: 2x)


def point_config(arch: str, key: str, value, steps: int, run_dir: Path, sets: list[str]):
    from sae_jax.config import load_config

    return load_config(
        REALISTIC,
        sets
        + [
            f"sae.architecture={arch}",
            *FIXED.get(arch, []),
            f"{key}={value}",
            f"train.steps={steps}",
            f"run.save_every={steps}",
            f"run.out_dir={run_dir}",
        ],
    )


def run_point(side: str, out: Path, arch: str, key: str, value, steps: int, sets: list[str], train: bool, reuse: bool):
    """One sweep point of `side`: its finished run in `out` when `reuse` or not `train`, else trained now.

    None when it is neither finished nor trained."""
    from bench import saelens_runner
    from sae_jax import run

    run_dir = out / side.lower() / f"{arch}-{key.split('.')[-1]}-{value}"
    cfg = point_config(arch, key, value, steps, run_dir, sets)
    ev, seconds = None, None
    if reuse or not train:
        if side == "SAELens":
            ev = saelens_runner.finished(cfg, run_dir, SAELENS[arch])
        elif (run_dir / "eval.json").is_file() and run.is_complete(cfg):
            ev = json.loads((run_dir / "eval.json").read_text())
    if ev is None and train:
        t0 = time.perf_counter()
        if side == "SAELens":
            ev = saelens_runner.train_saelens(cfg, run_dir, SAELENS[arch])
        else:
            run.train(cfg, progress=False)
            ev = json.loads((run_dir / "eval.json").read_text())
        seconds = round(time.perf_counter() - t0, 1)
    if ev is None:
        return None
    g = ev["ground_truth"]
    return {
        "side": side,
        "arch": arch,
        key: value,
        "l0": ev["l0"],
        "fvu": 1 - ev["explained_variance"],
        "mcc": g["mcc"],
        "recovered": g["recovered"],
        "f1": g["f1"],
        "absorption": g.get("absorption"),
        "dead": ev["dead_fraction"],
        "seconds": seconds,  # None: reused
    }


def setting(p: dict, short: bool = False) -> str:
    """The swept key and value: `sae.k=4`, or `k=4` when `short`."""
    return next(f"{k.split('.')[-1] if short else k}={v}" for k, v in p.items() if "." in k)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {arch: f"C{i}" for i, arch in enumerate(dict.fromkeys(p["arch"] for p in points))}
    style = {"sae-jax": ("o", "-"), "SAELens": ("s", "--")}
    for side in SIDES:
        for arch, color in colors.items():
            ps = sorted((p for p in points if p["arch"] == arch and p["side"] == side), key=lambda p: p["l0"])
            if not ps:
                continue
            marker, line = style[side]
            kw = dict(
                color=color,
                marker=marker,
                linestyle=line,
                label=f"{arch} ({side})",
                mfc="none" if side == "SAELens" else color,
            )
            a.plot([p["l0"] for p in ps], [p["fvu"] for p in ps], **kw)
            b.plot([p["l0"] for p in ps], [p["mcc"] for p in ps], **kw)
    a.set(
        xlabel="L0 (held-out)", ylabel="FVU = 1 - explained variance", title="Reconstruction vs sparsity", xscale="log"
    )
    b.set(
        xlabel="L0 (held-out)", ylabel="MCC vs true directions", title="Ground-truth recovery vs sparsity", xscale="log"
    )
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    for ax in (a, b):  # plain numbers at 2, 3, 5, 10, 20, 30 (log minor labels overlap between 2 and 10)
        ax.xaxis.set_major_locator(FixedLocator([2, 3, 5, 10, 20, 30, 50]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    handles, labels = a.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=5, loc="lower center")  # below both panels, over no point
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def table(points: list[dict]) -> str:
    rows = [
        "| side | arch | setting | L0 | FVU | MCC | recovered | F1 | absorption | dead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        ab = "-" if p["absorption"] is None else f"{p['absorption']:.2f}"
        rows.append(
            f"| {p['side']} | {p['arch']} | {setting(p)} | {p['l0']:.1f} | {p['fvu']:.3f} | {p['mcc']:.3f} "
            f"| {p['recovered']:.2f} | {p['f1']:.2f} | {ab} | {p['dead']:.2f} |"
        )
    return "\n".join(rows)


def matched(points: list[dict], tol: float = MATCH) -> list[dict]:
    """At each SAELens point's L0 (+-tol), the best FVU and the best MCC of each side among the points there, and
    each side's best FVU interpolated at that L0 (`at_l0`).

    Windows holding the same points as the previous one are left out."""
    rows, seen = [], set()
    for anchor in sorted({p["l0"] for p in points if p["side"] == "SAELens"}):
        near = [p for p in points if abs(p["l0"] - anchor) <= tol * anchor]
        key = frozenset(id(p) for p in near)
        sides = {s: [p for p in near if p["side"] == s] for s in SIDES}
        if key in seen or not all(sides.values()):
            continue
        seen.add(key)
        row = {"l0": anchor}
        for s, ps in sides.items():
            row[s] = {"fvu": min(ps, key=lambda p: p["fvu"]), "mcc": max(ps, key=lambda p: p["mcc"])}
        row["at_l0"] = {s: at_l0(points, s, anchor) for s in SIDES}
        rows.append(row)
    return rows


def at_l0(points: list[dict], side: str, l0: float, tol: float = MATCH, gap: float = GAP) -> dict | None:
    """`side`'s best FVU at exactly `l0`, {"arch", "fvu"}, or None when no architecture's sweep reaches `l0`.

    Each architecture's FVU is interpolated linearly in log L0 between its two sweep points around `l0` when they
    are at most `gap` times apart (SAELens's jumprelu falls from FVU 0.12 at L0 6.3 to 0.03 at 14: no chord spans
    that); FVU is convex in log L0 in these sweeps, so the chord is an upper bound. Just above an architecture's
    last point (within `tol`) that point's FVU stands, again an upper bound since FVU falls as L0 rises. A +-10%
    window can hold points whose L0 differs by 20%, and FVU falls ~8% per 10% of L0 here: this compares both sides
    at one L0."""
    import math

    best = None
    for arch in dict.fromkeys(p["arch"] for p in points):
        ps = sorted((p for p in points if p["side"] == side and p["arch"] == arch), key=lambda p: p["l0"])
        fvu = None
        if ps and ps[-1]["l0"] <= l0 <= ps[-1]["l0"] * (1 + tol):
            fvu = ps[-1]["fvu"]
        for lo, hi in zip(ps, ps[1:]):
            if lo["l0"] <= l0 <= hi["l0"] and lo["l0"] < hi["l0"] <= gap * lo["l0"]:
                t = math.log(l0 / lo["l0"]) / math.log(hi["l0"] / lo["l0"])
                fvu = lo["fvu"] + t * (hi["fvu"] - lo["fvu"])
        if fvu is not None and (best is None or fvu < best["fvu"]):
            best = {"arch": arch, "fvu": fvu}
    return best


def matched_table(rows: list[dict], tol: float = MATCH) -> str:
    def cell(p, metric):
        return f"{p[metric]:.4f} ({p['arch']} {setting(p, short=True)}, L0 {p['l0']:.1f})"

    def interpolated(r):
        return " / ".join(
            "-" if r["at_l0"][s] is None else f"{r['at_l0'][s]['fvu']:.4f} ({r['at_l0'][s]['arch']})" for s in SIDES
        )

    out = [
        f"| L0 window (a SAELens point's +-{tol:.0%}) | sae-jax best FVU | SAELens best FVU | sae-jax best MCC "
        "| SAELens best MCC | FVU at the SAELens point's L0, interpolated: sae-jax / SAELens |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [cell(r[side][m], m) for m in ("fvu", "mcc") for side in SIDES] + [interpolated(r)]
        out.append(f"| {r['l0'] * (1 - tol):.2f}-{r['l0'] * (1 + tol):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--steps", type=int, default=800, help="steps per run: the token budget is steps * batch_size")
    ap.add_argument("--arch", nargs="*", default=list(SWEEPS), choices=list(SWEEPS))
    ap.add_argument("--quick", action="store_true", help="the middle two values of each sweep")
    ap.add_argument(
        "--values", nargs="+", type=float, metavar="V", help="only these values of each --arch's sweep (one point: 8)"
    )
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="config override, every run"
    )
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of the same config found in --out")
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--no-saelens", action="store_true", help="train ours only (finished SAELens runs still shown)")
    side.add_argument(
        "--only-saelens", action="store_true", help="train SAELens's only (finished runs of ours still shown)"
    )
    ap.add_argument("--torch-threads", type=int, default=1, help=TORCH_THREADS)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    trains = {"sae-jax": not args.only_saelens, "SAELens": not args.no_saelens}
    points, t0 = [], time.perf_counter()
    for arch in args.arch:
        key, values = SWEEPS[arch]
        values = values[1:3] if args.quick else values
        for v in [v for v in values if args.values is None or v in args.values]:
            for s in SIDES:
                p = run_point(s, args.out, arch, key, v, args.steps, args.sets, trains[s], args.reuse)
                if p is not None:
                    points.append(p)
                    print(json.dumps(p), flush=True)
    rows = matched(points)
    report = table(points) + "\n\nMatched L0:\n\n" + matched_table(rows) + "\n"
    (args.out / "frontier.json").write_text(json.dumps({"points": points, "matched": rows}, indent=1) + "\n")
    (args.out / "frontier.md").write_text(report)
    plot(points, args.out / "frontier.png")
    print(report)
    print(f"{time.perf_counter() - t0:.0f} s; wrote {args.out / 'frontier.png'}, frontier.json, frontier.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
