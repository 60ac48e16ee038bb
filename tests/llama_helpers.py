"""Shared pieces of the Llama tests: tiny checkpoints and the transformers reference.

The reference is transformers' PyTorch `LlamaForCausalLM.from_pretrained` on
the same folder, upcast to float32, with eager attention (the plain matmul and
softmax, no fused kernel).
"""

from __future__ import annotations

import numpy as np

from sae_jax.llama import write_tiny_checkpoint

# Parity tolerance for float32 compute: max |ours - ref| / max |ref| over a tensor.
# Both sides compute in float32 (eps 1.2e-7) from identical bf16 weights; they
# differ only in summation order (XLA einsums vs torch matmuls) and in rope
# angle rounding. Over 12 layers that measures <= 4e-6; 1e-4 leaves a margin of
# ~25x while real errors are far above it (plain rope instead of llama3 scaling,
# or a dropped padding mask, miss by > 1e-2; tests check that they show).
TOL = 1e-4

PARITY = dict(vocab_size=512, init_std=0.2)  # small vocab keeps tests fast; std 0.2 peaks attention


def tiny(path, **kw):
    """A tiny 12-layer checkpoint for parity tests (layer 9 exists)."""
    return write_tiny_checkpoint(path, **{**PARITY, **kw})


def rel_err(ours, ref, keep=None) -> float:
    """max |ours - ref| / max |ref|, over the positions where `keep` [B, T] is true (all if None)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if keep is not None:
        ours, ref = ours[keep], ref[keep]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_reference(folder, input_ids, attention_mask=None, position_ids=None):
    """(hidden_states, last_layer_output, logits) from transformers, as float32 numpy.

    hidden_states[L] is the residual entering layer L; the last entry has the
    final norm applied, so the raw output of the last layer is captured with a
    forward hook instead.
    """
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    raw = {}
    model.model.layers[-1].register_forward_hook(lambda mod, args, out: raw.setdefault("out", out))
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
    with torch.no_grad():
        out = model(
            t(input_ids), attention_mask=t(attention_mask), position_ids=t(position_ids), output_hidden_states=True
        )
    last = raw["out"][0] if isinstance(raw["out"], tuple) else raw["out"]
    return [h.numpy() for h in out.hidden_states], last.numpy(), out.logits.numpy()


def token_batch(seed: int, B: int, T: int, vocab: int) -> np.ndarray:
    """[B, T] int32 random token ids."""
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)
