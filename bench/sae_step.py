"""Train-step tokens/s: our jitted step (dense and sparse kernels) vs the PyTorch reference trainer.

    python bench/sae_step.py                       # release and small shapes, relu and topk
    python bench/sae_step.py --shapes release --archs relu --rounds 7

Every variant starts from the same weights and trains on the same batches;
the first step's loss is printed per variant as a check that they compute the
same thing. Weights are built so that L0 is about 63, as the release's: unit
decoder rows, the encoder their transpose, b_enc = -2.89 on N(0, 1) inputs
(P(z > 2.89) * N = 63 at N = 32768); topk uses k = 64 on the same weights.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.common import add_malloc_flag, set_malloc, interleaved, json_line, machine, median, mfu, sae_train_flops_per_token, table
from bench.torch_sae import TorchTrainer

SHAPES = {  # name: (D, expansion, B)
    "release": (2048, 16, 256),
    "small": (512, 16, 256),
    "gpu": (2048, 16, 4096),
    "smoke": (64, 4, 32),
}
K = 64  # topk's k, and the L0 the relu weights aim at
JAX_VARIANTS = {  # name: (train.kernel, train.compute_dtype, other config)
    "jax-dense": ("dense", "float32", ()),
    "jax-sparse": ("sparse", "float32", ()),  # dW_enc by GEMM, the default
    "jax-sparse-scatter": ("sparse", "float32", ("train.sparse_encoder_grad=scatter",)),
    "jax-dense-bf16": ("dense", "bfloat16", ()),
    "jax-sparse-bf16": ("sparse", "bfloat16", ()),
    "jax-sparse-scatter-bf16": ("sparse", "bfloat16", ("train.sparse_encoder_grad=scatter",)),
}
L1, LR = 5.0, 1e-6  # a small lr keeps L0 where it starts over the run


def bench_weights(D: int, N: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit decoder rows, encoder = their transpose, one b_enc for all latents so that about K fire per N(0, 1) token."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((N, D), dtype=np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    # Pre-activations of unit columns on N(0, 1) inputs are N(0, 1): cut at the (1 - K/N) quantile.
    threshold = np.quantile(rng.standard_normal(1 << 20), 1 - min(K / N, 0.5))
    b_enc = np.full(N, -threshold, np.float32)
    return {"W_enc": np.ascontiguousarray(W_dec.T), "b_enc": b_enc, "W_dec": W_dec, "b_dec": np.zeros(D, np.float32)}


def bench_batches(D: int, B: int, n: int = 4, seed: int = 1) -> list[np.ndarray]:
    """n batches [B, D] of N(0, 1): mean norm about sqrt(D), so the input scale is 1."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, D), dtype=np.float32) for _ in range(n)]


def jax_trainer(weights, arch: str, B: int, kernel: str, dtype: str = "float32", extra: tuple[str, ...] = ()):
    """(step() -> loss, per-step callable) for our jitted, donated step on `weights`."""
    from sae_jax.config import load_config
    from sae_jax.sae import SAEParams
    from sae_jax.trainer import init_state, make_step

    D, N = weights["W_dec"].shape[1], weights["W_dec"].shape[0]
    sets = [f"sae.d_in={D}", f"sae.expansion={N // D}", f"data.batch_size={B}", f"train.kernel={kernel}",
            f"train.compute_dtype={dtype}", f"train.lr={LR}", "train.lr_warmup_steps=0", "train.l1_warmup_frac=0",
            f"train.l1_coefficient={L1}", "train.steps=1000000"]
    if arch == "topk":
        sets += ["sae.architecture=topk", f"sae.k={K}"]
    cfg = load_config(None, sets + list(extra))
    state = init_state(cfg)
    state = dataclasses.replace(state, params=SAEParams(**{k: jnp.asarray(v) for k, v in weights.items()}))
    return cfg, state, make_step(cfg)


def run_shape(shape: str, arch: str, rounds: int, variants: list[str], extra: tuple[str, ...] = (), peak: float | None = None) -> list[dict]:
    D, expansion, B = SHAPES[shape]
    N = D * expansion
    weights, batches = bench_weights(D, N), bench_batches(D, B)
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
            if "dense_fallback" in box["m"]:
                first[v + ":fallback"] = float(box["m"]["dense_fallback"])
            first[v + ":l0"] = float(box["m"]["l0"])
        else:
            tr = TorchTrainer(weights, arch, K if arch == "topk" else None, v.split("-", 1)[1], lr=LR, l1=L1, device=device)
            box = {"loss": None}

            def fn(tr=tr, it=it, box=box):
                box["loss"] = tr.step(xs_torch[next(it) % len(xs_torch)])

            fn()
            first[v] = box["loss"]
            fns[v] = fn
    times = interleaved(fns, rounds, warmup=1)
    rows = []
    for v in variants:
        t = median(times[v])
        rows.append(dict(shape=shape, arch=arch, D=D, N=N, B=B, variant=v, s_per_step=t, min_s=min(times[v]), tokens_per_s=B / t,
                         loss_step1=first[v], l0=first.get(v + ":l0", float("nan")), times=times[v],
                         mfu=mfu(sae_train_flops_per_token(D, N), B / t, peak)))
    best_torch = min((r["s_per_step"] for r in rows if r["variant"].startswith("torch")), default=float("nan"))
    for r in rows:
        r["vs_best_torch"] = best_torch / r["s_per_step"]
    del fns
    gc.collect()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="release,small", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--archs", default="relu,topk")
    p.add_argument("--variants", default="jax-dense,jax-sparse,jax-sparse-scatter,torch-eager,torch-fused,torch-compile",
                   help=f"comma list of {list(JAX_VARIANTS)} and torch-eager, torch-fused, torch-compile")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="config override for our variants, e.g. train.sparse_k_max=128")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s, for an MFU column (H100 SXM bf16 dense: 989)")
    add_malloc_flag(p)
    a = p.parse_args(argv)
    pairs = [(shape, arch) for shape in a.shapes.split(",") for arch in a.archs.split(",")]
    if len(pairs) > 1:
        return _each_in_its_own_process(pairs, a)
    allocator = set_malloc(a.system_malloc)
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {allocator}", flush=True)
    rows = run_shape(*pairs[0], a.rounds, a.variants.split(","), tuple(a.set), a.peak_tflops)
    print(table(rows, [("shape", "shape", "s"), ("arch", "arch", "s"), ("B", "B", "d"), ("variant", "variant", "s"),
                       ("s_per_step", "s/step", ".3f"), ("min_s", "min s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("vs_best_torch", "x best torch", ".2f"), ("loss_step1", "loss@1", ".6g")]
                + ([("mfu", "MFU", ".1%")] if a.peak_tflops else [])), flush=True)
    ratios = {}
    for r in rows:
        if r["variant"].startswith("jax"):
            ratios[f"{r['shape']}/{r['arch']}/{r['variant']}"] = round(r["vs_best_torch"], 3)
    print(json_line("sae_step", machine=machine(), allocator=allocator, rounds=a.rounds, peak_tflops=a.peak_tflops, ratios_vs_best_torch=ratios,
                    rows=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if k != "times"} for r in rows]))


def _each_in_its_own_process(pairs: list[tuple[str, str]], a: argparse.Namespace) -> None:
    """Run each (shape, arch) in a fresh process, so no group's memory is held through the next; then one JSON line for all."""
    import json
    import subprocess

    # The child's arguments from the parsed ones: one pair each, everything else as given.
    same = ["--variants", a.variants, "--rounds", str(a.rounds), *[x for v in a.set for x in ("--set", v)]]
    same += (["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else []) + (["--system-malloc"] if a.system_malloc else [])
    merged: dict = {}
    for shape, arch in pairs:
        out = subprocess.run([sys.executable, __file__, "--shapes", shape, "--archs", arch, *same], stdout=subprocess.PIPE, text=True)
        lines = out.stdout.splitlines()
        print("\n".join(l for l in lines if not l.startswith("{")), flush=True)
        if out.returncode or not lines or not lines[-1].startswith("{"):
            sys.exit(f"sae_step: {shape}/{arch} failed (exit {out.returncode})")
        one = json.loads(lines[-1])
        merged = {**one, "ratios_vs_best_torch": {**merged.get("ratios_vs_best_torch", {}), **one["ratios_vs_best_torch"]},
                  "rows": merged.get("rows", []) + one["rows"]}
    print(json.dumps(merged))


if __name__ == "__main__":
    main()
