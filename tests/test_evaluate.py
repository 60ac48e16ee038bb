"""Evaluation on a tiny random Llama: exact and zero SAEs, a float64 numpy reference, the site check, outputs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from llama_helpers import tiny
from sae_helpers import exact_sae, make_sae, pca_sae, zero_sae

from sae_jax.data.text import TokenBatch
from sae_jax.evaluate import evaluate, quick_eval, site_names
from sae_jax.llama import load, logits_from, residuals
from sae_jax.sae import forward

D, LAYERS, L = 64, 4, 2  # the SAEs read layer 2 of a 4-layer model; the site check looks at residuals 1..4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tiny(tmp_path_factory.mktemp("eval") / "tiny", num_hidden_layers=LAYERS))


def token_batches(seed: int, n: int = 3, S: int = 4, T: int = 24) -> list[TokenBatch]:
    """Random ids; each batch's first row right-padded after 15 tokens; position 0 (a stand-in BOS) and pads not kept."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 512, (S, T)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, 15:] = 0
        keep = mask.astype(bool)
        keep[:, 0] = False
        out.append(TokenBatch(ids, mask, keep))
    return out


@pytest.fixture(scope="module")
def batches():
    return token_batches(0)


def kept_residuals(model, batches, index: int) -> np.ndarray:
    """[n, D] the residual after `index` layers at the kept positions of all batches."""
    return np.concatenate(
        [np.asarray(residuals(model, b.input_ids, [index], b.attention_mask)[index])[b.keep] for b in batches]
    )


def test_exact_sae_recovers_all_the_loss(model, batches):
    r = evaluate(model, exact_sae(D, L), batches, 10**9)
    n_kept = sum(int(b.keep.sum()) for b in batches)
    assert (r.tokens, r.sequences) == (n_kept, 12)
    assert r.mse == 0 and r.explained_variance == 1 and r.fvu_per_token == 0
    assert [s.explained_variance for s in r.sites] == [
        1,
        1,
        1,
        1,
    ] and r.best_site.index == L  # a tie: its own site wins
    assert r.l0 == D and r.dead_fraction == 0 and r.dense_fraction == 1  # every token has D non-zero coordinates
    m = r.lm
    assert m.predictions == sum(int((b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).sum()) for b in batches)
    assert (
        abs(m.ce_zero - m.ce_clean) > 0.05
    )  # ablation changes the loss (a random model may even gain), so the ratio means something
    assert m.loss_recovered == pytest.approx(1.0, abs=1e-6) and m.delta_loss == pytest.approx(0.0, abs=1e-6)
    assert m.kl == pytest.approx(0.0, abs=1e-6)
    assert (
        m.ce_zero < m.ce_clean
    ) and "note: zero ablation does not raise the loss here" in r.table()  # a random model


def test_zero_sae_is_zero_ablation(model, batches):
    r = evaluate(model, zero_sae(D, 2 * D, L), batches, 10**9)
    assert r.lm.ce_sae == r.lm.ce_zero and r.lm.loss_recovered == 0.0
    assert r.l0 == 0 and r.dead_fraction == 1 and r.dense_fraction == 0
    x = kept_residuals(model, batches, L).astype(np.float64)
    # EV = 1 - MSE/Var is near 0 here, so compare MSE/Var (near 1), which float32 sums hold to ~1e-7
    assert 1 - r.explained_variance == pytest.approx(np.mean(x**2) / np.var(x), rel=1e-6)


def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_every_number_matches_a_float64_numpy_reference(model, batches):
    """A PCA SAE (rank 8, so L0 is 8) plus 4 latents that never fire, over three batches, against numpy in float64."""
    base = pca_sae(kept_residuals(model, token_batches(1), L), 8, L, "input")
    p = base.params
    sae = make_sae(
        np.concatenate([p.W_enc, np.zeros((D, 4))], 1),
        np.concatenate([p.b_enc, -np.ones(4)]),
        np.concatenate([p.W_dec, np.ones((4, D))], 0),
        p.b_dec,
        L,
    )
    r = evaluate(model, sae, batches, 10**9, dense_threshold=0.5)

    xs, xhs, fs, ce, kls = [], [], [], {"clean": [], "sae": [], "zero": []}, []
    for b in batches:
        x = residuals(model, b.input_ids, [L], b.attention_mask)[L]
        x_hat, f, _ = forward(sae, x)
        keep = b.keep[..., None]
        (
            xs.append(np.asarray(x, np.float64)[b.keep]),
            xhs.append(np.asarray(x_hat, np.float64)[b.keep]),
            fs.append(np.asarray(f)[b.keep]),
        )
        lp = {
            k: log_softmax(logits_from(model, v, L, "input", b.attention_mask))[:, :-1]
            for k, v in (("clean", x), ("sae", jnp.where(keep, x_hat, x)), ("zero", jnp.where(keep, 0.0, x)))
        }
        scored = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).astype(bool)
        target = b.input_ids[:, 1:, None]
        for k in ce:
            ce[k].append(-np.take_along_axis(lp[k], target, -1)[..., 0][scored])
        kls.append((np.exp(lp["clean"]) * (lp["clean"] - lp["sae"])).sum(-1)[scored])
    x, x_hat, f = np.concatenate(xs), np.concatenate(xhs), np.concatenate(fs)
    ce = {k: np.concatenate(v).mean() for k, v in ce.items()}
    density = (f > 0).mean(0)

    assert r.l0 == 8 and r.dead_fraction == 4 / 20
    np.testing.assert_allclose(r.density, density, rtol=1e-12)
    assert r.dense_fraction == np.mean(density > 0.5)
    assert r.mse == pytest.approx(np.mean((x_hat - x) ** 2), rel=1e-5)
    assert r.explained_variance == pytest.approx(1 - np.mean((x_hat - x) ** 2) / np.var(x), rel=1e-5)
    assert r.fvu_per_token == pytest.approx(np.mean(np.mean((x_hat - x) ** 2, -1) / np.var(x, -1)), rel=1e-5)
    assert 0.2 < r.explained_variance < 0.9
    for k in ce:
        assert getattr(r.lm, f"ce_{k}") == pytest.approx(ce[k], rel=1e-5)
    assert r.lm.kl == pytest.approx(np.concatenate(kls).mean(), rel=1e-4)
    assert r.lm.loss_recovered == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4)


def test_n_tokens_stops_after_the_batch_that_reaches_it(model, batches):
    first = int(batches[0].keep.sum())
    r = evaluate(model, exact_sae(D, L), batches, first, lm=False)
    assert (r.tokens, r.sequences, r.lm) == (first, 4, None)


@pytest.mark.parametrize("site, index", [("input", L), ("output", L + 1)])
def test_site_check_names_the_site_an_sae_was_fit_on(model, site, index):
    """A rank-16 PCA SAE fit on one residual fits it best on held-out tokens, by a clear margin, among 1..4."""
    sae = pca_sae(kept_residuals(model, token_batches(2, n=2), index), 16, L, site)
    r = evaluate(model, sae, token_batches(3, n=2), 10**9, lm=False)
    assert [s.index for s in r.sites] == [1, 2, 3, 4]
    best = r.best_site
    assert best.index == index and best.names == site_names(index, LAYERS)
    assert best.names[0] == (f"input of layer {L}" if site == "input" else f"input of layer {L + 1}")
    assert best.names[1] == (f"output of layer {L - 1}" if site == "input" else f"output of layer {L}")
    others = [s.explained_variance for s in r.sites if s is not best]
    assert best.explained_variance - max(others) > 0.03
    assert best.explained_variance == r.explained_variance  # the main numbers are read at the SAE's own site


def test_site_names_cover_the_ends():
    assert site_names(0, 4) == ["input of layer 0"] and site_names(4, 4) == ["output of layer 3"]
    assert site_names(2, 4) == ["input of layer 2", "output of layer 1"]


def test_quick_eval_gives_evaluate_s_numbers_without_the_model(model, batches):
    sae = pca_sae(kept_residuals(model, token_batches(1), L), 8, L, "input")
    r = evaluate(model, sae, batches, 10**9, lm=False)
    q = quick_eval(sae, kept_residuals(model, batches, L))
    assert q["l0"] == r.l0 == 8 and q["dead_fraction"] == r.dead_fraction and q["dense_fraction"] == r.dense_fraction
    for k in ("mse", "explained_variance", "fvu_per_token"):
        assert q[k] == pytest.approx(getattr(r, k), rel=1e-5)
    with pytest.raises(ValueError, match=r"x: expected shape \[B, 64\], found \[3, 32\]"):
        quick_eval(sae, np.zeros((3, 32)))


def test_save_writes_json_density_and_png(model, batches, tmp_path):
    r = evaluate(model, zero_sae(D, 8, L), batches[:1], 10**9, lm=False)
    r.density[:4] = [0.5, 0.01, 0.0, 1e-4]
    out = r.save(tmp_path / "ev")
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(r.to_json()))
    assert saved["best_site"] == r.best_site.names and "ce_clean" not in saved
    np.testing.assert_array_equal(np.load(out / "feature_density.npy"), r.density.astype(np.float32))
    assert (out / "feature_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "eval.json",
        "feature_density.npy",
        "feature_density.png",
    ]  # no temp files left


@pytest.mark.parametrize(
    "sae, message",
    [
        (exact_sae(32, L), "SAE: width d_in expected the model's hidden size 64, found 32"),
        (exact_sae(D, 7), "SAE: hook_layer expected 0..3 (the model has 4 layers), found 7"),
    ],
)
def test_an_sae_that_does_not_fit_the_model_is_a_one_line_error(model, batches, sae, message):
    with pytest.raises(ValueError) as e:
        evaluate(model, sae, batches, 10)
    assert str(e.value) == message
