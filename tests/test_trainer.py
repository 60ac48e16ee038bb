"""The training step: its gradients, schedules and non-finite handling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.config import load_config
from sae_jax.trainer import init_state, l1_schedule, loss_and_grads, lr_schedule, make_step, spec_from_config


def small(arch="relu", **extra):
    sets = ["sae.d_in=8", "sae.expansion=4", "data.batch_size=16", "train.steps=100", "train.lr_warmup_steps=10"]
    if arch == "topk":
        sets += ["sae.architecture=topk", "sae.k=3", "train.auxk_k=4"]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])


def reference_relu_loss(p, x, lam):
    """The April-2024 loss written out plainly."""
    f = jnp.maximum(x @ p.W_enc + p.b_enc, 0)
    x_hat = f @ p.W_dec + p.b_dec
    per_token = jnp.sum((x_hat - x) ** 2, axis=1) + lam * jnp.sum(f * jnp.sqrt(jnp.sum(p.W_dec**2, axis=1)), axis=1)
    return jnp.mean(per_token)


def reference_topk_loss(p, x, k, dead, k_aux, alpha):
    pre = x @ p.W_enc + p.b_enc
    kth = jnp.sort(pre, axis=1)[:, -k][:, None]
    f = jnp.where(pre >= kth, jnp.maximum(pre, 0), 0)
    x_hat = f @ p.W_dec + p.b_dec
    resid = jax.lax.stop_gradient(x - x_hat)
    pre_dead = jnp.where(dead, pre, -jnp.inf)
    kth_dead = jnp.sort(pre_dead, axis=1)[:, -k_aux][:, None]
    f_aux = jnp.where((pre_dead >= kth_dead) & dead, jnp.maximum(pre, 0), 0)
    aux = jnp.mean(jnp.sum((f_aux @ p.W_dec - resid) ** 2, axis=1))
    return jnp.mean(jnp.sum((x_hat - x) ** 2, axis=1)) + alpha * aux


def random_state(cfg, seed=0):
    state = init_state(cfg)
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), state.params)
    return dataclasses.replace(state, params=noisy)


def test_relu_step_gradients_equal_reference():
    cfg = small()
    state = dataclasses.replace(random_state(cfg), step=jnp.int32(2))  # inside the lambda warm-up
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32))
    (loss, _), grads = loss_and_grads(state, x, spec_from_config(cfg), cfg.train)
    lam = l1_schedule(cfg.train, 2)
    assert 0 < lam < cfg.train.l1_coefficient
    ref_loss, ref_grads = jax.value_and_grad(reference_relu_loss)(state.params, x, lam)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(getattr(grads, name), getattr(ref_grads, name), rtol=1e-5, atol=1e-6)


def test_topk_step_gradients_equal_reference_with_dead_latents():
    cfg = small("topk")
    dead = np.zeros(32, bool)
    dead[::3] = True
    state = dataclasses.replace(
        random_state(cfg), since_fired=jnp.where(dead, cfg.train.dead_tokens, 0).astype(jnp.int32)
    )
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32))
    (loss, (_, parts)), grads = loss_and_grads(state, x, spec_from_config(cfg), cfg.train)
    assert float(parts.auxk) > 0
    ref_loss, ref_grads = jax.value_and_grad(reference_topk_loss)(
        state.params, x, 3, jnp.asarray(dead), 4, cfg.train.auxk_coefficient
    )
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(getattr(grads, name), getattr(ref_grads, name), rtol=1e-4, atol=1e-6)


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    t = small(**{"train.lr": 0.01, "train.lr_decay_frac": 0.2}).train
    s = lr_schedule(t)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.005)
    assert float(s(10)) == pytest.approx(0.01)
    assert float(s(80)) == pytest.approx(0.01)
    assert float(s(90)) == pytest.approx(0.005)
    assert float(s(100)) == pytest.approx(0.0)


def test_l1_warms_up_linearly():
    t = small(**{"train.l1_coefficient": 4.0, "train.l1_warmup_frac": 0.1}).train
    assert float(l1_schedule(t, 0)) == 0.0
    assert float(l1_schedule(t, 5)) == pytest.approx(2.0)
    assert float(l1_schedule(t, 50)) == pytest.approx(4.0)


def test_step_counts_dead_latents_and_metrics():
    cfg = small(**{"train.dead_tokens": 32})
    step = make_step(cfg)
    state = init_state(cfg)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32))
    state, m = step(state, x, jnp.float32(1.0))
    f = np.maximum(np.asarray(x) @ np.asarray(init_state(cfg).params.W_enc), 0)
    fired = (f > 0).any(0)
    np.testing.assert_array_equal(np.asarray(state.since_fired), np.where(fired, 0, 16))
    assert float(m["l0"]) == pytest.approx((f > 0).sum(1).mean())
    state, m = step(state, x, jnp.float32(1.0))
    assert int(state.step) == 2


def test_nonfinite_input_leaves_state_and_is_recorded():
    cfg = small()
    step = make_step(cfg)
    state, _ = step(init_state(cfg), jnp.ones((16, 8)), jnp.float32(1.0))
    before = jax.device_get(state.params)
    x = np.ones((16, 8), np.float32)
    x[3, 2] = np.nan
    state, _ = step(state, jnp.asarray(x), jnp.float32(1.0))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert int(state.skipped) == 1
    assert state.first_bad.tolist() == [1, 1]  # step index 1, "input activations"
