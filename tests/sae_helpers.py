"""SAEs with known behaviour for the evaluation, steering and inspection tests."""

from __future__ import annotations

import types
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from sae_jax.sae import SAE, SAEParams, SAESpec


def make_sae(W_enc, b_enc, W_dec, b_dec, layer: int, site: str = "input") -> SAE:
    p = SAEParams(*(jnp.asarray(np.asarray(a), jnp.float32) for a in (W_enc, b_enc, W_dec, b_dec)))
    return SAE(p, SAESpec("relu", p.W_enc.shape[0], p.W_enc.shape[1], hook_layer=layer, hook_site=site))


def exact_sae(D: int, layer: int, site: str = "input") -> SAE:
    """N = 2D, W_enc = [I, -I], W_dec = [I; -I], zero biases: relu(x) - relu(-x) = x, so x_hat == x bit for bit."""
    I = np.eye(D, dtype=np.float32)
    return make_sae(np.concatenate([I, -I], 1), np.zeros(2 * D), np.concatenate([I, -I], 0), np.zeros(D), layer, site)


def zero_sae(D: int, N: int, layer: int, site: str = "input") -> SAE:
    """All weights and biases 0: no latent ever fires and x_hat == 0, which is zero ablation."""
    return make_sae(np.zeros((D, N)), np.zeros(N), np.zeros((N, D)), np.zeros(D), layer, site)


def pca_sae(X: np.ndarray, k: int, layer: int, site: str) -> SAE:
    """The best rank-k affine reconstruction of X [n, D]: x_hat = mu + U U^T (x - mu), U the top-k principal axes.

    As an SAE: N = 2k, W_enc = [U, -U], b_enc = [-mu U, mu U], W_dec = W_enc^T, b_dec = mu.
    """
    X = np.asarray(X, np.float64)
    mu = X.mean(0)
    _, vecs = np.linalg.eigh(np.cov((X - mu).T))
    U = vecs[:, ::-1][:, :k]
    W_enc = np.concatenate([U, -U], 1)
    return make_sae(W_enc, np.concatenate([-mu @ U, mu @ U]), W_enc.T, mu, layer, site)


ROOT = Path(__file__).resolve().parents[1]


def entry_point(name: str):
    """The `sae-jax NAME` subcommand as an object whose `main(argv)` runs it in this process."""
    from sae_jax.cli import main

    return types.SimpleNamespace(main=lambda argv: main([name, *argv]))


def run_entry(module, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `module.main(argv)`, expected errors rendered as the command line does."""
    capsys.readouterr()
    rc = module.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


class Workspace(NamedTuple):
    model: Path  # a tiny 4-layer Llama with the real vocabulary and the offline tokenizer saved beside it
    chats: Path  # 40 LMSYS-shaped rows
    sae: Path  # the exact SAE at the input of layer 2, sae-jax format
    narrow_sae: Path  # a D=32 SAE, release .safetensors: the wrong width for the model


def cli_workspace(root: Path, tokenizer) -> Workspace:
    from llama_helpers import tiny

    from sae_jax.data.demo_chats import write_demo_chats
    from sae_jax.formats import save_sae

    model = tiny(root / "model", num_hidden_layers=4, vocab_size=128256)
    tokenizer.save_pretrained(model)
    chats = write_demo_chats(root / "chats.jsonl", 40, seed=0)
    sae = save_sae(exact_sae(64, 2), root / "sae")
    narrow = save_sae(exact_sae(32, 2), root / "narrow.safetensors", "safetensors")
    return Workspace(model, chats, sae, narrow)


def without_progress(stderr: str) -> str:
    """stderr without the progress lines (`sae-jax: ...`) the command line writes while it works."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("sae-jax: "))


# A tiny synthetic run (D=8, N=32, 30 steps of 32 tokens, checkpoints every 10) that resume tests share.
TINY_RUN = [
    "sae.d_in=8",
    "sae.expansion=4",
    "data.batch_size=32",
    "train.steps=30",
    "train.lr=1e-2",
    "train.lr_warmup_steps=3",
    "run.save_every=10",
    "run.log_every=5",
]
