"""The checkpoint fingerprint's memory: its sums run in blocks, with the values of the whole-leaf formula.

`checkpoint._state_sums` reduces every bit of the training state before each save and after each restore. Over
whole leaves its temporaries were 8 bytes per word, 3.2 GB for a release-size state (1.6 GB: D=2048, N=32768,
params and two Adam moments); in blocks of `SUM_BLOCK` elements they are a few blocks' worth. The sums wrap (mod 2**32),
so blocks change nothing: checked bit for bit against the formula written out in numpy, over whole leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax.checkpoint import SUM_BLOCK, _state_sums


def reference_sums(leaves) -> np.ndarray:
    """The fingerprint's formula over whole leaves in numpy: word i (u) weighted 2i + 1, and u ^ (u >> 16) weighted
    (i * 0x9E3779B1 mod 2**32) | 1, each summed mod 2**32."""
    out = []
    for a in leaves:
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        a = np.asarray(a)
        if a.dtype == np.bool_:
            u = a.astype(np.uint64).ravel()
        else:
            word = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[a.dtype.itemsize]
            u = np.ascontiguousarray(a).view(word).astype(np.uint64).ravel()
        i = np.arange(u.size, dtype=np.uint64)
        m = np.uint64(2**32 - 1)
        out.append(np.sum(u * (2 * i + 1)) & m)
        out.append(np.sum((u ^ (u >> np.uint64(16))) * (((i * np.uint64(0x9E3779B1)) & m) | np.uint64(1))) & m)
    return np.asarray(out, np.uint32)


def leaves():
    rng = np.random.default_rng(0)
    return [
        jnp.asarray(rng.standard_normal((37, 53)), jnp.float32),
        jnp.asarray(rng.standard_normal(1001), jnp.bfloat16),
        jnp.asarray(rng.integers(-(2**31), 2**31 - 1, (7, 9, 11)), jnp.int32),
        jnp.asarray(rng.random(333) < 0.5),
        jax.random.split(jax.random.key(4), 17),
        jnp.zeros((), jnp.int32),
        jnp.asarray(rng.integers(0, 256, 1000), jnp.uint8),
    ]


@pytest.mark.parametrize("block", [1, 7, 64, 1000, SUM_BLOCK])
def test_block_sums_equal_the_whole_leaf_formula(block):
    # block 7 and 64 leave a ragged last block in every leaf; 1000 covers some leaves whole and not others
    got = np.asarray(_state_sums(leaves(), block=block))
    np.testing.assert_array_equal(got, reference_sums(leaves()))


def test_block_sums_see_one_changed_word():
    a = leaves()
    b = list(a)
    b[0] = a[0].at[36, 52].set(jnp.nextafter(a[0][36, 52], jnp.float32(np.inf)))  # the last word, in the last block
    s_a, s_b = (np.asarray(_state_sums(x, block=64)) for x in (a, b))
    assert (s_a[0], s_a[1]) != (s_b[0], s_b[1])
    np.testing.assert_array_equal(s_a[2:], s_b[2:])


def test_fingerprint_temporaries_of_a_release_size_state():
    # params and two Adam moments at D=2048, N=32768: 1.6 GB of state, compiled only (nothing is allocated)
    big = [jax.ShapeDtypeStruct((2048, 32768), jnp.float32), jax.ShapeDtypeStruct((32768, 2048), jnp.float32)]
    small = [jax.ShapeDtypeStruct((32768,), jnp.float32), jax.ShapeDtypeStruct((2048,), jnp.float32)]
    state = (big + small) * 3
    state_bytes = sum(np.prod(s.shape) * 4 for s in state)
    temp = _state_sums.lower(state).compile().memory_analysis().temp_size_in_bytes
    assert state_bytes > 1.6e9
    assert temp < 64e6, f"{temp / 1e6:.1f} MB of temporaries (the whole-leaf formula took 3230 MB)"
