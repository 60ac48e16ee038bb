"""Ground-truth scores (sae_jax/groundtruth.py) on SAEs whose answers are known, and the realistic generator."""

import numpy as np
import pytest
from sae_helpers import make_sae

from sae_jax import groundtruth
from sae_jax.config import SyntheticConfig
from sae_jax.data.synthetic import SyntheticSource, firing_probs, mix, parents

D = 8


def codes(seed=0, B=400, n=D):
    r = np.random.default_rng(seed)
    return (r.random((B, n)) < 0.3) * r.uniform(0.5, 1.5, (B, n))


def test_a_perfect_permuted_sae_scores_one():
    c, perm = codes(), np.random.default_rng(1).permutation(D)
    F = np.eye(D)
    sae = make_sae(F.T[:, perm], np.zeros(D), F[perm], np.zeros(D), 0)  # latent j is feature perm[j]
    s = groundtruth.score(sae, F, c @ F, c)
    assert s["recovered"] == 1.0 and s["mcc"] == pytest.approx(1.0)
    assert s["precision"] == s["recall"] == s["f1"] == 1.0
    assert s["shrinkage"] == pytest.approx(1.0) and s["dead_fraction"] == 0.0
    assert s["dense_fraction"] == 1.0  # each fires on 30% of tokens, above the 10% line


def test_halved_codes_show_shrinkage_one_half():
    c, F = codes(), np.eye(D)
    s = groundtruth.score(make_sae(0.5 * F, np.zeros(D), F, np.zeros(D), 0), F, c @ F, c)
    assert s["shrinkage"] == pytest.approx(0.5) and s["recall"] == 1.0


def test_rotated_directions_are_not_recovered_and_mcc_is_their_cosine():
    F = np.eye(D)
    a = np.deg2rad(30)  # cos 30 degrees = 0.866 < 0.9
    R = np.eye(D)
    for i in range(0, D, 2):
        R[i : i + 2, i : i + 2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    c = codes()
    s = groundtruth.score(make_sae(R.T, np.zeros(D), R, np.zeros(D), 0), F, c @ F, c)
    assert s["recovered"] == 0.0 and s["mcc"] == pytest.approx(np.cos(a))


def test_absorbed_parent_scores_absorption_one():
    """Feature 1 is feature 0's child; latent 0 reads x0 - 10 x1, so it is silent whenever the child fires."""
    c = codes()
    c[:, 1] *= c[:, 0] > 0
    F = np.eye(D)
    W_enc = np.eye(D)
    W_enc[1, 0] = -10.0
    parent = np.full(D, -1)
    parent[1] = 0
    s = groundtruth.score(make_sae(W_enc, np.zeros(D), F, np.zeros(D), 0), F, c @ F, c, parent)
    assert s["absorption"] == 1.0
    plain = groundtruth.score(make_sae(F, np.zeros(D), F, np.zeros(D), 0), F, c @ F, c, parent)
    assert plain["absorption"] == 0.0


def test_greedy_matching_without_scipy(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda n, *a, **k: (_ for _ in ()).throw(ImportError()) if n.startswith("scipy") else real(n, *a, **k),
    )
    perm = np.random.default_rng(2).permutation(D)
    rows, cols, method = groundtruth.match(np.eye(D), np.eye(D)[perm])
    assert method == "greedy" and (perm[cols] == rows).all()


def test_plain_generator_is_unchanged():
    """The default options draw the same batches as before the realistic ones existed (value recorded then)."""
    x = SyntheticSource(SyntheticConfig(), 64, 16, 0).next_batch()
    assert float(x.sum()) == pytest.approx(-35.35554, abs=1e-4)


@pytest.mark.parametrize("d_in", [64, 2048])
def test_mix_is_einsum_bit_for_bit(d_in):
    """The generator's sparse product gives einsum's bits, tokens with no active feature and dense ones included."""
    src = SyntheticSource(SyntheticConfig(), d_in, 64, 0)
    c = src.batch(3)[1]
    c[0], c[1] = 0.0, np.random.default_rng(0).uniform(0.5, 1.5, c.shape[1])
    np.testing.assert_array_equal(mix(c, src.dictionary), np.einsum("bn,nd->bd", c, src.dictionary))


def test_realistic_generator_frequencies_hierarchy_and_correlation():
    cfg = SyntheticConfig(
        n_features=512,
        active=8,
        zipf_exponent=0.8,
        correlation=0.5,
        correlation_group=4,
        hierarchy_parents=8,
        hierarchy_children=3,
        hierarchy_child_prob=0.5,
        magnitude_spread=0.5,
    )
    p = firing_probs(cfg)
    assert p.sum() == pytest.approx(8.0) and p[0] > p[100] > p[-1] > 0
    src = SyntheticSource(cfg, 32, 4096, 0)
    x, c = src.batch(0)
    on, up = c > 0, parents(cfg)
    child = np.where(up >= 0)[0]
    assert child.tolist() == list(range(8, 32)) and not (on[:, child] & ~on[:, up[child]]).any()
    assert on.sum(1).mean() == pytest.approx(8.0, rel=0.05)
    np.testing.assert_allclose(on[:, child].mean(0), 0.5 * on[:, up[child]].mean(0), atol=0.04)
    # Features 100..103 share a factor, 100 and 104 do not.
    corr = np.corrcoef(on[:, 100:105].T)
    assert corr[0, 1] > 0.05 and abs(corr[0, 4]) < 0.03
    np.testing.assert_allclose(x, c @ src.dictionary, atol=0.1)
