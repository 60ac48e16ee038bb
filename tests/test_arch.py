"""The training recipes (sae_jax/arch): forwards against numpy, gradients against jax.grad of plain references.

Tolerances: float32 throughout; the recipes and the references sum in different orders, so values agree
to rtol 1e-5 and gradients to rtol 1e-4 / atol 1e-6 (a few ulps of float32 on sums of ~100 terms).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import arch
from sae_jax.arch import batchtopk, matryoshka
from sae_jax.config import ConfigError, load_config
from sae_jax.sae import SAE, forward_params
from sae_jax.trainer import init_state, spec_from_config

B, D, N, K = 16, 8, 32, 3


def config(name, *extra):
    sets = [
        f"sae.architecture={name}",
        f"sae.d_in={D}",
        "sae.expansion=4",
        "train.steps=100",
        "train.lr_warmup_steps=10",
        "train.auxk_k=4",
    ]
    sets += [f"sae.k={K}"] if name in ("topk", "batchtopk", "matryoshka") else []
    return load_config(None, sets + list(extra))


def setup(name, *extra, seed=0):
    """(cfg, spec, params with random biases and threshold, x [B, D], ctx with latents 0..3 dead)."""
    cfg = config(name, *extra)
    spec = spec_from_config(cfg)
    params = init_state(cfg).params
    r = np.random.default_rng(seed)
    params = dataclasses.replace(
        params,
        b_enc=jnp.asarray(r.normal(0, 0.1, N), jnp.float32),
        b_dec=jnp.asarray(r.normal(0, 0.1, D), jnp.float32),
        W_dec=params.W_dec * jnp.asarray(r.uniform(0.5, 2.0, (N, 1)), jnp.float32),
    )
    if params.threshold is not None:
        params.threshold = jnp.asarray(r.uniform(0.0, 0.1, N), jnp.float32)
    x = jnp.asarray(r.normal(0, 1, (B, D)), jnp.float32)
    dead = jnp.asarray(np.arange(N) < 4)
    ctx = arch.LossContext(jnp.int32(50), dead, cfg.sae, cfg.train)
    return cfg, spec, params, x, ctx


def np_pre(p, x, bias=False):
    x = np.asarray(x, np.float64) - (np.asarray(p.b_dec, np.float64) if bias else 0)
    return x @ np.asarray(p.W_enc, np.float64) + np.asarray(p.b_enc, np.float64)


def np_batch_topk(pre, k):
    a = np.maximum(pre, 0)
    kth = np.sort(a.reshape(-1))[::-1][a.shape[0] * k - 1]
    return np.where(a >= kth, a, 0)


def np_decode(p, f):
    return f @ np.asarray(p.W_dec, np.float64) + np.asarray(p.b_dec, np.float64)


# --- forwards against numpy ---------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_batchtopk_forward_equals_numpy(bias):
    cfg, spec, p, x, ctx = setup("batchtopk", f"sae.pre_encoder_bias={str(bias).lower()}")
    out = batchtopk.forward(p, spec, x, K)
    f = np_batch_topk(np_pre(p, x, bias), K)
    np.testing.assert_allclose(np.asarray(out.f), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.x_hat), np_decode(p, f), rtol=1e-5, atol=1e-5)


def test_batchtopk_keeps_exactly_b_times_k_codes_per_batch():
    cfg, spec, p, x, ctx = setup("batchtopk")
    f = np.asarray(batchtopk.forward(p, spec, x, K).f)
    per_token = (f > 0).sum(1)
    assert (f > 0).sum() == B * K
    assert per_token.min() != per_token.max()  # not per-token topk: tokens share the batch's budget


def test_batchtopk_inference_with_threshold_reproduces_training_codes():
    """A batch whose kept values sit well above theta and dropped ones well below: jumprelu(theta) = the training code."""
    cfg, spec, p, x, ctx = setup("batchtopk")
    pre = np.asarray(arch.pre_activations(p, spec, x))
    # theta midway between the B*k-th and (B*k+1)-th largest activations, whose gap is checked first.
    a = np.sort(np.maximum(pre, 0).reshape(-1))[::-1]
    gap = a[B * K - 1] - a[B * K]
    assert gap > 1e-4, "seed gives a batch whose cut is well separated"
    theta = (a[B * K - 1] + a[B * K]) / 2
    sae = SAE(dataclasses.replace(p, threshold=jnp.full((N,), theta, jnp.float32)), spec)
    inferred = np.asarray(forward_params(sae.params, spec, x).f)
    np.testing.assert_array_equal(inferred, np.asarray(batchtopk.forward(p, spec, x, K).f))


def test_batchtopk_threshold_moves_toward_the_smallest_kept_value():
    cfg, spec, p, x, ctx = setup("batchtopk")
    p = dataclasses.replace(p, threshold=jnp.full((N,), 0.5, jnp.float32))
    out = batchtopk.forward(p, spec, x, K)
    smallest = float(np.min(np.asarray(out.f)[np.asarray(out.f) > 0]))
    new = batchtopk.update_threshold(p, out, cfg.sae).threshold
    np.testing.assert_allclose(np.asarray(new), np.full(N, 0.99 * 0.5 + 0.01 * smallest), rtol=1e-6)


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_token_topk_phase_codes_k_per_token_then_the_batch(name):
    """sae.batchtopk_token_topk_frac 0.5 of 100 steps: steps 0..49 train on each token's K largest, 50.. on B*K."""
    cfg, spec, p, x, ctx = setup(name, "sae.batchtopk_token_topk_frac=0.5")
    a = np.maximum(np_pre(p, x), 0)
    kth = np.sort(a, axis=1)[:, -K][:, None]
    per_token = np.where(a >= kth, a, 0)
    for step, want in ((0, per_token), (49, per_token), (50, np_batch_topk(np_pre(p, x), K))):
        (_, (out, _)), _ = arch.value_and_grad(p, spec, x, ctx._replace(step=jnp.int32(step)))
        np.testing.assert_allclose(np.asarray(out.f), want, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    assert not np.array_equal(per_token > 0, np_batch_topk(np_pre(p, x), K) > 0)  # the two codes differ here


def test_token_topk_phase_gradients_are_topks_and_theta_tracks_the_batch_code():
    cfg, spec, p, x, ctx = setup("batchtopk", "sae.batchtopk_token_topk_frac=0.5")
    ctx = ctx._replace(step=jnp.int32(0))
    (_, (out, _)), grads = arch.value_and_grad(p, spec, x, ctx)

    def ref(q):  # ref_batchtopk_loss with each token's K largest kept
        pre = x @ q.W_enc + q.b_enc
        a = jax.nn.relu(pre)
        f = jnp.where(a >= jax.lax.stop_gradient(jnp.sort(a, axis=-1)[:, -K][:, None]), a, 0.0)
        x_hat = f @ q.W_dec + q.b_dec
        aux = ref_auxk(q, pre, jax.lax.stop_gradient(x - x_hat), ctx.dead, ctx.t.auxk_k)
        return jnp.mean(jnp.sum((x_hat - x) ** 2, -1)) + ctx.t.auxk_coefficient * aux

    assert_grads_close(grads, jax.grad(ref)(p))
    p = dataclasses.replace(p, threshold=jnp.full((N,), 0.5, jnp.float32))
    batch = np_batch_topk(np_pre(p, x), K)
    new = batchtopk.update_threshold(p, out, cfg.sae).threshold
    np.testing.assert_allclose(np.asarray(new), np.full(N, 0.99 * 0.5 + 0.01 * batch[batch > 0].min()), rtol=1e-6)


def test_token_topk_phase_runs_on_the_dense_kernel():
    from sae_jax.trainer import kernel

    cfg = config("batchtopk", "train.kernel=sparse", "sae.batchtopk_token_topk_frac=0.5")
    assert kernel(spec_from_config(cfg), cfg.train, cfg.sae) == "dense"
    cfg = config("batchtopk", "train.kernel=sparse")
    assert kernel(spec_from_config(cfg), cfg.train, cfg.sae) == "sparse"


def test_jumprelu_forward_equals_numpy():
    cfg, spec, p, x, ctx = setup("jumprelu")
    (_, (out, parts)), _ = arch.value_and_grad(p, spec, x, ctx)
    pre = np_pre(p, x)
    f = np.where(pre > np.asarray(p.threshold), pre, 0)
    np.testing.assert_allclose(np.asarray(out.f), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(parts.sparsity), np.mean((f != 0).sum(1)), rtol=1e-6)
    np.testing.assert_allclose(float(parts.recon), np.mean(((np_decode(p, f) - np.asarray(x)) ** 2).sum(1)), rtol=1e-5)


def test_matryoshka_loss_sums_the_prefix_reconstructions():
    cfg, spec, p, x, ctx = setup("matryoshka", "sae.matryoshka_prefixes=[4, 12]")
    (loss, (out, parts)), _ = arch.value_and_grad(p, spec, x, ctx)
    f = np_batch_topk(np_pre(p, x), K)
    W, b, xn = np.asarray(p.W_dec, np.float64), np.asarray(p.b_dec, np.float64), np.asarray(x, np.float64)
    recon = sum(np.mean(((f[:, :m] @ W[:m] + b - xn) ** 2).sum(1)) for m in (4, 12, N))
    np.testing.assert_allclose(float(loss - cfg.train.auxk_coefficient * parts.auxk), recon, rtol=1e-5)
    assert matryoshka.prefixes(cfg.sae, N) == [4, 12, N]
    assert matryoshka.prefixes(config("matryoshka").sae, N) == [N // 2, N]


# --- gradients against jax.grad of plain references ---------------------------------


def ref_auxk(p, pre, residual, dead, k_aux):
    masked = jnp.where(dead, pre, -jnp.inf)
    kth = jnp.sort(masked, axis=-1)[:, -k_aux][:, None]
    f_aux = jnp.where((masked >= kth) & dead, jax.nn.relu(pre), 0.0)
    return jnp.mean(jnp.sum((f_aux @ p.W_dec - residual) ** 2, -1))


def ref_batchtopk_loss(p, x, ctx, prefixes=None):
    pre = x @ p.W_enc + p.b_enc
    a = jax.nn.relu(pre)
    kth = jax.lax.stop_gradient(jnp.sort(a.reshape(-1))[-B * K])
    f = jnp.where(a >= kth, a, 0.0)
    x_hat = f @ p.W_dec + p.b_dec
    recon = sum(jnp.mean(jnp.sum((f[:, :m] @ p.W_dec[:m] + p.b_dec - x) ** 2, -1)) for m in (prefixes or [N]))
    aux = ref_auxk(p, pre, jax.lax.stop_gradient(x - x_hat), ctx.dead, ctx.t.auxk_k)
    return recon + ctx.t.auxk_coefficient * aux


def assert_grads_close(got, want):
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            continue
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_topk_family_gradients_equal_reference(name):
    cfg, spec, p, x, ctx = setup(name, "sae.unit_norm_decoder=false")
    (loss, _), grads = arch.value_and_grad(p, spec, x, ctx)
    prefixes = matryoshka.prefixes(cfg.sae, N) if name == "matryoshka" else None
    ref_loss, ref = jax.value_and_grad(lambda q: ref_batchtopk_loss(q, x, ctx, prefixes))(p)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_grads_close(grads, ref)
    np.testing.assert_array_equal(np.asarray(grads.threshold), 0)  # theta is set by the step, not learned


def test_unit_norm_decoder_gradients_are_projected_onto_the_sphere():
    cfg, spec, p, x, ctx = setup("batchtopk", "sae.unit_norm_decoder=true")
    p = arch.renormalise(p)
    (_, _), grads = arch.value_and_grad(p, spec, x, ctx)
    _, free = jax.value_and_grad(lambda q: ref_batchtopk_loss(q, x, ctx))(p)
    W, g, g0 = (np.asarray(a, np.float64) for a in (p.W_dec, grads.W_dec, free.W_dec))
    np.testing.assert_allclose((W * g).sum(1), 0, atol=1e-6)
    np.testing.assert_allclose(g, g0 - (W * g0).sum(1, keepdims=True) * W, rtol=1e-4, atol=1e-6)


def sg(a):
    return jax.lax.stop_gradient(a)


def ref_jumprelu_loss(p, x, ctx, sparsity):
    """The paper's pseudo-derivatives written with stop_gradient: value + (theta - sg(theta)) * d/dtheta."""
    s, eps = ctx.s, ctx.s.jumprelu_bandwidth
    pre = x @ p.W_enc + p.b_enc
    th = p.threshold
    K_ = ((sg(pre) - sg(th)) / eps > -0.5) & ((sg(pre) - sg(th)) / eps < 0.5)
    H = sg((pre > th).astype(jnp.float32))
    f = pre * H + (th - sg(th)) * (-(sg(th) / eps) * K_)
    step = H + (th - sg(th)) * (-(1 / eps) * K_)
    norms = jnp.linalg.norm(p.W_dec, axis=1)
    recon = jnp.mean(jnp.sum((f @ p.W_dec + p.b_dec - x) ** 2, -1))
    S = jnp.mean(jnp.sum(jnp.tanh(s.jumprelu_tanh_scale * f * norms) if sparsity == "tanh" else step, -1))
    lam = s.l0_coefficient * min(1.0, 50 / (s.l0_warmup_frac * ctx.t.steps))
    P = jnp.mean(jax.nn.relu(th - pre) @ norms)
    return recon + lam * S + s.jumprelu_pre_act_coefficient * P


@pytest.mark.parametrize("sparsity", ["l0", "tanh"])
def test_jumprelu_straight_through_gradients_equal_reference(sparsity):
    # eps wide enough that many pre-activations fall in the kernel's window, so the theta gradient is non-trivial.
    cfg, spec, p, x, ctx = setup(
        "jumprelu",
        f"sae.jumprelu_sparsity={sparsity}",
        "sae.jumprelu_bandwidth=0.2",
        "sae.jumprelu_pre_act_coefficient=0.3",
    )
    (loss, _), grads = arch.value_and_grad(p, spec, x, ctx)
    ref_loss, ref = jax.value_and_grad(lambda q: ref_jumprelu_loss(q, x, ctx, sparsity))(p)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_grads_close(grads, ref)
    assert np.count_nonzero(np.asarray(grads.threshold)) > N // 4


def test_jumprelu_threshold_gradient_is_the_papers_formula():
    """L0 term alone (recon switched off by a zero decoder): dL/dtheta_i = -(lambda / eps) mean_b K((pre - theta_i) / eps)."""
    cfg, spec, p, x, ctx = setup("jumprelu", "sae.jumprelu_bandwidth=0.3", "sae.l0_warmup_frac=0")
    p = dataclasses.replace(p, W_dec=jnp.zeros_like(p.W_dec))
    _, grads = arch.value_and_grad(p, spec, x, ctx)
    pre, th, eps = np_pre(p, x), np.asarray(p.threshold, np.float64), 0.3
    u = (pre - th) / eps
    expected = -(cfg.sae.l0_coefficient / eps) * np.mean((u > -0.5) & (u < 0.5), axis=0)
    np.testing.assert_allclose(np.asarray(grads.threshold), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grads.W_enc), 0)  # H passes no gradient to pre


def ref_jumprelu_token_phase_loss(p, x, ctx):
    """Each token's K largest kept, as topk (recon + alpha AuxK), theta's hinge to that code, the pre-act loss."""
    pre = x @ p.W_enc + p.b_enc
    a = jax.nn.relu(pre)
    f = jnp.where(a >= sg(jnp.sort(a, axis=-1)[:, -K][:, None]), a, 0.0)
    x_hat = f @ p.W_dec + p.b_dec
    aux = ref_auxk(p, pre, sg(x - x_hat), ctx.dead, ctx.t.auxk_k)
    th, held = p.threshold, sg(pre)
    hinge = jnp.mean(jnp.sum(jnp.where(f > 0, jax.nn.relu(th - held), jax.nn.relu(held - th)), -1))
    P = jnp.mean(jax.nn.relu(th - pre) @ jnp.linalg.norm(p.W_dec, axis=1))
    recon = jnp.mean(jnp.sum((x_hat - x) ** 2, -1))
    return recon + ctx.t.auxk_coefficient * aux + hinge + ctx.s.jumprelu_pre_act_coefficient * P


JUMPRELU_PHASE = ("sae.jumprelu_token_topk_frac=0.5", f"sae.k={K}", "sae.jumprelu_pre_act_coefficient=0.3")


def test_jumprelu_token_phase_codes_k_per_token_then_jumprelu():
    """sae.jumprelu_token_topk_frac 0.5 of 100 steps: steps 0..49 train on each token's K largest, 50.. on jumprelu."""
    cfg, spec, p, x, ctx = setup("jumprelu", *JUMPRELU_PHASE)
    pre = np_pre(p, x)
    a = np.maximum(pre, 0)
    per_token = np.where(a >= np.sort(a, axis=1)[:, -K][:, None], a, 0)
    jumped = np.where(pre > np.asarray(p.threshold), pre, 0)
    for step, want in ((0, per_token), (49, per_token), (50, jumped)):
        (_, (out, parts)), _ = arch.value_and_grad(p, spec, x, ctx._replace(step=jnp.int32(step)))
        np.testing.assert_allclose(np.asarray(out.f), want, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
        # parts.sparsity: the L0 jumprelu gives at this theta, in either phase
        np.testing.assert_allclose(float(parts.sparsity), np.mean((jumped != 0).sum(1)), rtol=1e-6)
    assert not np.array_equal(per_token > 0, jumped > 0)  # the two codes differ here


def test_jumprelu_token_phase_gradients_equal_reference():
    cfg, spec, p, x, ctx = setup("jumprelu", *JUMPRELU_PHASE, "sae.jumprelu_bandwidth=0.2")
    for step, ref_loss in ((0, ref_jumprelu_token_phase_loss), (50, lambda q, x, c: ref_jumprelu_loss(q, x, c, "l0"))):
        c = ctx._replace(step=jnp.int32(step))
        (loss, _), grads = arch.value_and_grad(p, spec, x, c)
        want_loss, want = jax.value_and_grad(lambda q: ref_loss(q, x, c))(p)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5, err_msg=f"step {step}")
        assert_grads_close(grads, want)
        assert np.count_nonzero(np.asarray(grads.threshold)) > N // 4


# --- config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        (["sae.architecture=batchtopk"], "sae.k: expected 1 <= k <= N"),
        (["sae.architecture=jumprelu", "sae.k=3"], "sae.k: expected unset for architecture 'jumprelu'"),
        (["sae.unit_norm_decoder=true"], "sae.unit_norm_decoder: expected null or false for 'relu'"),
        (["sae.architecture=matryoshka", "sae.k=2", "sae.matryoshka_prefixes=[8, 4]"], "strictly increasing"),
        (["sae.architecture=matryoshka", "sae.k=2", "sae.matryoshka_prefixes=[4, 32768]"], "expected sizes in [k, N"),
        (["sae.matryoshka_prefixes=4"], "sae.matryoshka_prefixes: expected a list"),
        (["sae.batchtopk_token_topk_frac=1.5"], "sae.batchtopk_token_topk_frac: expected 0 <= value <= 1"),
        (
            ["sae.architecture=jumprelu", "sae.jumprelu_token_topk_frac=0.8"],
            "sae.k: expected 1 <= k <= N = 32768 for jumprelu with sae.jumprelu_token_topk_frac > 0",
        ),
        (["sae.jumprelu_token_topk_frac=1.5"], "sae.jumprelu_token_topk_frac: expected 0 <= value <= 1"),
        (["sae.architecture=gated"], "sae.architecture: expected 'relu' or 'topk'"),
    ],
)
def test_bad_recipe_options_fail_at_load_naming_the_key(sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, sets)


def test_every_registered_recipe_has_a_config_name():
    import typing

    from sae_jax.config import SAEConfig

    assert set(typing.get_args(typing.get_type_hints(SAEConfig)["architecture"])) == set(arch.NAMES)
    assert {arch.get(n).name for n in arch.NAMES} == set(arch.NAMES)
