"""The sparse train step taken apart: ours (JAX) and PyTorch's sparse step, phase by phase, in one process.

    python bench/step_parts.py --arch relu --rounds 3
    python bench/step_parts.py --arch topk --rounds 3

Release shape (D=2048, N=32768, B=256, float32) and `bench/sae_step.py`'s
activation pattern (per-token L0 lognormal, mean 63; 10% of the latents dead,
so topk runs AuxK). Each phase is jitted (JAX) or run (PyTorch) on its own,
on the inputs the step would give it, written as `sae_jax/sparse.py`,
`sae_jax/adam.py` and `bench/torch_sae.py` write it:

- encoder GEMM: pre = x @ W_enc + b_enc
- routing / top_k: relu: ours `sparse.route` and top_k(pre, k_max = 128) plus the fullest rows; PyTorch top_k
  with K = the batch's largest L0. topk: top_k(pre, 64) and AuxK's top_k(pre where dead, 256) on both sides
- gather + decode: W_dec's rows at the active pairs and x_hat = sum_k a_k W_dec[idx_k] (ours: take and a
  batched dot; PyTorch: embedding_bag); relu adds the penalty's row norms
- decode backward: the codes' gradient and dW_dec = scatter-add of a_k g (ours: take and scatter-add;
  PyTorch: embedding, bmm, index_add_)
- rows over budget (relu, ours only): the `sparse.dense_rows` fullest tokens (16), from their own
  `sparse.ROW_BUDGET_FACTOR` * k_max = 512 largest pre-activations (gather, decode, backward, scatter)
- (not in the step) the same rows densely, as they go when a token has more than 512 active: three
  [16, N] x [N, D] products and the decoder norms' pass over W_dec; PyTorch's column is empty
- dpre + x^T @ dpre: the [B, N] cotangent of pre written out, and W_enc's gradient GEMM
- grad norm + Adam: global-norm clipping and Adam over all four params (ours `adam.fused_adam`, donated;
  PyTorch clip_grad_norm_ and Adam(fused=True))
- whole step: `bench/sae_step.py`'s jax-sparse and torch-sparse steps; "rest" is the whole step less the phases above it

Pieces jitted alone may fuse differently from the whole step, so "rest" can come out negative. Matmul precision is
pinned to full float32 on both sides. The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from bench.common import interleaved, json_line, machine, median, set_malloc, table
from bench.sae_step import (
    DEAD_TOKENS,
    L1,
    LR,
    SHAPES,
    K,
    bench_batches,
    bench_weights,
    dead_latents,
    jax_trainer,
    pin_precision,
)
from bench.torch_sae import TorchTrainer

K_MAX, AUXK_K = 128, 256
DENSE_ROWS = "(rows over budget, densely)"
PHASES = (
    "encoder GEMM",
    "routing / top_k",
    "gather + decode",
    "decode backward + dW_dec scatter",
    "rows over budget",
    "dpre + x^T @ dpre",
    "grad norm + Adam",
)


def _blocked(f, *args):
    """A thunk running f(*args) to completion."""
    return lambda: jax.block_until_ready(f(*args))


def jax_phases(w: dict, x: np.ndarray, dead: np.ndarray, arch: str) -> dict:
    """Phase name -> thunk, each one jitted piece of our sparse step on its own inputs."""
    from sae_jax import adam, sparse
    from sae_jax.trainer import apply_optimizer

    W_enc, b_enc, W_dec, b_dec = (jnp.asarray(w[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x, dead = jnp.asarray(x), jnp.asarray(dead)
    B, (N, D) = x.shape[0], W_dec.shape
    pre = jax.jit(lambda x: x @ W_enc + b_enc)(x)
    n_rows = sparse.dense_rows(B)

    def route(pre):
        if arch == "relu":
            path, _ = sparse.route(pre, K_MAX, n_rows)
            rows = jax.lax.top_k(sparse.active_counts(pre), n_rows)[1]
            return jax.lax.top_k(pre, K_MAX)[1], None, rows, path
        aux = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), AUXK_K)[1]
        return jax.lax.top_k(pre, K)[1], aux, None, None

    idx, aux, rows, _ = jax.jit(route)(pre)
    sets = [idx] if aux is None else [idx, aux]

    def forward(W_dec, pre, sets):
        out = []
        for i in sets:
            w_rows = jnp.take(W_dec, i, axis=0, mode="clip")
            a = jax.nn.relu(jnp.take_along_axis(pre, i, axis=-1, mode="clip"))
            extra = jnp.sum(a * jnp.sqrt(jnp.sum(jnp.square(w_rows), -1))) if arch == "relu" else 0.0
            out.append((jnp.einsum("bk,bkd->bd", a, w_rows), extra))
        return out

    def backward(W_dec, pre, sets, g):
        dW_dec, das = jnp.zeros((N, D), jnp.float32), []
        for i in sets:
            w_rows = jnp.take(W_dec, i, axis=0, mode="clip")
            a = jax.nn.relu(jnp.take_along_axis(pre, i, axis=-1, mode="clip"))
            das.append(jnp.einsum("bd,bkd->bk", g, w_rows))
            dW_dec = dW_dec.at[i.reshape(-1)].add((a[..., None] * g[:, None, :]).reshape(-1, D))
        return dW_dec, das

    def rows_sparse(W_dec, pre, rows, g):
        i = jax.lax.top_k(pre[rows], min(K_MAX * sparse.ROW_BUDGET_FACTOR, N))[1]
        ((x_hat, extra),) = forward(W_dec, pre[rows], [i])
        return x_hat, extra, backward(W_dec, pre[rows], [i], jnp.take(g, rows, axis=0))

    def dense_rows(W_dec, pre, rows, g):
        f_d = jax.nn.relu(jnp.take(pre, rows, axis=0))
        norms = jnp.linalg.norm(W_dec, axis=1)
        dec = f_d @ W_dec
        g_d = jnp.take(g, rows, axis=0)
        dW = f_d.T @ g_d + (jnp.sum(f_d, 0) / norms)[:, None] * W_dec
        return dec, g_d @ W_dec.T, dW

    def dpre_gemm(x, sets, rows, g_vals, g_dense):
        dpre = jnp.zeros((B, N), jnp.float32)
        if rows is not None:
            dpre = dpre.at[rows].add(g_dense)
        dpre = dpre.at[jnp.arange(B)[:, None], jnp.concatenate(sets, -1)].add(g_vals)
        return sparse._materialised_T(x) @ dpre

    rng = np.random.default_rng(2)
    g = jnp.asarray(rng.standard_normal((B, D), dtype=np.float32))
    n_pairs = sum(i.shape[1] for i in sets)
    g_vals = jnp.asarray(rng.standard_normal((B, n_pairs), dtype=np.float32))
    g_dense = jnp.asarray(rng.standard_normal((n_rows, N), dtype=np.float32))

    tx = adam.fused_adam(optax.constant_schedule(LR), clip=1.0)
    params = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, dtype=np.float32)) * 1e-3, params)
    box = {"p": jax.tree.map(jnp.copy, params), "s": tx.init(params)}

    def adam_step(p, s, grads):
        return apply_optimizer(tx, grads, s, p, jnp.bool_(True))

    adam_donated = jax.jit(adam_step, donate_argnums=(0, 1))

    def run_adam():
        box["p"], box["s"] = adam_donated(box["p"], box["s"], grads)
        jax.block_until_ready(box["p"])

    fns = {
        "encoder GEMM": _blocked(jax.jit(lambda x, W, b: x @ W + b), x, W_enc, b_enc),
        "routing / top_k": _blocked(jax.jit(route), pre),
        "gather + decode": _blocked(jax.jit(forward), W_dec, pre, sets),
        "decode backward + dW_dec scatter": _blocked(jax.jit(backward), W_dec, pre, sets, g),
        "dpre + x^T @ dpre": _blocked(jax.jit(dpre_gemm), x, sets, rows, g_vals, g_dense),
        "grad norm + Adam": run_adam,
    }
    if arch == "relu":
        fns["rows over budget"] = _blocked(jax.jit(rows_sparse), W_dec, pre, rows, g)
        fns[DENSE_ROWS] = _blocked(jax.jit(dense_rows), W_dec, pre, rows, g)
    return fns


def torch_phases(w: dict, x: np.ndarray, dead: np.ndarray, arch: str) -> dict:
    """Phase name -> thunk, each one piece of PyTorch's sparse step (`bench/torch_sae.py`'s 'sparse')."""
    W_enc, b_enc, W_dec, b_dec = (torch.from_numpy(np.array(w[k])) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x, dead = torch.from_numpy(x), torch.from_numpy(dead)
    B, (N, D) = x.shape[0], W_dec.shape
    pre = x @ W_enc + b_enc

    def route():
        if arch == "relu":
            k = max(int((pre > 0).sum(-1).max()), 1)
            return [pre.topk(k, dim=-1, sorted=False)[1]]
        aux = pre.masked_fill(~dead, -torch.inf).topk(AUXK_K, dim=-1, sorted=False)[1]
        return [pre.topk(K, dim=-1, sorted=False)[1], aux]

    sets = route()
    vals = [torch.relu(pre.gather(-1, i)) for i in sets]
    g = torch.from_numpy(np.random.default_rng(2).standard_normal((B, D), dtype=np.float32))

    def forward():
        norms = W_dec.norm(dim=1) if arch == "relu" else None
        for i, a in zip(sets, vals):
            F.embedding_bag(i, W_dec, per_sample_weights=a, mode="sum")
            if norms is not None:
                (a * norms[i]).sum()

    def backward():
        dW = torch.zeros_like(W_dec)
        for i, a in zip(sets, vals):
            torch.bmm(F.embedding(i, W_dec), g.unsqueeze(-1))
            dW.index_add_(0, i.reshape(-1), (a.unsqueeze(-1) * g.unsqueeze(1)).reshape(-1, D))
        if arch == "relu":  # the penalty's gradient through |W_dec,i|: one elementwise pass over W_dec
            dW += torch.rand(N, 1) * W_dec / W_dec.norm(dim=1, keepdim=True)

    def dpre_gemm():
        cat = torch.cat(sets, -1)
        dpre = torch.zeros(B, N).scatter_(-1, cat, torch.ones(cat.shape))
        return x.T @ dpre

    params = [torch.nn.Parameter(t.clone()) for t in (W_enc, b_enc, W_dec, b_dec)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    try:
        opt = torch.optim.Adam(params, lr=LR, fused=True)
    except RuntimeError:
        opt = torch.optim.Adam(params, lr=LR, foreach=True)

    def adam_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return {
        "encoder GEMM": lambda: x @ W_enc + b_enc,
        "routing / top_k": route,
        "gather + decode": forward,
        "decode backward + dW_dec scatter": backward,
        "dpre + x^T @ dpre": dpre_gemm,
        "grad norm + Adam": adam_step,
    }


def whole_steps(w: dict, batches: list[np.ndarray], arch: str) -> dict:
    """'ours' and 'torch': the full jax-sparse and torch-sparse steps of `bench/sae_step.py`."""
    N = w["W_dec"].shape[0]
    B = batches[0].shape[0]
    _, state, step = jax_trainer(w, arch, B, "sparse")
    xs_jax, xs_torch = [jnp.asarray(b) for b in batches], [torch.from_numpy(b) for b in batches]
    box, one, it = {"s": state}, jnp.float32(1.0), iter(range(1 << 30))

    def ours():
        box["s"], _ = step(box["s"], xs_jax[next(it) % len(xs_jax)], one)
        jax.block_until_ready(box["s"].params.W_enc)

    tr = TorchTrainer(w, arch, K if arch == "topk" else None, "sparse", lr=LR, l1=L1, dead_tokens=DEAD_TOKENS)
    tr.since[torch.from_numpy(dead_latents(N))] = DEAD_TOKENS
    it_t = iter(range(1 << 30))
    fns = {"ours": ours, "torch": lambda: tr.step(xs_torch[next(it_t) % len(xs_torch)])}
    for fn in fns.values():  # the second call of ours compiles again, for the state the first one returned
        fn(), fn()
    return fns


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="relu", choices=("relu", "topk"))
    p.add_argument("--shape", default="release", choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    allocator = set_malloc(False)
    precision = pin_precision()
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {allocator}")
    print(precision, flush=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    D, expansion, B = SHAPES[a.shape]
    N = D * expansion
    w, batches = bench_weights(D, N), bench_batches(D, N, B)
    dead = dead_latents(N)
    fns = {}
    for side, make in (("ours", jax_phases), ("torch", torch_phases)):
        fns.update({(side, name): fn for name, fn in make(w, batches[0], dead, a.arch).items()})
    fns.update({(side, "whole step"): fn for side, fn in whole_steps(w, batches, a.arch).items()})
    times = interleaved({f"{s}|{n}": fn for (s, n), fn in fns.items()}, a.rounds, warmup=1)
    ms = {key: 1e3 * median(ts) for key, ts in times.items()}
    low = {key: 1e3 * min(ts) for key, ts in times.items()}
    rest = {
        s: ms[f"{s}|whole step"] - sum(v for k, v in ms.items() if k.startswith(s + "|") and k.split("|")[1] in PHASES)
        for s in ("ours", "torch")
    }
    ms.update({f"{s}|rest": v for s, v in rest.items()})
    rows = []
    for name in PHASES + ("rest", "whole step", DENSE_ROWS):
        o, t = ms.get(f"ours|{name}", float("nan")), ms.get(f"torch|{name}", float("nan"))
        if o == o or t == t:
            nan = float("nan")
            lo, lt = low.get(f"ours|{name}", nan), low.get(f"torch|{name}", nan)
            rows.append(dict(phase=name, ours=o, torch=t, diff=o - t, ours_min=lo, torch_min=lt))
    print(
        f"{a.shape} {a.arch}, D={D} N={N} B={B}: median (and min) ms of {a.rounds} interleaved rounds; "
        f"load average at end: {os.getloadavg()}"
    )
    print(
        table(
            rows,
            [
                ("phase", "phase", "s"),
                ("ours", "ours ms", ".1f"),
                ("torch", "torch ms", ".1f"),
                ("diff", "ours - torch", "+.1f"),
                ("ours_min", "ours min", ".1f"),
                ("torch_min", "torch min", ".1f"),
            ],
        )
    )
    print(
        json_line(
            "step_parts",
            machine=machine(),
            precision=precision,
            shape=a.shape,
            arch=a.arch,
            rounds=a.rounds,
            load=os.getloadavg(),
            median_ms=ms,
            min_ms=low,
            times_s=times,
        )
    )


if __name__ == "__main__":
    main()
