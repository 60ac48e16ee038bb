"""A second, independent yardstick: SAELens's synthetic data (`sae_lens.synthetic`) and SAELens's own evals.

    python bench/saelens_synthetic.py --out runs/yardstick           # one point per architecture, both sides
    python bench/saelens_synthetic.py --out runs/yardstick --arch topk jumprelu --steps 400

SAELens's generator (`SyntheticModel`: Zipfian firing probabilities, a hierarchy of parents with children, low-rank
correlations, spread magnitudes, a bias) draws every batch once into one .npy file; ours (`sae_jax.run.train`,
data.source disk, unshuffled) and SAELens's (`bench.saelens_runner.train_saelens`) then train on exactly those
batches at the same budget, with configs/realistic.yaml's settings and frontier.py's sweep point and SAELens
overrides. Both SAEs are then loaded as SAELens SAEs (ours exported with `save_sae(format="saelens")`) and scored
by `sae_lens.synthetic.eval_sae_on_synthetic_data` on the same fresh samples: its L0, explained variance, MCC,
uniqueness, precision/recall/F1 as feature detectors, shrinkage and dead latents. Nothing of ours scores here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.frontier import SAELENS, SWEEPS, TORCH_THREADS, point_config  # noqa: E402

SIDES = ("sae-jax", "SAELens")


def synthetic_model(n_features: int, d: int, seed: int):
    """SAELens's generator: 4 parents with 3 children each, Zipfian probabilities 0.3..0.02 (about 4.7 features
    per token), rank-8 correlations, magnitudes 1 +- 0.3, a bias of norm 1; fixed by `seed`."""
    from sae_lens.synthetic import (
        HierarchyConfig,
        LowRankCorrelationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModel(
        SyntheticModelConfig(
            num_features=n_features,
            hidden_dim=d,
            firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.3, min_prob=0.02),
            hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=1),
            correlation=LowRankCorrelationConfig(rank=8, correlation_scale=0.1, seed=seed),
            std_firing_magnitudes=0.3,
            mean_firing_magnitudes=1.0,
            bias=True,
            seed=seed,
        )
    )


def write_batches(model, tokens: int, path: Path, seed: int) -> Path:
    """`tokens` rows of the model's activations [T, D] float32 in one .npy file at `path`."""
    import torch

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, model.sample(tokens).numpy().astype(np.float32))
    return path


def saelens_view(side: str, run_dir: Path):
    """The trained SAE as a SAELens inference SAE (ours through our SAELens writer)."""
    from sae_lens import SAE

    from sae_jax.formats import load_sae, save_sae

    if side == "SAELens":
        return SAE.load_from_disk(str(run_dir / "sae"))
    folder = save_sae(load_sae(run_dir / "sae"), run_dir / "saelens", format="saelens", overwrite=True)
    return SAE.load_from_disk(str(folder))


def evaluate(sae, model, samples: int, seed: int) -> dict:
    """SAELens's `eval_sae_on_synthetic_data` on `samples` fresh samples drawn from `seed` (the same for each SAE)."""
    import torch
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    torch.manual_seed(seed)
    return eval_sae_on_synthetic_data(
        sae, model.feature_dict, model.activation_generator, num_samples=samples
    ).to_dict()


def run(args) -> list[dict]:
    from bench import saelens_runner
    from sae_jax import run as sae_run

    model = synthetic_model(args.features, args.d, args.seed)
    tokens = (10 + args.steps + 4) * args.batch_size  # scale_batches, the steps and eval_batches, as set below
    data = write_batches(model, tokens, args.out / "data" / "activations.npy", args.seed)
    sets = args.sets + [  # last: the file holds exactly these batches
        "data.source=disk",
        f"data.disk.path={data.resolve()}",
        "data.disk.shuffle=false",
        f"data.batch_size={args.batch_size}",
        f"sae.d_in={args.d}",
        "train.scale_batches=10",
        "run.eval_batches=4",
    ]
    rows = []
    for arch in args.arch:
        key, values = SWEEPS[arch]
        value = values[1]
        for side in SIDES:
            run_dir = args.out / side.lower() / f"{arch}-{key.split('.')[-1]}-{value}"
            cfg = point_config(arch, key, value, args.steps, run_dir, sets)
            t0, done = time.perf_counter(), False
            if args.reuse:
                done = (
                    saelens_runner.finished(cfg, run_dir, SAELENS[arch]) is not None
                    if side == "SAELens"
                    else (run_dir / "eval.json").is_file() and sae_run.is_complete(cfg)
                )
            if side == "SAELens" and not done:
                saelens_runner.train_saelens(cfg, run_dir, SAELENS[arch])
            elif not done:
                sae_run.train(cfg, progress=False)
            seconds = None if done else round(time.perf_counter() - t0, 1)
            ev = evaluate(saelens_view(side, run_dir), model, args.samples, args.seed + 1)
            rows.append({"side": side, "arch": arch, key: value, "seconds": seconds, **ev})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| side | arch | setting | L0 (true) | EV | MCC | uniqueness | precision | recall | F1 | shrinkage | dead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["classification"]
        setting = next(f"{k.split('.')[-1]}={v}" for k, v in r.items() if "." in k)
        out.append(
            f"| {r['side']} | {r['arch']} | {setting} | {r['sae_l0']:.2f} ({r['true_l0']:.2f}) "
            f"| {r['explained_variance']:.3f} | {r['mcc']:.3f} | {r['uniqueness']:.3f} | {c['precision']:.3f} "
            f"| {c['recall']:.3f} | {c['f1_score']:.3f} | {r['shrinkage']:.3f} | {r['dead_latents']} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/yardstick"))
    ap.add_argument("--arch", nargs="*", default=list(SWEEPS), choices=list(SWEEPS))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--features", type=int, default=128, help="true features of the synthetic model")
    ap.add_argument("--d", type=int, default=32, help="its hidden width D (the SAE has 16 D latents)")
    ap.add_argument("--samples", type=int, default=100_000, help="fresh samples SAELens's eval draws")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="config override, every run"
    )
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of the same config found in --out")
    ap.add_argument("--torch-threads", type=int, default=1, help=TORCH_THREADS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    rows = run(args)
    report = table(rows) + "\n"
    (args.out / "yardstick.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "yardstick.md").write_text(report)
    print(report)
    print(f"{time.perf_counter() - t0:.0f} s; wrote {args.out / 'yardstick.md'}, yardstick.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
