"""Train-step tokens/s: our jitted step (auto, dense and sparse kernels) vs PyTorch, dense and sparse.

    python bench/sae_step.py                       # release and small shapes, relu and topk
    python bench/sae_step.py --shapes release --archs relu --rounds 7

Every variant starts from the same weights and trains on the same batches;
the first step's loss is printed per variant as a check that they compute the
same thing. The activation pattern is a trained SAE's, not a uniform one:
per-token L0 drawn lognormal with mean 63 and sigma 0.45 (so a batch of 256
has its largest L0 near 3x the mean, and a few percent of tokens over
relu's sparse_k_max of 128), and 10% of the latents dead (their encoder bias
lower by 1.5, never in a token's top k; marked dead so topk runs AuxK).
Weights: unit decoder rows, the encoder their transpose, b_enc = -t for the
live latents; token b is N(0, 1) scaled by t / q_b, where q_b is the normal
quantile at which N_live * P(z > q_b) equals its drawn L0. topk uses k = 64
on the same weights; batchtopk and matryoshka (k = 64: nearly every positive
pre-activation kept, so their per-token counts follow relu's L0) run our
variants only (PyTorch's steps are relu and topk).

PyTorch: 'eager', 'fused' (Adam fused=True), 'compile' (torch.compile) run the
dense step a researcher writes (bench/torch_sae.py); 'sparse' decodes from the
active latents with F.embedding_bag and scatters W_dec's gradient with
index_add_, as EleutherAI sparsify does on CPU (relu: K = the batch's largest
L0, so it is exact). Matmul precision is pinned and printed: JAX
jax_default_matmul_precision "highest", PyTorch allow_tf32 off and
float32_matmul_precision "highest" (on Hopper both would otherwise use TF32 or not
by different defaults).

MFU counts the FLOPs the step needs: 10·D·N per token for the dense step
(encoder forward, decoder forward, three backward products; no input
gradient); for a sparse step 4·D·N (encoder forward and x^T @ dpre) plus
6·K·D for the active pairs (decode, codes' gradient, W_dec's gradient), K the
mean L0 (relu) or k (+ auxk_k with dead latents, topk).
Variants run in interleaved rounds; the table gives median seconds per step.
Each (shape, arch) runs in a process of its own.
The last line is JSON with every number and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from statistics import NormalDist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.common import (
    add_malloc_flag,
    interleaved,
    json_line,
    machine,
    median,
    mfu,
    sae_train_flops_per_token,
    set_malloc,
    table,
)
from bench.torch_sae import TorchTrainer

SHAPES = {  # name: (D, expansion, B)
    "release": (2048, 16, 256),
    "small": (512, 16, 256),
    "gpu": (2048, 16, 4096),
    "smoke": (64, 4, 32),
}
K = 64  # topk's k, and the mean L0 the relu weights aim at (the release's: 63)
L0_SIGMA, DEAD_FRACTION, DEAD_SHIFT = 0.45, 0.1, 1.5
JAX_VARIANTS = {  # name: (train.kernel, train.compute_dtype, other config)
    "jax-auto": ("auto", "float32", ()),  # the default
    "jax-dense": ("dense", "float32", ()),
    "jax-sparse": ("sparse", "float32", ()),  # dW_enc by GEMM, the default
    "jax-sparse-scatter": ("sparse", "float32", ("train.sparse_encoder_grad=scatter",)),
    "jax-dense-bf16": ("dense", "bfloat16", ()),
    "jax-sparse-bf16": ("sparse", "bfloat16", ()),
    "jax-sparse-scatter-bf16": ("sparse", "bfloat16", ("train.sparse_encoder_grad=scatter",)),
}
TORCH_VARIANTS = ("torch-eager", "torch-fused", "torch-compile", "torch-sparse")
L1, LR = 5.0, 1e-6  # a small lr keeps L0 where it starts over the run
DEAD_TOKENS = 10_000_000


def dead_latents(N: int, seed: int = 0) -> np.ndarray:
    """[N] bool: DEAD_FRACTION of the latents, dead."""
    return np.random.default_rng(seed).random(N) < DEAD_FRACTION


def live_threshold(N: int) -> float:
    """t: N_live * P(z > t) = K."""
    return NormalDist().inv_cdf(1 - K / (N * (1 - DEAD_FRACTION)))


def bench_weights(D: int, N: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit decoder rows, encoder = their transpose, b_enc = -t (live) or -t - DEAD_SHIFT (dead)."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((N, D), dtype=np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_enc = np.where(dead_latents(N), -live_threshold(N) - DEAD_SHIFT, -live_threshold(N)).astype(np.float32)
    return {"W_enc": np.ascontiguousarray(W_dec.T), "b_enc": b_enc, "W_dec": W_dec, "b_dec": np.zeros(D, np.float32)}


def bench_batches(D: int, N: int, B: int, n: int = 4, seed: int = 1) -> list[np.ndarray]:
    """n batches [B, D]: token b is N(0, I) times t / q_b, so that about L0_b ~ lognormal(mean K) live latents fire."""
    rng = np.random.default_rng(seed)
    n_live, t = N * (1 - DEAD_FRACTION), live_threshold(N)
    out = []
    for _ in range(n):
        l0 = np.clip(K * np.exp(L0_SIGMA * rng.standard_normal(B) - L0_SIGMA**2 / 2), 1, n_live / 4)
        q = np.array([NormalDist().inv_cdf(1 - n_on / n_live) for n_on in l0])
        out.append((rng.standard_normal((B, D), dtype=np.float32) * (t / q)[:, None]).astype(np.float32))
    return out


def jax_trainer(weights, arch: str, B: int, kernel: str, dtype: str = "float32", extra: tuple[str, ...] = ()):
    """(config, state, jitted donated step) for our trainer on `weights`, the dead latents marked dead."""
    from sae_jax.config import load_config
    from sae_jax.sae import SAEParams
    from sae_jax.trainer import init_state, make_step

    D, N = weights["W_dec"].shape[1], weights["W_dec"].shape[0]
    sets = [
        f"sae.d_in={D}",
        f"sae.expansion={N // D}",
        f"data.batch_size={B}",
        f"train.kernel={kernel}",
        f"train.compute_dtype={dtype}",
        f"train.lr={LR}",
        "train.lr_warmup_steps=0",
        "train.l1_warmup_frac=0",
        f"train.l1_coefficient={L1}",
        "train.steps=1000000",
        f"train.dead_tokens={DEAD_TOKENS}",
    ]
    cfg = load_config(None, sets + arch_sets(arch) + list(extra))
    state = init_state(cfg)
    since = jnp.asarray(np.where(dead_latents(N), DEAD_TOKENS, 0).astype(np.int32))
    params = SAEParams(**{k: jnp.asarray(v) for k, v in weights.items()}, threshold=state.params.threshold)
    state = dataclasses.replace(state, params=params, since_fired=since)
    return cfg, state, make_step(cfg)


def arch_sets(arch: str) -> list[str]:
    """Config for `arch`: relu as is; topk, batchtopk and matryoshka (prefixes N/2, N) with k = K."""
    return [] if arch == "relu" else [f"sae.architecture={arch}", f"sae.k={K}"]


def algorithm(variant: str, arch: str, D: int, N: int) -> str:
    """'dense' or 'sparse': what the variant computes (jax-auto: what `train.kernel: auto` resolves to)."""
    if variant == "jax-auto":
        from sae_jax.config import load_config
        from sae_jax.trainer import kernel, spec_from_config

        cfg = load_config(None, [f"sae.d_in={D}", f"sae.expansion={N // D}"] + arch_sets(arch))
        return kernel(spec_from_config(cfg), cfg.train, cfg.sae)
    return "sparse" if "sparse" in variant else "dense"


def run_shape(
    shape: str, arch: str, rounds: int, variants: list[str], extra: tuple[str, ...] = (), peak: float | None = None
) -> list[dict]:
    D, expansion, B = SHAPES[shape]
    N = D * expansion
    weights, batches = bench_weights(D, N), bench_batches(D, N, B)
    l0s = [((b @ weights["W_enc"] + weights["b_enc"]) > 0).sum(1) for b in batches]
    pattern = dict(
        l0_mean=float(np.mean(l0s)),
        l0_max_over_mean=float(np.mean([c.max() / c.mean() for c in l0s])),
        over_128=float(np.mean([(c > 128).mean() for c in l0s])),
        dead_fraction=float(dead_latents(N).mean()),
    )
    print(
        "activation pattern: relu L0 mean {l0_mean:.1f}, batch max / mean {l0_max_over_mean:.2f}, tokens over 128: "
        "{over_128:.1%}, dead latents {dead_fraction:.0%}".format(**pattern),
        flush=True,
    )
    xs_jax = [jnp.asarray(b) for b in batches]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs_torch = [torch.from_numpy(b).to(device) for b in batches]
    fns, first = {}, {}
    for v in variants:
        it = iter(range(1 << 30))
        if v.startswith("jax"):
            kernel, dtype, sets = JAX_VARIANTS[v]
            cfg, state, step = jax_trainer(weights, arch, B, kernel, dtype, extra + sets)
            box = {"s": state, "m": None}
            one = jnp.float32(1.0)

            def fn(box=box, step=step, it=it, one=one):
                box["s"], box["m"] = step(box["s"], xs_jax[next(it) % len(xs_jax)], one)
                jax.block_until_ready(box["s"].params.W_enc)

            fn()
            first[v] = float(box["m"]["loss"])
            fns[v] = fn
            first[v + ":l0"] = float(box["m"]["l0"])
            first[v + ":sparse_tokens"] = float(box["m"]["sparse_token_fraction"])
        else:
            tr = TorchTrainer(
                weights,
                arch,
                K if arch == "topk" else None,
                v.split("-", 1)[1],
                lr=LR,
                l1=L1,
                device=device,
                dead_tokens=DEAD_TOKENS,
            )
            tr.since[torch.from_numpy(dead_latents(N))] = DEAD_TOKENS
            box = {"loss": None}

            def fn(tr=tr, it=it, box=box):
                box["loss"] = tr.step(xs_torch[next(it) % len(xs_torch)])

            fn()
            first[v] = box["loss"]
            fns[v] = fn
    times = interleaved(fns, rounds, warmup=1)
    rows = []
    for v in variants:
        t, alg = median(times[v]), algorithm(v, arch, D, N)
        aux = 256 if pattern["dead_fraction"] and arch != "relu" else 0
        k_active = (K if arch == "topk" else pattern["l0_mean"]) + aux
        flops = sae_train_flops_per_token(D, N, k_active if alg == "sparse" else None)
        rows.append(
            dict(
                shape=shape,
                arch=arch,
                D=D,
                N=N,
                B=B,
                variant=v,
                algorithm=alg,
                s_per_step=t,
                min_s=min(times[v]),
                tokens_per_s=B / t,
                loss_step1=first[v],
                l0=first.get(v + ":l0", float("nan")),
                sparse_tokens=first.get(v + ":sparse_tokens", float("nan")),
                times=times[v],
                gflops_per_token=flops / 1e9,
                mfu=mfu(flops, B / t, peak),
                **pattern,
            )
        )
    torch_rows = [r for r in rows if r["variant"].startswith("torch")]
    best_any = min((r["s_per_step"] for r in torch_rows), default=float("nan"))
    for r in rows:
        same = [q["s_per_step"] for q in torch_rows if q["algorithm"] == r["algorithm"]]
        r["vs_best_torch"] = best_any / r["s_per_step"]
        r["vs_torch_same_alg"] = min(same) / r["s_per_step"] if same else float("nan")
    del fns
    gc.collect()
    return rows


def pin_precision() -> str:
    """Full float32 matmuls on both sides (no TF32) -> the line that says so."""
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return (
        f"matmul precision: JAX jax_default_matmul_precision={jax.config.jax_default_matmul_precision}; torch "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()}, allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="release,small", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--archs", default="relu,topk")
    p.add_argument(
        "--variants",
        default="jax-auto,jax-dense,jax-sparse," + ",".join(TORCH_VARIANTS),
        help=f"comma list of {list(JAX_VARIANTS)} and {list(TORCH_VARIANTS)}",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--set", action="append", default=[], help="config override for our variants, e.g. train.sparse_k_max=128"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s, for an MFU column (H100 SXM bf16 dense: 989)",
    )
    add_malloc_flag(p)
    a = p.parse_args(argv)
    pairs = [(shape, arch) for shape in a.shapes.split(",") for arch in a.archs.split(",")]
    if len(pairs) > 1:
        return _each_in_its_own_process(pairs, a)
    allocator = set_malloc(a.system_malloc)
    precision = pin_precision()
    print(
        f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {allocator}", flush=True
    )
    print(precision, flush=True)
    rows = run_shape(*pairs[0], a.rounds, a.variants.split(","), tuple(a.set), a.peak_tflops)
    print(
        table(
            rows,
            [
                ("shape", "shape", "s"),
                ("arch", "arch", "s"),
                ("B", "B", "d"),
                ("variant", "variant", "s"),
                ("algorithm", "alg", "s"),
                ("s_per_step", "s/step", ".3f"),
                ("min_s", "min s", ".3f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("vs_torch_same_alg", "x torch same alg", ".2f"),
                ("vs_best_torch", "x best torch", ".2f"),
                ("loss_step1", "loss@1", ".6g"),
            ]
            + ([("mfu", "MFU", ".1%")] if a.peak_tflops else []),
        ),
        flush=True,
    )
    ratios = {}
    for r in rows:
        if r["variant"].startswith("jax"):
            key = f"{r['shape']}/{r['arch']}/{r['variant']}"
            ratios[key] = {"same_alg": round(r["vs_torch_same_alg"], 3), "any": round(r["vs_best_torch"], 3)}
            print(
                f"{key} ({r['algorithm']}): {r['vs_torch_same_alg']:.2f}x the best PyTorch {r['algorithm']} step, "
                f"{r['vs_best_torch']:.2f}x the best PyTorch step of any kind",
                flush=True,
            )
    print(
        json_line(
            "sae_step",
            machine=machine(),
            allocator=allocator,
            precision=precision,
            rounds=a.rounds,
            peak_tflops=a.peak_tflops,
            ratios_vs_torch=ratios,
            rows=[
                {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k != "times"} for r in rows
            ],
        )
    )


def _each_in_its_own_process(pairs: list[tuple[str, str]], a: argparse.Namespace) -> None:
    """Run each (shape, arch) in a fresh process, so no group's memory is held through the next; then one JSON line for all."""
    import json
    import subprocess

    # The child's arguments from the parsed ones: one pair each, everything else as given.
    same = ["--variants", a.variants, "--rounds", str(a.rounds), *[x for v in a.set for x in ("--set", v)]]
    same += (["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else []) + (
        ["--system-malloc"] if a.system_malloc else []
    )
    merged: dict = {}
    for shape, arch in pairs:
        out = subprocess.run(
            [sys.executable, __file__, "--shapes", shape, "--archs", arch, *same], stdout=subprocess.PIPE, text=True
        )
        lines = out.stdout.splitlines()
        print("\n".join(l for l in lines if not l.startswith("{")), flush=True)
        if out.returncode or not lines or not lines[-1].startswith("{"):
            sys.exit(f"sae_step: {shape}/{arch} failed (exit {out.returncode})")
        one = json.loads(lines[-1])
        merged = {
            **one,
            "ratios_vs_torch": {**merged.get("ratios_vs_torch", {}), **one["ratios_vs_torch"]},
            "rows": merged.get("rows", []) + one["rows"],
        }
    print(json.dumps(merged))


if __name__ == "__main__":
    main()
