"""Layer-L activation tokens/s: our jitted truncated Flax forward vs transformers' PyTorch Llama, same checkpoint.

    python bench/harvest.py                  # hidden 512, 12 layers, vocab 128256, 8 x 256 tokens, float32
    python bench/harvest.py --preset 1b      # Llama-3.2-1B's shapes (random bf16 weights; for a GPU)

A random Llama-3.2-architecture checkpoint is written with
`sae_jax.llama.write_tiny_checkpoint` at the chosen sizes. Ours: the harvest
the trainer uses (`sae_jax.data.activations.llama_harvest`: `llama.residual`
jitted, layers past L never run). PyTorch, `LlamaForCausalLM` from the same
folder in the same compute dtype, three ways: the notebook's forward hook on
layer L (the whole forward runs, logits included), `output_hidden_states=True`
(likewise), and a pre-hook on layer L that raises once it has the input, so
layers L.. and the logits never run (the best PyTorch way). Variants run in
interleaved rounds; the table gives the median seconds per batch. Every way
is checked to return the same residual as ours. One MLP-shaped product
[S*T, D] x [D, F] per framework is timed in the same rounds: the practical
GEMM peak, against which each way's model FLOP/s is given, and from which
the largest speed-up any way doing these FLOPs could have over the best
PyTorch way follows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch

from bench.common import (
    add_malloc_flag,
    interleaved,
    json_line,
    llama_forward_flops_per_token,
    machine,
    median,
    mfu,
    set_malloc,
    table,
)

PRESETS = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "mid": dict(
        hidden_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=2048,
        vocab_size=128256,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
    ),
    "smoke": dict(
        hidden_size=64,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
}


class _Stop(Exception):
    """Raised by the pre-hook once layer L's input is captured."""


def torch_ways(folder: str, layer: int, dtype: str, device: str):
    """{name: fn(ids [S, T] int64 tensor, mask) -> [S, T, D] tensor} for the three PyTorch ways."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    block = model.model.layers[layer]
    box = {}

    def notebook(ids, mask):  # the notebook's hook: inputs[0] of layer L, then the whole forward goes on
        h = block.register_forward_hook(lambda mod, args, out: box.__setitem__("x", args[0]))
        try:
            model(ids, attention_mask=mask)
        finally:
            h.remove()
        return box["x"]

    def hidden_states(ids, mask):
        return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]

    def stop(mod, args, kwargs):
        box["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    def early_stop(ids, mask):  # the best PyTorch way: stop before layer L runs
        h = block.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model.model(ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            h.remove()
        return box["x"]

    return {"torch-hook": notebook, "torch-hidden-states": hidden_states, "torch-hook-raise": early_stop}, model


def run(
    preset: str, seqs: int, context: int, layer: int, dtype: str, rounds: int, peak: float | None = None
) -> list[dict]:
    from sae_jax import llama
    from sae_jax.data.activations import llama_harvest

    sizes = PRESETS[preset]
    folder = tempfile.mkdtemp(prefix="harvest-bench-")
    llama.write_tiny_checkpoint(folder, **sizes)
    ids = np.random.default_rng(0).integers(0, sizes["vocab_size"], (seqs, context)).astype(np.int32)
    mask = np.ones_like(ids)

    ours = llama_harvest(llama.load(folder, dtype=dtype), layer, "input")
    fns, outs = {}, {}
    fns["jax"] = lambda: outs.__setitem__("jax", jax.block_until_ready(ours(ids, mask)))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ways, model = torch_ways(folder, layer, dtype, device)
    t_ids, t_mask = torch.as_tensor(ids, dtype=torch.int64, device=device), torch.as_tensor(mask, device=device)

    def torch_fn(name, way):
        def fn():
            with torch.inference_mode():
                x = way(t_ids, t_mask)
                if device == "cuda":
                    torch.cuda.synchronize()
            outs[name] = x

        return fn

    for name, way in ways.items():
        fns[name] = torch_fn(name, way)
    gemms = gemm_fns(seqs * context, sizes["hidden_size"], sizes["intermediate_size"], dtype, device)
    times = interleaved({**fns, **gemms}, rounds, warmup=1)
    gemm_rate = {
        name: 2.0 * seqs * context * sizes["hidden_size"] * sizes["intermediate_size"] / median(times[name])
        for name in gemms
    }
    peak_rate = max(gemm_rate.values())
    ref = np.asarray(outs["jax"], np.float32)
    tokens = seqs * context
    rows = []
    for name in fns:
        t = median(times[name])
        got = ref if name == "jax" else outs[name].float().cpu().numpy()
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        flops = llama_forward_flops_per_token(sizes, layer, context) * tokens / t
        rows.append(
            dict(
                preset=preset,
                variant=name,
                S=seqs,
                T=context,
                layer=layer,
                dtype=dtype,
                s_per_batch=t,
                min_s=min(times[name]),
                tokens_per_s=tokens / t,
                rel_err_vs_jax=err,
                gflops=flops / 1e9,
                of_gemm_peak=flops / peak_rate,
                mfu=mfu(llama_forward_flops_per_token(sizes, layer, context), tokens / t, peak),
            )
        )
    best = min(r["s_per_batch"] for r in rows if r["variant"].startswith("torch"))
    for r in rows:
        r["vs_best_torch"] = best / r["s_per_batch"]
    best_torch_rate = max(r["gflops"] for r in rows if r["variant"].startswith("torch")) * 1e9
    # The most any way doing these FLOPs could gain over the best PyTorch way: running at the GEMM peak throughout.
    ceiling = dict(
        gemm_gflops={k: v / 1e9 for k, v in gemm_rate.items()}, max_vs_best_torch=peak_rate / best_torch_rate
    )
    del model
    return rows, ceiling


def gemm_fns(M: int, D: int, F: int, dtype: str, device: str) -> dict:
    """One MLP-shaped product [M, D] x [D, F] in each framework: the matrix unit's practical peak on this machine."""
    import jax.numpy as jnp

    a = jnp.ones((M, D), dtype)
    b = jnp.ones((D, F), dtype)
    f = jax.jit(
        lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    )  # as the model's products
    ta = torch.ones((M, D), dtype=getattr(torch, dtype), device=device)
    tb = torch.ones((D, F), dtype=getattr(torch, dtype), device=device)

    def torch_gemm():
        with torch.inference_mode():
            ta @ tb
            if device == "cuda":
                torch.cuda.synchronize()

    return {"gemm-jax": lambda: jax.block_until_ready(f(a, b)), "gemm-torch": torch_gemm}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mid", choices=list(PRESETS))
    p.add_argument("--seqs", type=int, default=8, help="S, sequences per forward")
    p.add_argument("--context", type=int, default=256, help="T, tokens per sequence")
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s, for an MFU column (H100 SXM bf16 dense: 989)",
    )
    add_malloc_flag(p)
    a = p.parse_args(argv)
    allocator = set_malloc(a.system_malloc)
    print(
        f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {allocator}", flush=True
    )
    rows, ceiling = run(a.preset, a.seqs, a.context, a.layer, a.dtype, a.rounds, a.peak_tflops)
    print(
        table(
            rows,
            [
                ("preset", "model", "s"),
                ("variant", "variant", "s"),
                ("S", "S", "d"),
                ("T", "T", "d"),
                ("s_per_batch", "s/batch", ".3f"),
                ("min_s", "min s", ".3f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("vs_best_torch", "x best torch", ".2f"),
                ("gflops", "GFLOP/s", ".0f"),
                ("of_gemm_peak", "of GEMM peak", ".0%"),
                ("rel_err_vs_jax", "max rel err", ".1e"),
            ]
            + ([("mfu", "MFU", ".1%")] if a.peak_tflops else []),
        )
    )
    ratio = next(r["vs_best_torch"] for r in rows if r["variant"] == "jax")
    print(
        "GEMM peak [S*T, D] x [D, F]: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ceiling["gemm_gflops"].items())
        + f"; a way at that peak throughout would be {ceiling['max_vs_best_torch']:.2f}x the best PyTorch way"
    )
    print(
        json_line(
            "harvest",
            machine=machine(),
            allocator=allocator,
            preset=a.preset,
            peak_tflops=a.peak_tflops,
            sizes=PRESETS[a.preset],
            jax_vs_best_torch=round(ratio, 3),
            ceiling={k: (round(v, 3) if isinstance(v, float) else v) for k, v in ceiling.items()},
            rows=[{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        )
    )


if __name__ == "__main__":
    main()
