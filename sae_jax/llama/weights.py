"""The one table of Llama weights: every HF checkpoint key, the parameter it fills, its shape.

Shapes are in the checkpoint's own layout (`torch.nn.Linear`'s `[out, in]`), so
loading is a copy with no transposes; the model reshapes heads inside its
einsums. `Llama.__init__` builds exactly these parameters (a test checks it),
the loader asserts every tensor against this table, and `tiny.py` writes from it.
"""

from __future__ import annotations

import dataclasses

from sae_jax.llama.config import LlamaConfig

ParamPath = tuple  # (attribute | list index, ...) from the Llama module down to an nnx.Param


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: ParamPath  # where the parameter lives in `Llama`, e.g. ("layers", 3, "attn", "q")
    shape: tuple[int, ...]  # expected shape, derived from the config


def weight_table(cfg: LlamaConfig) -> dict[str, WeightSpec]:
    """HF key -> WeightSpec, for every tensor a checkpoint of `cfg` must hold, in file order."""
    D, F, V, H = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    N, KV = cfg.num_heads, cfg.num_kv_heads
    table = {"model.embed_tokens.weight": WeightSpec(("embed",), (V, D))}
    for i in range(cfg.num_layers):
        layer = {
            "input_layernorm.weight": (("attn_norm", "weight"), (D,)),
            "self_attn.q_proj.weight": (("attn", "q"), (N * H, D)),
            "self_attn.k_proj.weight": (("attn", "k"), (KV * H, D)),
            "self_attn.v_proj.weight": (("attn", "v"), (KV * H, D)),
            "self_attn.o_proj.weight": (("attn", "o"), (D, N * H)),
            "post_attention_layernorm.weight": (("mlp_norm", "weight"), (D,)),
            "mlp.gate_proj.weight": (("mlp", "gate"), (F, D)),
            "mlp.up_proj.weight": (("mlp", "up"), (F, D)),
            "mlp.down_proj.weight": (("mlp", "down"), (D, F)),
        }
        for name, (sub, shape) in layer.items():
            table[f"model.layers.{i}.{name}"] = WeightSpec(("layers", i, *sub), shape)
    table["model.norm.weight"] = WeightSpec(("norm", "weight"), (D,))
    if not cfg.tie_word_embeddings:  # tied: logits reuse model.embed_tokens.weight
        table["lm_head.weight"] = WeightSpec(("lm_head",), (V, D))
    return table
