"""Shared pieces of the benchmarks: interleaved timing, the machine line, tables, the JSON line.

Timings on a shared machine drift with other people's load, so every
benchmark measures its variants in interleaved rounds (one call of each per
round) and reports medians: ratios within one run are what count.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable


def machine() -> str:
    """One line naming the CPU, its core count and the accelerator JAX sees."""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    return f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} on {dev.platform} ({kind})"


def add_malloc_flag(parser) -> None:
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (default: sae_jax.malloc.keep_freed_memory, as train.py does)",
    )


def set_malloc(system: bool) -> str:
    """Apply --system-malloc before any computation; both frameworks run under the same allocator. -> a label for the table."""
    from sae_jax.malloc import keep_freed_memory

    return "system malloc" if system or not keep_freed_memory() else "malloc kept (one arena, no mmap)"


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured `rounds` times in turn after `warmup` calls each.

    Each fn must block until its work is done.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> a Markdown table; cols: (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    rule = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[k], f) if k in r else "" for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def json_line(name: str, **payload) -> str:
    """The final machine-readable line of a benchmark."""
    return json.dumps({"bench": name, **payload}, sort_keys=False)


# --- model FLOPs, for utilisation against a peak ------------------------------------


def sae_train_flops_per_token(D: int, N: int, k_active: float | None = None) -> float:
    """The FLOPs one token's training step needs.

    Dense (k_active None): 10·D·N, five [.., D] x [D, N] products (encoder and decoder forward; the codes',
    W_enc's and W_dec's gradients; no input gradient). Sparse: 4·D·N (encoder forward, x^T @ dpre) plus
    6·k_active·D for the active pairs (decode, the codes' gradient, W_dec's gradient).
    """
    return 10.0 * D * N if k_active is None else 4.0 * D * N + 6.0 * k_active * D


def llama_forward_flops_per_token(sizes: dict, layers: int, context: int) -> float:
    """2 x params of the `layers` decoder layers run, plus attention's 4*T*(heads*head_dim) per layer over all T keys (no causal halving)."""
    D, F = sizes["hidden_size"], sizes["intermediate_size"]
    H = sizes.get("head_dim") or D // sizes["num_attention_heads"]
    q, kv = sizes["num_attention_heads"] * H, sizes["num_key_value_heads"] * H
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * F
    return layers * (2.0 * per_layer + 4.0 * context * q)


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the peak (None without a peak)."""
    return None if not peak_tflops else flops_per_token * tokens_per_s / (peak_tflops * 1e12)
