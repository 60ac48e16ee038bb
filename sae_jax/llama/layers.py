"""The layers of Llama-3 in Flax NNX: RMSNorm, grouped-query attention with rope, SwiGLU, the decoder block.

Shapes: `B` batch, `T` query tokens, `S` key tokens (T without a cache, the
cache's slots with one), `D` width, `N` query heads, `KV` key/value heads,
`G = N // KV`, `H` head dim, `F` MLP width. Weights keep the checkpoint's
`[out, in]` layout and dtype; RMSNorm returns the compute dtype, attention and
the MLP compute in their input's (`_dot`). Queries
are grouped as [B, T, KV, G, H] so that each KV head is read once by its G
query heads, never repeated in memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sae_jax.llama import rope
from sae_jax.llama.config import LlamaConfig


def random_weight(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype) -> nnx.Param:
    """A fresh weight, N(0, 0.02) as transformers initialises Llama; zeros without `rngs` (`load`'s skeleton, whose
    weights the file's replace: tracing the random init under `nnx.eval_shape` cost 4 ms a weight)."""
    if rngs is None:
        return nnx.Param(jnp.zeros(shape, dtype))
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's keys and values over S slots; a forward of T tokens fills slots index..index+T-1."""

    k: jax.Array  # [B, S, KV, H], rotated keys
    v: jax.Array  # [B, S, KV, H]
    index: jax.Array  # [] int32: the slot of the first new token

    def write(self, k: jax.Array, v: jax.Array) -> LayerCache:
        """k, v: [B, T, KV, H] -> this cache with them in slots index..index+T-1."""
        put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), self.index, axis=1)
        return LayerCache(put(self.k, k), put(self.v, v), self.index)


class Attention(nnx.Module):
    """Grouped-query attention with rope, optionally over a KV cache."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype, rngs: nnx.Rngs | None):
        D, N, KV, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = random_weight(rngs, (N * H, D), param_dtype)  # query head n uses KV head n // G
        self.k = random_weight(rngs, (KV * H, D), param_dtype)
        self.v = random_weight(rngs, (KV * H, D), param_dtype)
        self.o = random_weight(rngs, (D, N * H), param_dtype)
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, D] -> ([B, T, D], cache); positions: [B, T] (rope angles); mask: [B|1, T, S] bool (True: attend).

        Without a cache the keys are x's own (S = T). With one, x's keys and
        values are written into it and the queries attend over all its S slots.
        """
        c = self.cfg
        D, KV, G, H = c.hidden_size, c.num_kv_heads, c.groups, c.head_dim
        q = _dot("btd,kghd->btkgh", x, self.q[...].reshape(KV, G, H, D))
        k = _dot("btd,khd->btkh", x, self.k[...].reshape(KV, H, D))
        v = _dot("btd,khd->btkh", x, self.v[...].reshape(KV, H, D))
        cos, sin = rope.cos_sin(c, positions)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        if cache is not None:
            cache = cache.write(k, v)
            k, v = cache.k, cache.v
        return _dot("btkgh,dkgh->btd", attend(q, k, v, mask), self.o[...].reshape(D, KV, G, H)), cache


class MLP(nnx.Module):
    """SwiGLU."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype, rngs: nnx.Rngs | None):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate = random_weight(rngs, (F, D), param_dtype)
        self.up = random_weight(rngs, (F, D), param_dtype)
        self.down = random_weight(rngs, (D, F), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """SwiGLU. x: [B, T, D] -> [B, T, D]."""
        g = _dot("btd,fd->btf", x, self.gate[...])
        u = _dot("btd,fd->btf", x, self.up[...])
        return _dot("btf,df->btd", jax.nn.silu(g) * u, self.down[...])


class Block(nnx.Module):
    """One decoder layer: pre-norm attention, then pre-norm MLP, each added to the residual."""

    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs | None):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: LayerCache | None = None
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [B, T, D] residual entering the layer -> ([B, T, D] residual leaving it, the cache with x's keys)."""
        a, cache = self.attn(self.attn_norm(x), positions, mask, cache)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache
