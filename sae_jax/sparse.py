"""The sparse fast path of the SAE loss and its gradients: after the encoder, only active latents are touched.

TopK has exactly `k` active latents per token, and a trained ReLU SAE about L0
(63 of 32768 for the release). Only the encoder's forward product
`x @ W_enc` ([B, D] x [D, N]) must be dense. The rest works on the [B, K]
active pairs (latent index, pre-activation): decoding gathers K decoder rows
per token and W_dec's gradient is a scatter-add into those rows, both
O(B·K·D) instead of O(B·N·D). W_enc's gradient, by `encoder_grad`: "matmul",
the default, is one GEMM x^T @ dpre with the sparse dpre written out (every
cotangent of pre, main, AuxK and dense rows, summed into it first); "scatter"
adds x_b * g into the K active columns (O(B·K·D), beside dW_dec in the same
scatter, then one transpose into W_enc's [D, N] layout). On CPU XLA's scatter
and that transpose cost more than the GEMM they save (bench/sae_step.py).

ReLU is sparse by token: the `k_max` largest pre-activations of a token hold
all its positive ones whenever it has at most `k_max`. The few tokens above
that budget are `n_rows` static rows of the batch (the tokens with the most
active latents): taken from their own `ROW_BUDGET_FACTOR * k_max` largest
pre-activations while every token has at most that many active, through the
dense formulas otherwise; only when more than `n_rows` tokens exceed the
budget does the whole step run dense (`route`). Every path is exact: a fresh
ReLU SAE, with about N/2 active latents, simply runs dense.

BatchTopK (batchtopk, matryoshka) keeps the B*k largest positive
pre-activations of the whole batch, so a token's count varies as relu's does:
the same routing, on the kept code, with topk's AuxK beside it. Matryoshka's
prefix m decodes the active pairs with index < m.

Under `compute_dtype` bfloat16 every product takes bfloat16 inputs and
accumulates in float32, as the dense kernel's do (`loss.matmul`), so the two
kernels differ by the order of float32 sums only.

`sparse_value_and_grad` returns what `jax.value_and_grad(loss.sae_loss,
has_aux=True)` returns, up to float32 summation order.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.arch import batch_topk
from sae_jax.loss import LossParts, matmul, normalized_by_variance, squared_error
from sae_jax.sae import Forward, SAEParams, SAESpec
from sae_jax.sums import tree_sum

F32 = jnp.float32
# What the branches differentiate: SAEParams' arrays, W_enc as the encoder gradient's mode lays it out.
Wrt = tuple  # (W_enc [D, N] ("matmul") or W_enc^T [N, D] ("scatter"), b_enc [N], W_dec [N, D], b_dec [D])
# Budget of dense rows for relu's tokens above k_max, as a fraction of the batch (at least 1 row).
DENSE_ROWS_FRACTION = 1 / 16
# relu's rows over k_max go sparse too, from their ROW_BUDGET_FACTOR * k_max largest pre-activations, while every
# token has at most that many active: three [R, N] x [N, D] products (each a pass over W_dec) and W_dec's norms made
# 0.36 of 1.53 s of the release step (loaded 2-core CPU, bench/step_parts.py); densely only past that.
ROW_BUDGET_FACTOR = 4


def dense_rows(batch: int) -> int:
    """The static number of rows relu's sparse step handles densely for a batch of `batch` tokens."""
    return max(1, math.ceil(batch * DENSE_ROWS_FRACTION))


def _rounded(a: jax.Array, dtype) -> jax.Array:
    """a rounded to `dtype` and back to float32: a product of two such is exact in float32."""
    return a.astype(dtype).astype(F32)


def _materialised_T(x: jax.Array) -> jax.Array:
    """x: [B, D] -> x.T [D, B] written out row-major (a small copy), as `_transposed` writes its transpose.

    XLA:CPU otherwise reads x strided inside x^T @ dpre, whose GEMM then runs outside its XNNPACK path: at the
    release shape (B=256, D=2048, N=32768) 394-424 ms against 329-356 ms, the same bits (bench/step_parts.py).
    """
    return jax.lax.optimization_barrier(x.T.reshape(-1)).reshape(x.shape[::-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _active(x, W_enc, b_enc, W_dec, pre, idx, rows, xrows, xidx, encoder_grad, dtype, split):
    """x: [B, D], pre: [B, N] (= x @ W_enc + b_enc, computed once), idx: [B, K], rows: [R] or None (all B),
    xrows: [R'] tokens with their own active set xidx: [R', K'] (R' = 0: none; "matmul" only)

    -> (pre at idx [B, K], W_dec's rows at idx [B, K, D], pre's rows `rows` [R, N], pre at (xrows, xidx) [R', K'],
    W_dec's rows at xidx [R', K', D]).
    W_enc and b_enc enter only through their gradient; `pre` carries none. idx
    may repeat a latent within a token (main and AuxK sets): cotangents add.
    split: None, or s: the rows as two gathers, ([B, s, D], [B, K - s, D]) (main and AuxK sets), so that
    neither is a slice of one [B, K, D] gather (XLA:CPU copies such a slice: 0.54 GB for topk's AuxK rows).
    """
    dense = pre if rows is None else jnp.take(pre, rows, axis=0, mode="clip")
    # idx and rows come from top_k: always in range.
    take = lambda i: jnp.take(W_dec, i, axis=0, mode="clip")
    w_rows = take(idx) if split is None else (take(idx[:, :split]), take(idx[:, split:]))
    xvals = pre[xrows[:, None], xidx] if xidx.size else jnp.zeros(xidx.shape, F32)
    vals = jnp.take_along_axis(pre, idx, axis=-1, mode="clip")
    return vals, w_rows, dense, xvals, take(xidx)


def _active_fwd(x, W_enc, b_enc, W_dec, pre, idx, rows, xrows, xidx, encoder_grad, dtype, split):
    out = _active(x, W_enc, b_enc, W_dec, pre, idx, rows, xrows, xidx, encoder_grad, dtype, split)
    return out, (x, idx, rows, xrows, xidx, jax.ShapeDtypeStruct(W_dec.shape, W_dec.dtype))


def _active_bwd(encoder_grad, dtype, split, res, cot):
    """(g_vals [B, K], g_rows [B, K, D] (or `split`'s two), g_dense [R, N], g_xvals [R', K'], g_xrows [R', K', D])
    -> (None, dW_enc, db_enc [N], dW_dec [N, D], None x 5)."""
    x, idx, rows, xrows, xidx, w = res
    g_vals, g_rows, g_dense, g_xvals, g_xrows = cot
    (N, D), B, flat = w.shape, x.shape[0], idx.reshape(-1)
    # (indices, rows' cotangents) of each gather.
    sets = [(idx, g_rows)] if split is None else [(idx[:, :split], g_rows[0]), (idx[:, split:], g_rows[1])]
    db_enc = jnp.zeros((N,), F32).at[flat].add(g_vals.reshape(-1)) + tree_sum(g_dense, 0)
    if encoder_grad == "matmul":
        dpre = g_dense if rows is None else jnp.zeros((B, N), F32).at[rows].add(g_dense)
        dpre = dpre.at[jnp.arange(B)[:, None], idx].add(g_vals)
        dW_dec = jnp.zeros((N, D), F32)
        if xidx.size:
            db_enc = db_enc.at[xidx.reshape(-1)].add(g_xvals.reshape(-1))
            dpre = dpre.at[xrows[:, None], xidx].add(g_xvals)
            sets.append((xidx, g_xrows))
        dW_enc = jnp.matmul(_materialised_T(x.astype(dtype)), dpre.astype(dtype), preferred_element_type=F32)
        for i, g in sets:
            dW_dec = dW_dec.at[i.reshape(-1)].add(g.reshape(-1, D))
        return None, dW_enc, db_enc, dW_dec, None, None, None, None, None
    if xidx.size:
        raise ValueError("sparse._active: rows with their own active set take encoder_grad 'matmul' only")
    # One scatter of [2, D] windows: row n of dW_dec and of dW_enc^T side by side.
    xg = _rounded(g_vals, dtype)[..., None] * _rounded(x, dtype)[:, None, :]
    both, lo = jnp.zeros((N, 2, D), F32), 0
    for i, g in sets:
        part = jnp.stack([g, xg[:, lo : lo + i.shape[1]]], axis=2).reshape(-1, 2, D)
        both, lo = both.at[i.reshape(-1)].add(part), lo + i.shape[1]
    dW_encT = both[:, 1]
    if g_dense.shape[0]:
        x_rows = x if rows is None else jnp.take(x, rows, axis=0)
        dW_encT = dW_encT + jnp.matmul(g_dense.astype(dtype).T, x_rows.astype(dtype), preferred_element_type=F32)
    return None, dW_encT, db_enc, both[:, 0], None, None, None, None, None


_active.defvjp(_active_fwd, _active_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _decode(a: jax.Array, rows: jax.Array, dtype) -> jax.Array:
    """a: [B, K], rows: [B, K, D] -> sum_k a_k rows_k [B, D] float32, from `dtype` inputs (backward too)."""
    return jnp.einsum("bk,bkd->bd", a.astype(dtype), rows.astype(dtype), preferred_element_type=F32)


def _decode_fwd(a, rows, dtype):
    return _decode(a, rows, dtype), (a, rows)


def _decode_bwd(dtype, res, g):
    a, rows = res
    g = g.astype(dtype)
    da = jnp.einsum("bd,bkd->bk", g, rows.astype(dtype), preferred_element_type=F32)
    # An outer product, no sum: elementwise in float32 is exactly the product of the rounded inputs.
    return da, _rounded(a, dtype)[..., None] * g.astype(F32)[:, None, :]


_decode.defvjp(_decode_fwd, _decode_bwd)


def dense_codes(idx: jax.Array, a: jax.Array, n: int) -> jax.Array:
    """idx, a: [B, K] -> f: [B, N], zero outside idx."""
    return jnp.put_along_axis(jnp.zeros((a.shape[0], n), a.dtype), idx, a, axis=-1, inplace=False)


def active_counts(codes: jax.Array) -> jax.Array:
    """codes: [B, N] -> [B] int32, each token's count of codes > 0 (`sums.tree_sum`)."""
    return tree_sum((codes > 0).astype(jnp.int32), -1)


def route(pre: jax.Array, k_max: int, n_rows: int) -> tuple[jax.Array, jax.Array]:
    """pre: [B, N] -> (path [] int32, over [] int32) of the per-token sparse step; over: tokens with > k_max active.

    A latent is active where pre > 0: relu's pre-activations, or batchtopk's kept code f.

    path 0: every token sparse; 1: the `n_rows` fullest tokens dense, the rest
    sparse (0 < over <= n_rows); 2: the whole batch dense.
    """
    over = jnp.sum(active_counts(pre) > k_max).astype(jnp.int32)
    return jnp.where(over == 0, 0, jnp.where(over <= n_rows, 1, 2)).astype(jnp.int32), over


def _paths(codes: jax.Array, k_max: int, n_rows: int, loss) -> list:
    """`route`'s three paths as thunks of loss(idx [B, K], rows [R] or None): every token from its k_max largest
    codes; the same with the `n_rows` fullest tokens dense; the whole batch dense.

    codes: [B, N], active where > 0 (relu's pre, BatchTopK's kept code); an index past a token's active ones
    carries a zero code, which each loss leaves out.
    """
    idx = lambda: jax.lax.top_k(codes, k_max)[1]
    return [
        lambda: loss(idx(), jnp.zeros((0,), jnp.int32)),
        lambda: loss(idx(), jax.lax.top_k(active_counts(codes), n_rows)[1]),
        lambda: loss(jnp.zeros((codes.shape[0], 0), jnp.int32), None),
    ]


def sparse_token_fraction(path: jax.Array, batch: int, n_rows: int) -> jax.Array:
    """[] float32: the fraction of the batch's tokens relu's `path` handled sparsely."""
    return jnp.array([1.0, 1.0 - n_rows / batch, 0.0], F32)[path]


_NO_EXTRA = (np.zeros((0,), np.int32), np.zeros((0, 0), np.int32))  # `_active`'s xrows, xidx: none


def _relu_loss(wrt: Wrt, x, pre, idx, rows, extra=None, *, l1_coefficient, dtype, encoder_grad):
    """relu's loss: tokens `rows` ([R], None for all) densely, the others from their active set idx [B, K].

    extra: None, or (xrows [R'], xidx [R', K']): tokens xrows from their own active set xidx instead of idx.
    """
    W_enc, b_enc, W_dec, b_dec = wrt
    B, N = pre.shape
    xrows, xidx = extra if extra is not None else _NO_EXTRA
    vals, w_rows, pre_d, xvals, xw_rows = _active(
        x, W_enc, b_enc, W_dec, pre, idx, rows, xrows, xidx, encoder_grad, dtype, None
    )
    sparse_tok = jnp.ones((B,), bool)
    for r in (rows, xrows):
        if r is not None and r.shape[0]:
            sparse_tok = sparse_tok.at[r].set(False)
    a = jnp.where(sparse_tok[:, None], jax.nn.relu(vals), 0.0)
    x_hat = _decode(a, w_rows, dtype)
    norms = lambda w: jnp.sqrt(jnp.sum(jnp.square(w.astype(F32)), axis=-1))
    # sum_i f_i |W_dec,i| over the active set only: f is zero elsewhere (and on the dense rows).
    penalty = jnp.sum(a * norms(w_rows))
    f = dense_codes(idx, a, N)
    if xidx.size:
        ax = jax.nn.relu(xvals)
        x_hat = x_hat.at[xrows].add(_decode(ax, xw_rows, dtype))
        penalty = penalty + jnp.sum(ax * norms(xw_rows))
        f = f.at[xrows[:, None], xidx].set(ax)
    if pre_d.shape[0]:
        f_d = jax.nn.relu(pre_d)
        dec_d = matmul(f_d, W_dec, dtype)
        # The dense rows' penalty summed over them, batch first as `loss.weighted_l1` does.
        penalty = penalty + jnp.sum(tree_sum(f_d, 0) * jnp.linalg.norm(W_dec.astype(F32), axis=1))
        if rows is None:
            x_hat, f = dec_d, f_d
        else:
            x_hat, f = x_hat.at[rows].add(dec_d), f.at[rows].set(f_d)
    x_hat = x_hat + b_dec.astype(F32)
    recon, sparsity = squared_error(x, x_hat), penalty / B
    parts = LossParts(recon + l1_coefficient * sparsity, recon, sparsity, jnp.zeros((), F32))
    return parts.loss, (Forward(x_hat, f, pre), parts)


def _with_aux(wrt: Wrt, x, pre, idx, rows, aux, encoder_grad, dtype):
    """`_active` over the main set idx [B, K] and AuxK's aux[1] [B, k_aux] (aux None: the main set only), one
    call so W_enc's gradient is one product over their summed cotangents.

    -> (vals [B, K (+ k_aux)], main rows [B, K, D], AuxK rows [B, k_aux, D] or None, pre's rows `rows` [R, N]).
    """
    W_enc, b_enc, W_dec, _ = wrt
    if aux is None:
        vals, w_rows, pre_d, _, _ = _active(
            x, W_enc, b_enc, W_dec, pre, idx, rows, *_NO_EXTRA, encoder_grad, dtype, None
        )
        return vals, w_rows, None, pre_d
    both = jnp.concatenate([idx, aux[1]], axis=-1)
    vals, (main, aux_rows), pre_d, _, _ = _active(
        x, W_enc, b_enc, W_dec, pre, both, rows, *_NO_EXTRA, encoder_grad, dtype, idx.shape[1]
    )
    return vals, main, aux_rows, pre_d


def _topk_loss(wrt: Wrt, x, pre, idx, aux, *, auxk_coefficient, dtype, encoder_grad):
    """topk's loss from its active set idx [B, k]; aux: None, or AuxK's (top values, idx) [B, k_aux] among dead latents.

    Both sets through `_with_aux`: W_enc's gradient is one product over their summed cotangents.
    """
    b_dec, k = wrt[3], idx.shape[1]
    vals, main_rows, aux_rows, _ = _with_aux(wrt, x, pre, idx, jnp.zeros((0,), jnp.int32), aux, encoder_grad, dtype)
    a = jax.nn.relu(vals[:, :k])
    x_hat = _decode(a, main_rows, dtype) + b_dec.astype(F32)
    recon, aux_err = squared_error(x, x_hat), jnp.zeros((), F32)
    if aux is not None:
        # `loss.auxk_error` over the k_aux largest dead pre-activations only: O(B·k_aux·D).
        v = jnp.where(jnp.isfinite(aux[0]), jax.nn.relu(vals[:, k:]), 0.0)
        aux_err = squared_error(jax.lax.stop_gradient(x - x_hat), _decode(v, aux_rows, dtype))
    parts = LossParts(recon + auxk_coefficient * aux_err, recon, jnp.zeros((), F32), aux_err)
    return parts.loss, (Forward(x_hat, dense_codes(idx, a, pre.shape[-1]), pre), parts)


def _batchtopk_loss(
    wrt: Wrt, x, pre, f, idx, rows, aux, *, prefixes, auxk_coefficient, auxk_normalize, dtype, encoder_grad
):
    """batchtopk's (and matryoshka's) loss: tokens `rows` ([R], None for all) densely, the others from idx [B, K].

    f: [B, N] the BatchTopK code (`arch.batch_topk` of pre, no gradient): kept where f > 0. idx holds every kept
    latent of a sparse token. aux: as `_topk_loss`'s. prefixes: the nested sizes ending at N; the loss sums each
    prefix's reconstruction error (batchtopk: (N,)), group [lo, hi) decoded once from `lo <= idx < hi`.
    """
    W_dec, b_dec = wrt[2], wrt[3]
    (B, N), K = pre.shape, idx.shape[1]
    vals, main_rows, aux_rows, pre_d = _with_aux(wrt, x, pre, idx, rows, aux, encoder_grad, dtype)
    sparse_tok = jnp.ones((B,), bool)
    if rows is not None and rows.shape[0]:
        sparse_tok = sparse_tok.at[rows].set(False)
    kept = sparse_tok[:, None] & (jnp.take_along_axis(f, idx, axis=-1, mode="clip") > 0)
    a = jnp.where(kept, jax.nn.relu(vals[:, :K]), 0.0)
    if pre_d.shape[0]:
        f_rows = f if rows is None else jnp.take(f, rows, axis=0, mode="clip")
        f_d = jnp.where(f_rows > 0, jax.nn.relu(pre_d), 0.0)
    x_hat, recon, lo = b_dec.astype(F32), jnp.zeros((), F32), 0
    for hi in prefixes:
        group = a if (lo, hi) == (0, N) else jnp.where((idx >= lo) & (idx < hi), a, 0.0)
        part = _decode(group, main_rows, dtype)
        if pre_d.shape[0]:
            dec_d = matmul(f_d[:, lo:hi], W_dec[lo:hi], dtype)
            part = dec_d if rows is None else part.at[rows].add(dec_d)
        x_hat, lo = x_hat + part, hi
        recon = recon + squared_error(x, x_hat)
    aux_err = jnp.zeros((), F32)
    if aux is not None:
        residual = jax.lax.stop_gradient(x - x_hat)
        v = jnp.where(jnp.isfinite(aux[0]), jax.nn.relu(vals[:, K:]), 0.0)
        aux_err = squared_error(residual, _decode(v, aux_rows, dtype))
        if auxk_normalize:
            aux_err = normalized_by_variance(aux_err, residual)
    parts = LossParts(recon + auxk_coefficient * aux_err, squared_error(x, x_hat), jnp.zeros((), F32), aux_err)
    return parts.loss, (Forward(x_hat, f, pre), parts)


def _transposed(a: jax.Array) -> jax.Array:
    """a: [N, D] -> a.T [D, N], materialised row-major once.

    Left to itself XLA makes the transpose a layout change and reads the
    gradient strided in each optimizer pass (and, behind a cond, converts it
    twice). A 1-D array has one layout only, and the barrier keeps XLA from
    folding the reshapes away.
    """
    return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(a.shape[::-1])


def sparse_value_and_grad(
    params: SAEParams,
    spec: SAESpec,
    x: jax.Array,
    *,
    l1_coefficient: jax.Array | float,
    dead: jax.Array,
    auxk_k: int,
    auxk_coefficient: float,
    k_max: int = 128,
    compute_dtype: str = "float32",
    encoder_grad: str = "matmul",
    recipe: str | None = None,
    k: int | None = None,
    prefixes: tuple[int, ...] = (),
    auxk_normalize: bool = False,
) -> tuple[tuple[jax.Array, tuple[Forward, LossParts]], SAEParams]:
    """x: [B, D] scaled -> ((loss, (forward, parts)), grads), the values of differentiating `loss.sae_loss`.

    One `lax.switch` picks between whole differentiated computations (a cond
    inside the differentiated function would make each branch carry the
    other's residuals). relu: `route`'s three paths. topk: without AuxK while
    no latent is dead, with it otherwise. `encoder_grad`: "scatter" or "matmul".
    recipe "batchtopk" or "matryoshka" (`sae_jax.arch`; spec.apply_b_dec_to_input false): the values of
    differentiating that recipe's loss, with BatchTopK's k, matryoshka's `prefixes` (batchtopk: none) and
    `auxk_normalize`; `route`'s three paths on the kept code, each without or with AuxK. A params.threshold
    gets a zero gradient, as the recipe's loss never reads it.
    """
    dtype = jnp.dtype(compute_dtype)
    x = x.astype(F32)
    pre = jax.lax.stop_gradient(matmul(x, params.W_enc, dtype) + params.b_enc.astype(F32))
    scatter = encoder_grad == "scatter"
    # W_enc.T is never computed: the sparse loss reads W_enc only through `pre`.
    wrt = (params.W_enc.T if scatter else params.W_enc, params.b_enc, params.W_dec, params.b_dec)

    no_threshold = None if params.threshold is None else jnp.zeros_like(params.threshold)

    def run(loss_fn):
        out, (dW_enc, db_enc, dW_dec, db_dec) = jax.value_and_grad(loss_fn, has_aux=True)(wrt)
        return out, SAEParams(_transposed(dW_enc) if scatter else dW_enc, db_enc, dW_dec, db_dec, no_threshold)

    common = dict(dtype=dtype, encoder_grad=encoder_grad)
    B, N = pre.shape
    k_max, n_rows = min(k_max, N), dense_rows(B)
    dead_top = lambda: jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), min(auxk_k, N))  # AuxK's (values, idx)
    if recipe in ("batchtopk", "matryoshka"):
        f = batch_topk(pre, k)
        kw = dict(prefixes=tuple(prefixes) or (N,), auxk_coefficient=auxk_coefficient, auxk_normalize=auxk_normalize)
        loss = lambda idx, rows, aux: run(lambda w: _batchtopk_loss(w, x, pre, f, idx, rows, aux, **kw, **common))
        branches = _paths(f, k_max, n_rows, lambda idx, rows: loss(idx, rows, None)) + _paths(
            f, k_max, n_rows, lambda idx, rows: loss(idx, rows, dead_top())
        )
        return jax.lax.switch(route(f, k_max, n_rows)[0] + 3 * jnp.any(dead).astype(jnp.int32), branches)
    if recipe not in (None, spec.architecture):
        raise ValueError(f"recipe: the sparse kernel expected batchtopk or matryoshka, found {recipe!r}")
    if spec.architecture == "topk":
        idx = jax.lax.top_k(pre, spec.k)[1]

        def topk(with_auxk):
            aux = dead_top() if with_auxk else None
            return run(lambda w: _topk_loss(w, x, pre, idx, aux, auxk_coefficient=auxk_coefficient, **common))

        return jax.lax.cond(jnp.any(dead), lambda: topk(True), lambda: topk(False))
    if spec.architecture != "relu":
        raise ValueError(f"sae.architecture: the sparse kernel expected relu or topk, found {spec.architecture!r}")
    relu = lambda idx, rows, extra=None: run(
        lambda w: _relu_loss(w, x, pre, idx, rows, extra, l1_coefficient=l1_coefficient, **common)
    )
    paths, path = _paths(pre, k_max, n_rows, relu), route(pre, k_max, n_rows)[0]
    k_rows = min(ROW_BUDGET_FACTOR * k_max, N)
    if scatter or k_rows <= k_max:
        return jax.lax.switch(path, paths)

    def rows_sparse():
        """Path 1 with the fullest tokens from their own k_rows largest pre-activations."""
        rows = jax.lax.top_k(active_counts(pre), n_rows)[1]
        idx = jax.lax.top_k(pre, k_max)[1]
        return relu(idx, jnp.zeros((0,), jnp.int32), (rows, jax.lax.top_k(pre[rows], k_rows)[1]))

    fits = jnp.max(active_counts(pre)) <= k_rows
    return jax.lax.switch(jnp.where((path == 1) & fits, 3, path), paths + [rows_sparse])
