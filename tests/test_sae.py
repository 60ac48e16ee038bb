"""The SAE math against direct numpy evaluations of the formulas."""

import dataclasses

import jax
import numpy as np
import pytest

from sae_jax.sae import (
    SAE,
    SAEParams,
    SAESpec,
    decode,
    encode,
    explained_variance,
    fold_input_scale,
    forward,
    init_params,
)


def random_sae(arch="relu", D=16, N=64, k=None, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    p = SAEParams(
        W_enc=rng.standard_normal((D, N)).astype(np.float32) * 0.3,
        b_enc=rng.standard_normal(N).astype(np.float32) * 0.1,
        W_dec=rng.standard_normal((N, D)).astype(np.float32) * 0.3,
        b_dec=rng.standard_normal(D).astype(np.float32) * 0.1,
    )
    return SAE(p, SAESpec(arch, D, N, k=k, input_scale=scale))


def test_relu_forward_is_the_release_formula():
    sae = random_sae()
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    p = sae.params
    f_ref = np.maximum(x @ p.W_enc + p.b_enc, 0)
    x_hat_ref = f_ref @ p.W_dec + p.b_dec
    out = jax.jit(forward)(sae, x)
    np.testing.assert_allclose(out.f, f_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decode(sae, encode(sae, x)), x_hat_ref, rtol=1e-5, atol=1e-5)
    assert (f_ref > 0).any() and (f_ref == 0).any()  # both branches of the ReLU exercised


def test_topk_keeps_exactly_the_k_largest():
    sae = random_sae("topk", k=5)
    x = np.random.default_rng(2).standard_normal((7, 16)).astype(np.float32)
    p = sae.params
    pre = x @ p.W_enc + p.b_enc
    ref = np.zeros_like(pre)
    for b in range(7):
        top = np.argsort(-pre[b])[:5]
        ref[b, top] = np.maximum(pre[b, top], 0)
    f = np.asarray(encode(sae, x))
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-6)
    assert ((f > 0).sum(-1) <= 5).all()


def test_fold_input_scale_keeps_the_function_of_raw_activations():
    sae = random_sae(scale=3.7)
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    folded = fold_input_scale(sae)
    assert folded.spec.input_scale == 1.0
    a, b = forward(sae, x), forward(folded, x)
    np.testing.assert_allclose(a.f, b.f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.x_hat, b.x_hat, rtol=1e-5, atol=1e-5)


def test_init_is_april_recipe():
    spec = SAESpec("relu", 8, 32)
    p = init_params(jax.random.key(0), spec, dec_norm=0.1)
    np.testing.assert_allclose(np.linalg.norm(p.W_dec, axis=1), 0.1, rtol=1e-5)
    np.testing.assert_array_equal(p.W_enc, np.asarray(p.W_dec).T)
    assert not np.any(p.b_enc) and not np.any(p.b_dec)


def test_explained_variance_is_the_notebook_formula():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    x_hat = x + 0.5 * rng.standard_normal((10, 6)).astype(np.float32)
    ref = 1 - np.mean((x_hat - x) ** 2) / np.var(x)
    assert float(explained_variance(x, x_hat)) == pytest.approx(ref, rel=1e-5)
    assert float(explained_variance(x, x)) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="gated", d_in=4, n_latents=8), "architecture: expected one of"),
        (dict(architecture="topk", d_in=4, n_latents=8, k=9), "k: expected 1 <= k <= n_latents=8, found 9"),
        (dict(architecture="relu", d_in=4, n_latents=8, hook_site="middle"), "hook_site"),
        (dict(architecture="relu", d_in=4, n_latents=8, input_scale=float("nan")), "input_scale"),
    ],
)
def test_bad_spec_is_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        SAESpec(**kwargs)
    assert "\n" not in str(e.value)


def test_jumprelu_and_pre_encoder_bias_match_numpy_and_survive_the_scale_fold():
    sae = random_sae(D=16, N=64, scale=2.5)
    rng = np.random.default_rng(5)
    theta = np.abs(rng.standard_normal(64)).astype(np.float32) * 0.5
    spec = dataclasses.replace(sae.spec, architecture="jumprelu", apply_b_dec_to_input=True)
    sae = SAE(dataclasses.replace(sae.params, threshold=theta), spec)
    x = rng.standard_normal((9, 16)).astype(np.float32)
    p = sae.params
    pre = (x * 2.5 - p.b_dec) @ p.W_enc + p.b_enc
    f_ref = np.where(pre > theta, pre, 0.0)
    assert (f_ref > 0).any() and ((pre > 0) & (pre <= theta)).any()  # the threshold, not relu, decides
    out = forward(sae, x)
    np.testing.assert_allclose(out.f, f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.x_hat, (f_ref @ p.W_dec + p.b_dec) / 2.5, rtol=1e-5, atol=1e-5)
    folded = fold_input_scale(sae)
    np.testing.assert_allclose(forward(folded, x).x_hat, out.x_hat, rtol=1e-5, atol=1e-5)
    # A jumprelu SAE without its threshold is refused before anything is written (formats.common.check_sae).
    from sae_jax.formats.common import check_sae

    with pytest.raises(ValueError, match=r"^sae: threshold: expected keys .*threshold.*, found no 'threshold'"):
        check_sae(SAE(dataclasses.replace(p, threshold=None), spec), "sae")
