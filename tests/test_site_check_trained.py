"""The site check on SAEs trained by our trainer at known sites of the demo model.

The notebook reads layer 9's input, SAELens names layer 19's output for the
sibling release: one layer apart. An SAE trained at one of two adjacent sites
must be named as fitting that one. Sparse codes (k = 16 of D = 128) matter: an
SAE with L0 above D reconstructs any neighbouring residual as well as its own.
"""

import pytest

from sae_jax import llama
from sae_jax.config import load_config
from sae_jax.demo import prepare
from sae_jax.evaluate import evaluate, text_batches
from sae_jax.run import train

pytestmark = pytest.mark.full_xla  # long-running programs: compiled as users' runs are (conftest.py)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("demo"))


def trained_sae(demo, out, layer, site):
    model, chats = demo
    cfg = load_config(
        None,
        [
            "data.source=llama",
            f"data.model.path={model}",
            "data.model.dtype=float32",
            f"data.text.path={chats}",
            "data.text.context_size=128",
            "data.text.pack=true",
            "data.text.buffer_tokens=16384",
            "data.batch_size=1024",
            "sae.d_in=128",
            "sae.expansion=8",
            "sae.architecture=topk",
            "sae.k=16",
            f"sae.hook_layer={layer}",
            f"sae.hook_site={site}",
            "train.steps=150",
            "train.lr=2e-3",
            "train.lr_warmup_steps=10",
            "train.scale_batches=2",
            "train.auxk_k=64",
            "run.save_every=150",
            "run.log_every=50",
            "run.eval_every=0",
            "run.eval_batches=0",
            f"run.out_dir={out}",
        ],
    )
    return train(cfg, progress=False).sae, cfg


@pytest.mark.parametrize(
    "site, expected",
    [("input", ["input of layer 9", "output of layer 8"]), ("output", ["input of layer 10", "output of layer 9"])],
)
def test_site_check_names_the_site_a_trained_sae_was_trained_on(demo, tmp_path, site, expected):
    sae, cfg = trained_sae(demo, tmp_path, 9, site)
    model = llama.load(demo[0])
    result = evaluate(model, sae, text_batches(cfg.data.text, skip_rows=3000), 8192, lm=False)
    scores = {s.names[0]: round(s.explained_variance, 4) for s in result.sites}
    print(site, scores)
    assert result.best_site.names == expected, scores
