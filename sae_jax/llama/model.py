"""Llama-3 in Flax NNX: RMSNorm, grouped-query attention with rope, SwiGLU, tied logits.

Shapes: `B` batch, `T` query tokens, `S` key tokens (T without a cache), `D`
width, `N` query heads, `KV` key/value heads, `G = N // KV`, `H` head dim, `F`
MLP width, `V` vocab, `L` layers. Weights keep the checkpoint's `[out, in]`
layout and dtype; each forward casts them to the compute dtype. Queries are
grouped as [B, T, KV, G, H] so that each KV head is read once by its G query
heads, never repeated in memory.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from sae_jax.llama import rope
from sae_jax.llama.config import LlamaConfig

COMPUTE_DTYPES = ("float32", "bfloat16")
SITES = ("input", "output")


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> nnx.Param:
    """A fresh weight, N(0, 0.02) as transformers initialises Llama; `load` overwrites it."""
    return nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))  # [D]
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D]; statistics in float32, as transformers does."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.weight[...].astype(self.dtype)


def _dot(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) accumulated in float32, returned in x's dtype.

    For bfloat16 this is also the fast path of XLA:CPU's dot (2.3x a bf16-out
    product on AVX512-BF16); GPUs accumulate in float32 either way.
    """
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention, grouped: q [B, T, KV, G, H], k, v [B, S, KV, H], mask [B|1, T, S] bool -> [B, T, KV, G, H].

    `jax.nn.dot_product_attention` (XLA): scores and softmax in float32 whatever
    the compute dtype, as transformers does; each KV head is read by its G
    query heads without being repeated; a fully masked (pad) row stays finite.
    """
    B, T, KV, G, H = q.shape
    out = jax.nn.dot_product_attention(q.reshape(B, T, KV * G, H), k, v, mask=mask[:, None])
    return out.reshape(B, T, KV, G, H)


class Attention(nnx.Module):
    """Grouped-query attention; computes in its input's dtype (`_dot`)."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        D, N, KV, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = _normal(rngs, (N * H, D), param_dtype)  # query head n uses KV head n // G
        self.k = _normal(rngs, (KV * H, D), param_dtype)
        self.v = _normal(rngs, (KV * H, D), param_dtype)
        self.o = _normal(rngs, (D, N * H), param_dtype)
        self.cfg = cfg

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, T, D], positions: [B, T] (rope angles), mask: [B|1, T, T] bool (True: may attend) -> [B, T, D].

        Positions come in explicitly so that a KV cache can later pass keys from
        earlier steps with their own positions.
        """
        q, k, v = self.qkv(x, positions)
        return self.out(attend(q, k, v, mask))

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, T, D], positions: [B, T] -> q [B, T, KV, G, H] and k [B, T, KV, H] rotated, v [B, T, KV, H]."""
        c = self.cfg
        D, KV, G, H = c.hidden_size, c.num_kv_heads, c.groups, c.head_dim
        q = _dot("btd,kghd->btkgh", x, self.q[...].reshape(KV, G, H, D))
        k = _dot("btd,khd->btkh", x, self.k[...].reshape(KV, H, D))
        v = _dot("btd,khd->btkh", x, self.v[...].reshape(KV, H, D))
        cos, sin = rope.cos_sin(c, positions)
        return rope.apply(q, cos, sin), rope.apply(k, cos, sin), v

    def out(self, o: jax.Array) -> jax.Array:
        """o: [B, T, KV, G, H] attended values -> [B, T, D]."""
        c = self.cfg
        return _dot("btkgh,dkgh->btd", o, self.o[...].reshape(c.hidden_size, c.num_kv_heads, c.groups, c.head_dim))


class MLP(nnx.Module):
    """SwiGLU; computes in its input's dtype (`_dot`)."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate = _normal(rngs, (F, D), param_dtype)
        self.up = _normal(rngs, (F, D), param_dtype)
        self.down = _normal(rngs, (D, F), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """SwiGLU. x: [B, T, D] -> [B, T, D]."""
        g = _dot("btd,fd->btf", x, self.gate[...])
        u = _dot("btd,fd->btf", x, self.up[...])
        return _dot("btf,df->btd", jax.nn.silu(g) * u, self.down[...])


class Block(nnx.Module):
    """One decoder layer: pre-norm attention, then pre-norm MLP, each added to the residual."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, T, D] residual entering the layer -> [B, T, D] residual leaving it."""
        x = x + self.attn(self.attn_norm(x), positions, mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """The decoder. `load` builds one from a HF folder; the constructor gives random weights."""

    def __init__(self, cfg: LlamaConfig, *, dtype: str = "float32", param_dtype: str = "bfloat16", rngs: nnx.Rngs):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype: expected one of {COMPUTE_DTYPES}, found {dtype!r}")
        dt, pdt = jnp.dtype(dtype), jnp.dtype(param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt)
        self.config = cfg
        self.dtype = dt  # compute dtype; weights stay in their own dtype
        self.embed = _normal(rngs, (cfg.vocab_size, cfg.hidden_size), pdt)  # [V, D]
        self.layers = nnx.List([Block(cfg, **kw, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else _normal(rngs, (cfg.vocab_size, cfg.hidden_size), pdt)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, T] int -> [B, T, D], the residual entering layer 0."""
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)

    def unembed(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] final-normed -> logits [B, T, V] float32; tied to the embedding when configured."""
        w = self.embed if self.lm_head is None else self.lm_head
        return jnp.einsum("btd,vd->btv", x, w[...].astype(self.dtype), preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, *, num_layers: int | None = None) -> jax.Array:
        """input_ids: [B, T] -> [B, T, D], the residual after the first `num_layers` layers (all when None).

        Layers past `num_layers` are never called, so they cost nothing.
        """
        positions, mask = positions_and_mask(input_ids, attention_mask, positions)
        x = self.embed_tokens(input_ids)
        for block in self.layers[: self.config.num_layers if num_layers is None else num_layers]:
            x = block(x, positions, mask)
        return x


def positions_and_mask(input_ids: jax.Array, attention_mask=None, positions=None) -> tuple[jax.Array, jax.Array]:
    """(positions [B, T], mask [B|1, T, T] bool) for a forward without a cache.

    The causal mask is built for the T tokens at hand only. `attention_mask`
    [B, T] (1 real, 0 pad; left or right padding) hides pad keys. Default
    positions are 0..T-1 in every row, pads included, exactly as transformers 5's
    LlamaModel numbers them when given an attention_mask and no position_ids.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [B, T], found {list(input_ids.shape)}")
    B, T = input_ids.shape
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask: expected shape {[B, T]}, found {list(attention_mask.shape)}")
        mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, :]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    elif tuple(positions.shape) != (B, T):
        raise ValueError(f"positions: expected shape {[B, T]}, found {list(positions.shape)}")
    return jnp.asarray(positions), mask


def layers_needed(cfg: LlamaConfig, layer: int, site: str) -> int:
    """How many layers to run to read the residual at (layer, site); a bad request is a one-line ValueError."""
    if site not in SITES:
        raise ValueError(f"site: expected one of {SITES}, found {site!r}")
    if not (isinstance(layer, numbers.Integral) and 0 <= layer < cfg.num_layers):
        raise ValueError(f"layer: expected 0 <= layer <= {cfg.num_layers - 1} (the model has {cfg.num_layers} layers), found {layer!r}")
    return int(layer) if site == "input" else int(layer) + 1


def residual(model: Llama, input_ids, layer: int, site: str = "input", attention_mask=None, positions=None) -> jax.Array:
    """The residual stream at decoder layer `layer`: [B, T, D] in the compute dtype.

    site "input": entering the layer (transformers' hidden_states[layer]; runs
    layers 0..layer-1). site "output": leaving it, before any final norm (runs
    layers 0..layer). input_ids: [B, T] int; attention_mask: [B, T] of 0/1;
    positions: [B, T], default 0..T-1. Under jit, pass layer and site as static.
    """
    return model(input_ids, attention_mask, positions, num_layers=layers_needed(model.config, layer, site))


def logits(model: Llama, input_ids, attention_mask=None, positions=None) -> jax.Array:
    """Next-token logits [B, T, V] float32 after all layers and the final norm."""
    return model.unembed(model.norm(model(input_ids, attention_mask, positions)))
