"""The SAE itself: a static spec, a pytree of params, and pure encode/decode.

Shapes: `D` model width, `N` latents, `K` active latents (topk). Params follow
the math, not `torch.nn.Linear`: `W_enc [D, N]`, `W_dec [N, D]`.

The release (`qresearch/Llama-3.2-1B-Instruct-SAE-l9`) is the `relu`
architecture exactly: `f = relu(x @ W_enc + b_enc)`, `x_hat = f @ W_dec + b_dec`,
with no decoder bias subtracted from the input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from sae_jax.sums import add_bias

# How an SAE encodes at inference. Training recipes (config `sae.architecture`) map onto these:
# batchtopk and matryoshka are exported as jumprelu with their learned threshold.
Architecture = Literal["relu", "topk", "jumprelu"]
Site = Literal["input", "output"]
ARCHITECTURES = ("relu", "topk", "jumprelu")
SITES = ("input", "output")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """Everything about an SAE that is not a weight. Hashable, so jit-static."""

    architecture: Architecture
    d_in: int  # D, the model's hidden size
    n_latents: int  # N
    k: int | None = None  # active latents, topk only
    hook_layer: int = 9  # decoder layer whose residual the SAE reads
    hook_site: Site = "input"  # "input": entering the layer (the notebook's hook)
    dtype: str = "float32"  # storage dtype of the params
    input_scale: float = 1.0  # raw activations are multiplied by this before encoding
    source: str = ""  # where the weights came from (a path, a run directory)
    apply_b_dec_to_input: bool = False  # pre-encoder bias: encode x - b_dec (SAELens's flag; false for the release)
    # A JSON object (text, so the spec stays hashable): what the SAE was trained on (model_name, hook_name,
    # context_size, dataset_path, prepend_bos, sae_lens_version...), carried from format to format.
    metadata: str = ""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {ARCHITECTURES}, found {self.architecture!r}")
        if self.d_in <= 0 or self.n_latents <= 0:
            raise ValueError(f"d_in, n_latents: expected positive, found {self.d_in}, {self.n_latents}")
        if self.architecture == "topk":
            if self.k is None or not 0 < self.k <= self.n_latents:
                raise ValueError(f"k: expected 1 <= k <= n_latents={self.n_latents}, found {self.k}")
        if self.hook_site not in SITES:
            raise ValueError(f"hook_site: expected one of {SITES}, found {self.hook_site!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, found {self.dtype!r}")
        if not (self.input_scale > 0 and math.isfinite(self.input_scale)):
            raise ValueError(f"input_scale: expected a finite positive number, found {self.input_scale}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The one description of every param's shape."""
        D, N = self.d_in, self.n_latents
        shapes = {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
        return {**shapes, "threshold": (N,)} if self.architecture == "jumprelu" else shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SAEParams:
    W_enc: jax.Array  # [D, N]
    b_enc: jax.Array  # [N]
    W_dec: jax.Array  # [N, D]
    b_dec: jax.Array  # [D]
    threshold: jax.Array | None = None  # [N] jumprelu only: a latent fires where pre > threshold


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SAE:
    """Params plus their spec; the spec rides through jit as static metadata."""

    params: SAEParams
    spec: SAESpec = dataclasses.field(metadata=dict(static=True))


class Forward(NamedTuple):
    """(x_hat, f, pre): reconstruction [.., D], codes [.., N], pre-activations [.., N]; a pytree, as any NamedTuple."""

    x_hat: jax.Array
    f: jax.Array
    pre: jax.Array


def init_params(key: jax.Array, spec: SAESpec, dec_norm: float = 0.1) -> SAEParams:
    """April-2024 init: decoder rows random directions of norm `dec_norm`, encoder their transpose, zero biases."""
    D, N = spec.d_in, spec.n_latents
    W_dec = jax.random.normal(key, (N, D), jnp.float32)
    W_dec = dec_norm * W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True)
    return SAEParams(
        W_enc=W_dec.T,
        b_enc=jnp.zeros((N,), jnp.float32),
        W_dec=W_dec,
        b_dec=jnp.zeros((D,), jnp.float32),
    )


def pre_activations(params: SAEParams, spec: SAESpec, x: jax.Array) -> jax.Array:
    """x: [..., D] raw activations -> [..., N] encoder pre-activations, float32."""
    x = x.astype(jnp.float32) * spec.input_scale
    if spec.apply_b_dec_to_input:
        x = x - params.b_dec.astype(jnp.float32)
    return add_bias(x @ params.W_enc.astype(jnp.float32), params.b_enc.astype(jnp.float32))


def activate(spec: SAESpec, pre: jax.Array, threshold: jax.Array | None = None) -> jax.Array:
    """pre: [..., N] -> f: [..., N]. relu; relu of the k largest (ties by index); jumprelu: pre > threshold [N]."""
    if spec.architecture == "relu":
        return jax.nn.relu(pre)
    if spec.architecture == "jumprelu":
        return jnp.where(pre > threshold.astype(jnp.float32), pre, 0.0)
    return topk_code(pre, spec.k)


def topk_code(pre: jax.Array, k: int) -> jax.Array:
    """pre: [..., N] -> f: [..., N], each row's k largest, ReLU'd, kept (ties by index), the rest 0."""
    vals, idx = jax.lax.top_k(pre, k)
    return jnp.put_along_axis(jnp.zeros_like(pre), idx, jax.nn.relu(vals), axis=-1, inplace=False)


def decode_params(params: SAEParams, spec: SAESpec, f: jax.Array) -> jax.Array:
    """f: [..., N] -> x_hat: [..., D] in raw activation units, float32."""
    x_hat = add_bias(f.astype(jnp.float32) @ params.W_dec.astype(jnp.float32), params.b_dec.astype(jnp.float32))
    return x_hat / spec.input_scale


def forward_params(params: SAEParams, spec: SAESpec, x: jax.Array) -> Forward:
    pre = pre_activations(params, spec, x)
    f = activate(spec, pre, params.threshold)
    return Forward(decode_params(params, spec, f), f, pre)


def encode(sae: SAE, x: jax.Array) -> jax.Array:
    """x: [..., D] -> f: [..., N] (float32)."""
    return activate(sae.spec, pre_activations(sae.params, sae.spec, x), sae.params.threshold)


def decode(sae: SAE, f: jax.Array) -> jax.Array:
    """f: [..., N] -> x_hat: [..., D] (float32)."""
    return decode_params(sae.params, sae.spec, f)


def forward(sae: SAE, x: jax.Array) -> Forward:
    """x: [..., D] -> Forward(x_hat [..., D], f [..., N], pre [..., N])."""
    return forward_params(sae.params, sae.spec, x)


def fold_input_scale(sae: SAE) -> SAE:
    """The same function of raw activations with `input_scale` folded into the weights (scale 1).

    Each weight is computed once: a param already in float32 or in its stored dtype is not copied to get there
    (numpy's `astype` copies unless told not to), so the fold of a release-size SAE holds one new copy of it.
    """
    c = sae.spec.input_scale
    p = sae.params
    dt = jnp.dtype(sae.spec.dtype)
    f32 = lambda a: a.astype(jnp.float32, copy=False)
    out = lambda a: a.astype(dt, copy=False)
    folded = SAEParams(
        W_enc=out(f32(p.W_enc) * c),
        b_enc=out(p.b_enc),
        W_dec=out(f32(p.W_dec) / c),
        b_dec=out(f32(p.b_dec) / c),
        # Pre-activations are unchanged by the fold (the scale moves into W_enc), so the threshold is too.
        threshold=None if p.threshold is None else out(p.threshold),
    )
    return SAE(folded, dataclasses.replace(sae.spec, input_scale=1.0))


def cast(sae: SAE, dtype) -> SAE:
    """Store the params in `dtype` (one of DTYPES, as a string, numpy or JAX dtype)."""
    dtype = jnp.dtype(dtype).name
    spec = dataclasses.replace(sae.spec, dtype=dtype)
    return SAE(jax.tree.map(lambda a: a.astype(jnp.dtype(dtype)), sae.params), spec)


def explained_variance(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """The notebook's formula over all elements: 1 - mean((x_hat - x)^2) / var(x)."""
    x = x.astype(jnp.float32)
    return 1.0 - jnp.mean((x_hat.astype(jnp.float32) - x) ** 2) / jnp.var(x)
