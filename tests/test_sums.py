"""sums.tree_sum and sums.add_bias: the same sums and gradients as jnp.sum and +, up to float32 summation order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.sums import add_bias, tree_sum


@pytest.mark.parametrize("shape,axis", [((256, 300), 0), ((7, 5), 1), ((7, 5), -1), ((1, 3), 0), ((3, 5, 6), 1)])
def test_tree_sum_is_the_sum_and_its_gradient_a_broadcast(shape, axis):
    r = np.random.default_rng(0)
    a = jnp.asarray(r.standard_normal(shape), jnp.float32)
    w = jnp.asarray(r.standard_normal(np.sum(np.zeros(shape), axis).shape), jnp.float32)
    np.testing.assert_allclose(tree_sum(a, axis), np.sum(np.asarray(a, np.float64), axis), rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda a: jnp.sum(tree_sum(a, axis) * w))(a)
    np.testing.assert_array_equal(grad, jax.grad(lambda a: jnp.sum(jnp.sum(a, axis) * w))(a))


def test_tree_sum_of_an_empty_axis_is_zero_and_counts_are_exact():
    assert tree_sum(jnp.ones((0, 3)), 0).tolist() == [0.0, 0.0, 0.0]
    on = np.random.default_rng(1).random((256, 4099)) < 0.5
    counts = tree_sum(jnp.asarray(on).astype(jnp.int32), -1)
    assert counts.dtype == jnp.int32 and counts.tolist() == on.sum(-1).tolist()


def test_add_bias_gradients_match_plain_addition():
    r = np.random.default_rng(2)
    a, b = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((3, 4, 6), (6,)))
    ours = jax.grad(lambda a, b: jnp.sum(jnp.sin(add_bias(a, b))), (0, 1))(a, b)
    plain = jax.grad(lambda a, b: jnp.sum(jnp.sin(a + b)), (0, 1))(a, b)
    np.testing.assert_array_equal(add_bias(a, b), a + b)
    np.testing.assert_array_equal(ours[0], plain[0])
    np.testing.assert_allclose(ours[1], plain[1], rtol=1e-6)
