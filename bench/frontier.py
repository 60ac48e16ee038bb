"""The quality frontier: every architecture over a sweep of sparsity at a fixed token budget, on realistic
synthetic ground truth; FVU-vs-L0 and MCC-vs-L0 in one PNG, and the numbers as JSON and a markdown table.

    python bench/frontier.py --out runs/frontier            # the default sweep (tens of minutes on 2 CPU cores)
    python bench/frontier.py --out runs/frontier --quick    # two points per architecture, a smaller set

Each point is one `sae_jax.run.train` run; its eval.json gives L0 and FVU (1 - explained variance) on unseen
batches and the ground-truth scores. SAELens's trainers are not run here yet (`sae-lens` was not installed
in this checkout's environment when this was written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REALISTIC = ROOT / "configs" / "realistic.yaml"  # the set tests/test_arch_recovery.py trains on

# What each architecture sweeps: (key, values), and its fixed settings (the best found on this set).
SWEEPS = {
    "relu": ("train.l1_coefficient", [1.0, 2.0, 3.0, 5.0], ["train.lr=2e-3"]),
    "topk": ("sae.k", [3, 4, 5, 8], ["sae.unit_norm_decoder=true", "train.lr=1e-2"]),
    "batchtopk": ("sae.k", [2, 3, 4, 6], ["train.lr=1e-2"]),  # free decoder rows (the default)
    "jumprelu": (
        "sae.l0_coefficient",
        [5.0, 10.0, 20.0, 40.0],
        ["train.lr=2e-3", "sae.jumprelu_bandwidth=0.2", "sae.jumprelu_pre_act_coefficient=1e-3"],
    ),
    "matryoshka": ("sae.k", [2, 3, 4, 6], ["train.lr=1e-2"]),
}


def run_point(out: Path, arch: str, key: str, value, fixed: list[str], steps: int) -> dict:
    from sae_jax.config import load_config
    from sae_jax.run import train

    run_dir = out / f"{arch}-{key.split('.')[-1]}-{value}"
    sets = fixed + [
        f"sae.architecture={arch}",
        f"{key}={value}",
        f"train.steps={steps}",
        f"run.save_every={steps}",
        f"run.out_dir={run_dir}",
    ]
    train(load_config(REALISTIC, sets), progress=False)
    ev = json.loads((run_dir / "eval.json").read_text())
    g = ev["ground_truth"]
    return {
        "arch": arch,
        key: value,
        "l0": ev["l0"],
        "fvu": 1 - ev["explained_variance"],
        "mcc": g["mcc"],
        "recovered": g["recovered"],
        "f1": g["f1"],
        "absorption": g.get("absorption"),
        "dead": ev["dead_fraction"],
    }


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch in dict.fromkeys(p["arch"] for p in points):
        ps = sorted((p for p in points if p["arch"] == arch), key=lambda p: p["l0"])
        a.plot([p["l0"] for p in ps], [p["fvu"] for p in ps], "o-", label=arch)
        b.plot([p["l0"] for p in ps], [p["mcc"] for p in ps], "o-", label=arch)
    a.set(
        xlabel="L0 (held-out)", ylabel="FVU = 1 - explained variance", title="Reconstruction vs sparsity", xscale="log"
    )
    b.set(
        xlabel="L0 (held-out)", ylabel="MCC vs true directions", title="Ground-truth recovery vs sparsity", xscale="log"
    )
    a.legend(), b.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def table(points: list[dict]) -> str:
    rows = ["| arch | setting | L0 | FVU | MCC | recovered | F1 | absorption |", "|---|---|---|---|---|---|---|---|"]
    for p in points:
        setting = next(f"{k}={v}" for k, v in p.items() if "." in k)
        ab = "-" if p["absorption"] is None else f"{p['absorption']:.2f}"
        rows.append(
            f"| {p['arch']} | {setting} | {p['l0']:.1f} | {p['fvu']:.3f} | {p['mcc']:.3f} | {p['recovered']:.2f} | {p['f1']:.2f} | {ab} |"
        )
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--steps", type=int, default=800, help="steps per run: the token budget is steps * 512")
    ap.add_argument("--arch", nargs="*", default=list(SWEEPS))
    ap.add_argument("--quick", action="store_true", help="the middle two values of each sweep")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    points = []
    for arch in args.arch:
        key, values, fixed = SWEEPS[arch]
        for v in values[1:3] if args.quick else values:
            points.append(run_point(args.out, arch, key, v, fixed, args.steps))
            print(json.dumps(points[-1]), flush=True)
    (args.out / "frontier.json").write_text(json.dumps(points, indent=1) + "\n")
    (args.out / "frontier.md").write_text(table(points) + "\n")
    plot(points, args.out / "frontier.png")
    print(table(points))
    print(f"wrote {args.out / 'frontier.png'}, frontier.json, frontier.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
