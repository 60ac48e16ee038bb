"""End-to-end tokens/s of harvesting + training, and where the time goes.

    python bench/pipeline.py                       # mid Llama (hidden 512, 12 layers), SAE N = 16 * 512, B = 1024
    python bench/pipeline.py --preset 1b --batch 4096 --context 1024   # the real shapes (a GPU)

The trainer's own pieces: `llama_harvest` (layer-9 input of a random
checkpoint written by `write_tiny_checkpoint`), `ActivationSource` (the
shuffle buffer), `make_step`. Text is random token ids (a stand-in for
`TextSource`, so the tokenizer's cost is not in the numbers). Two passes over
the same number of steps:

- end to end: the loop as `run.py` runs it (the next batch is prepared while
  the step runs; nothing waits but the data);
- attributed: the same, but every harvest and every step is waited for, so
  wall time splits into harvesting, training and host (the buffer's numpy
  work, transfers, Python). Waiting removes the overlap, so these add up to
  more than the end-to-end time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    add_malloc_flag,
    json_line,
    llama_forward_flops_per_token,
    machine,
    mfu,
    sae_train_flops_per_token,
    set_malloc,
    table,
)
from bench.harvest import PRESETS


class RandomText:
    """A TextSource stand-in: S x T random token ids per batch, every token kept; its state is a counter."""

    def __init__(self, seqs: int, context: int, vocab: int, buffer_tokens: int, seed: int = 0):
        self.cfg = SimpleNamespace(buffer_tokens=buffer_tokens)
        self.shape, self.vocab, self.seed, self.i = (seqs, context), vocab, seed, 0

    def next_batch(self):
        from sae_jax.data.text import TokenBatch

        ids = np.random.default_rng([self.seed, self.i]).integers(0, self.vocab, self.shape).astype(np.int32)
        self.i += 1
        ones = np.ones(self.shape, np.int32)
        return TokenBatch(ids, ones, ones.astype(bool))

    def state(self):
        return {"i": self.i}

    def restore(self, state):
        self.i = int(state["i"])


def build(a, timers: dict | None):
    """(source, step, state, scale) for the run; `timers` (if given) collects seconds of waited-for harvests."""
    from sae_jax import llama
    from sae_jax.config import load_config
    from sae_jax.data.activations import ActivationSource, llama_harvest
    from sae_jax.trainer import init_state, make_step

    sizes = PRESETS[a.preset]
    folder = os.path.join(a.workdir, f"llama-{a.preset}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        llama.write_tiny_checkpoint(folder, **sizes)
    harvest = llama_harvest(llama.load(folder, dtype=a.dtype), 9, "input")
    if timers is not None:
        inner = harvest

        def harvest(ids, mask):
            t = time.perf_counter()
            out = jax.block_until_ready(inner(ids, mask))
            timers["harvest"] += time.perf_counter() - t
            return out

    D = sizes["hidden_size"]
    text = RandomText(a.seqs, a.context, sizes["vocab_size"], a.buffer)
    source = ActivationSource(text, harvest, D, a.batch, seed=0, buffer_tokens=a.buffer)
    sets = [
        f"sae.d_in={D}",
        f"sae.expansion={a.expansion}",
        f"data.batch_size={a.batch}",
        f"train.kernel={a.kernel}",
        f"train.compute_dtype={a.sae_dtype}",
        "train.lr_warmup_steps=0",
        "train.steps=1000000",
    ]
    if a.arch == "topk":
        sets += ["sae.architecture=topk", "sae.k=64"]
    cfg = load_config(None, sets)
    # The input scale does not change the work; 1 keeps the run free of a scale-estimating pass.
    return source, make_step(cfg), init_state(cfg), jnp.float32(1.0)


def run_loop(a, attributed: bool) -> dict:
    timers = {"harvest": 0.0, "train": 0.0}
    source, step, state, scale = build(a, timers if attributed else None)
    x = jax.device_put(source.next_batch())
    for _ in range(a.warmup):  # compiles the harvest and the step, fills the buffer once
        state, _ = step(state, x, scale)
        x = jax.device_put(source.next_batch())
    jax.block_until_ready(state)
    timers.update(harvest=0.0, train=0.0)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        t = time.perf_counter()
        state, m = step(state, x, scale)
        if attributed:
            jax.block_until_ready(state)
            timers["train"] += time.perf_counter() - t
        x = jax.device_put(source.next_batch())
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    out = dict(wall_s=wall, tokens_per_s=a.steps * a.batch / wall)
    if attributed:
        host = wall - timers["harvest"] - timers["train"]
        out.update(
            harvest_s=timers["harvest"],
            train_s=timers["train"],
            host_s=host,
            harvest_frac=timers["harvest"] / wall,
            train_frac=timers["train"] / wall,
            host_frac=host / wall,
        )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mid", choices=list(PRESETS))
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the Llama's compute dtype")
    p.add_argument("--batch", type=int, default=1024, help="B, tokens per SAE step")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--arch", default="relu", choices=["relu", "topk"])
    p.add_argument("--kernel", default="dense", choices=["dense", "sparse"])
    p.add_argument("--sae-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--buffer", type=int, default=16384, help="C, shuffle-buffer tokens")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s, for an MFU column (H100 SXM bf16 dense: 989)",
    )
    add_malloc_flag(p)
    a = p.parse_args(argv)
    allocator = set_malloc(a.system_malloc)
    print(f"machine: {machine()}; {allocator}", flush=True)
    e2e = run_loop(a, attributed=False)
    att = run_loop(a, attributed=True)
    sizes = PRESETS[a.preset]
    # Each token is harvested once (9 layers) and trained on once.
    flops = llama_forward_flops_per_token(sizes, 9, a.context) + sae_train_flops_per_token(
        sizes["hidden_size"], a.expansion * sizes["hidden_size"]
    )
    for r in (e2e, att):
        r["mfu"] = mfu(flops, r["tokens_per_s"], a.peak_tflops)
    rows = [dict(mode="end to end", **e2e), dict(mode="attributed (waits)", **att)]
    print(
        table(
            rows,
            [
                ("mode", "pass", "s"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("wall_s", "wall s", ".2f"),
                ("harvest_frac", "harvest", ".0%"),
                ("train_frac", "train", ".0%"),
                ("host_frac", "host", ".0%"),
            ]
            + ([("mfu", "MFU", ".1%")] if a.peak_tflops else []),
        )
    )
    print(
        json_line(
            "pipeline",
            machine=machine(),
            allocator=allocator,
            preset=a.preset,
            peak_tflops=a.peak_tflops,
            S=a.seqs,
            T=a.context,
            B=a.batch,
            arch=a.arch,
            kernel=a.kernel,
            end_to_end=e2e,
            attributed=att,
        )
    )


if __name__ == "__main__":
    main()
