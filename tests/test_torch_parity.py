"""Parity with the release's PyTorch module at the release shape (D=2048, N=32768), fp32.

Reference: the notebook's module, `encoder = nn.Linear(D, N)`, ReLU,
`decoder = nn.Linear(N, D)`, whose state dict is the release `.pt`. Our SAE
gets the same weights through `save_sae`/`load_sae` of that `.pt`, so the
converter is part of what is checked.

Tolerance: both sides compute in fp32 but sum the K=2048 (encode) and
K=32768 (decode) products in different orders (oneDNN/MKL in torch, Eigen in
XLA). Each order rounds differently, by up to ~sqrt(K) * 2^-24 of the sum of
|terms| for random signs (5e-6 relative at K=2048); so results are compared as
max|ours - torch| <= RTOL * max|torch| with RTOL = 1e-5, about 10x the errors
measured here, and far below any difference a bug (a transpose, a missing bias,
a dropped term) would make: those are O(1) relative.

Adam divides each gradient element by its own running RMS, so an element whose
gradient is at the fp32 noise floor (a near-cancelling sum) can step either
way by up to lr. Adam is therefore compared by the whole update,
||ours - torch|| <= 1e-4 * ||torch step|| (measured ~7e-6), with at most one
element in 1e5 off by more than 1% of lr.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn

from sae_jax.formats import load_sae
from sae_jax.loss import sae_loss
from sae_jax.sae import decode, encode, explained_variance, forward

D, N, B = 2048, 32768, 16
L1 = 5.0  # lambda; large enough that the sparsity term moves the gradients visibly
LR = 1e-3
RTOL = 1e-5
N_ADAM = 4096  # latents in the Adam test: the update is elementwise, so fewer suffice
ADAM_RTOL = 1e-4


class ReleaseSAE(nn.Module):
    """The notebook's module, the layout of the release `.pt`."""

    def __init__(self, d: int, n: int):
        super().__init__()
        self.encoder = nn.Linear(d, n)
        self.decoder = nn.Linear(n, d)

    def encode(self, x):  # x: [B, D] -> [B, N]
        return torch.relu(self.encoder(x))

    def forward(self, x):  # x: [B, D] -> (x_hat [B, D], f [B, N])
        f = self.encode(x)
        return self.decoder(f), f


def torch_loss(m: ReleaseSAE, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over D, mean over B, + L1 * mean_B sum_i f_i |W_dec row i| (row i = decoder.weight[:, i])."""
    x_hat, f = m(x)
    recon = ((x_hat - x) ** 2).sum(-1).mean()
    return recon + L1 * (f @ m.decoder.weight.norm(dim=0)).mean()


def jax_loss(params, spec, x):
    return sae_loss(
        params, spec, x, l1_coefficient=L1, dead=jnp.zeros(spec.n_latents, bool), auxk_k=1, auxk_coefficient=0.0
    )[0]


@jax.jit
def _max_abs_diff(ours, ref):
    return jnp.max(jnp.abs(ours - ref)), jnp.max(jnp.abs(ref))


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref| (computed by XLA: these are 64M-element arrays)."""
    diff, scale = _max_abs_diff(jnp.asarray(ours), jnp.asarray(ref))
    return float(diff) / float(scale)


@pytest.fixture(autouse=True)
def true_fp32_matmuls():
    """XLA may run f32 matmuls as TF32 on GPUs; pin full fp32 so the comparison means what it says."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(torch module, our SAE from its .pt, activations x [B, D] as numpy)."""
    torch.manual_seed(0)
    m = ReleaseSAE(D, N)
    # Residual-stream-like activations: per-dim std ~0.7 (norm ~30) and two
    # "massive activation" dims of magnitude ~40, as Llama's middle layers have.
    x = torch.randn(B, D) * 0.7
    x[:, 7] += 40.0
    x[:, 1500] -= 25.0
    with torch.no_grad():
        sigma = m.encoder(x).std()
        m.encoder.bias.copy_(-2.7 * sigma + 0.1 * sigma * torch.randn(N))  # ~60 active latents per token
    path = tmp_path_factory.mktemp("parity") / "release.pt"
    torch.save(m.state_dict(), path)
    sae = load_sae(path)
    return m, sae, x.numpy()


def test_release_module_layout_loads(setup):
    m, sae, _ = setup
    assert sae.spec.architecture == "relu" and (sae.spec.d_in, sae.spec.n_latents) == (D, N)
    for ours, weight in ((sae.params.W_enc, m.encoder.weight), (sae.params.W_dec, m.decoder.weight)):
        ref = weight.detach().T.contiguous().numpy()  # torch's transposed copy (a strided compare: 1 s an array)
        assert np.array_equal(np.asarray(ours), ref)


def test_encode_decode_forward_match_torch(setup):
    m, sae, x = setup
    xt = torch.from_numpy(x)
    with torch.no_grad():
        f_ref = m.encode(xt).numpy()
        x_hat_from_ref_f = m.decoder(torch.from_numpy(f_ref)).numpy()
        x_hat_ref, _ = m(xt)
    f = encode(sae, jnp.asarray(x))
    l0 = float((f_ref > 0).sum(-1).mean())
    assert 20 < l0 < 200, l0  # realistic sparsity, so decode sums over a realistic set
    assert rel_err(f, f_ref) < RTOL
    assert rel_err(decode(sae, jnp.asarray(f_ref)), x_hat_from_ref_f) < RTOL
    out = forward(sae, jnp.asarray(x))
    assert rel_err(out.x_hat, x_hat_ref.numpy()) < RTOL
    assert np.array_equal(np.asarray(out.f) > 0, f_ref > 0)  # no latent flips across the ReLU


def test_explained_variance_matches_notebook_formula(setup):
    m, sae, x = setup
    xt = torch.from_numpy(x)
    with torch.no_grad():
        x_hat, _ = m(xt)
        ev_ref = 1 - ((x_hat - xt) ** 2).mean() / xt.var(unbiased=False)
    ev = explained_variance(jnp.asarray(x), forward(sae, jnp.asarray(x)).x_hat)
    # An untrained SAE explains ~nothing, so compare absolutely: 1e-6 still tells
    # var with ddof=1 from ddof=0, which moves the value by 1/(B*D) = 3e-5.
    assert abs(float(ev) - float(ev_ref)) < 1e-6


def test_loss_and_gradients_match_torch(setup):
    m, sae, x = setup
    m.zero_grad()
    loss_ref = torch_loss(m, torch.from_numpy(x))
    loss_ref.backward()
    loss, grads = jax.jit(jax.value_and_grad(jax_loss), static_argnums=1)(sae.params, sae.spec, jnp.asarray(x))
    assert abs(float(loss) - loss_ref.item()) <= RTOL * abs(loss_ref.item())
    assert rel_err(grads.W_enc, m.encoder.weight.grad.numpy().T) < RTOL
    assert rel_err(grads.b_enc, m.encoder.bias.grad.numpy()) < RTOL
    assert rel_err(grads.W_dec, m.decoder.weight.grad.numpy().T) < RTOL
    assert rel_err(grads.b_dec, m.decoder.bias.grad.numpy()) < RTOL


def test_three_adam_steps_match_torch_adam(setup, tmp_path):
    """torch.optim.Adam vs optax.adam, 3 steps on the same batch, on the first N_ADAM latents (time)."""
    big, _, x = setup
    m = ReleaseSAE(D, N_ADAM)
    with torch.no_grad():
        for name, p in m.state_dict().items():
            p.copy_(
                big.state_dict()[name][..., :N_ADAM] if name == "decoder.weight" else big.state_dict()[name][:N_ADAM]
            )
    torch.save(m.state_dict(), tmp_path / "small.pt")
    sae = load_sae(tmp_path / "small.pt")
    start = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}

    opt_ref = torch.optim.Adam(m.parameters(), lr=LR)
    for _ in range(3):
        opt_ref.zero_grad()
        torch_loss(m, torch.from_numpy(x)).backward()
        opt_ref.step()

    opt = optax.adam(LR)

    @jax.jit
    def step(params, state):
        grads = jax.grad(jax_loss)(params, sae.spec, jnp.asarray(x))
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = sae.params, opt.init(sae.params)
    for _ in range(3):
        params, state = step(params, state)

    ours = {
        "encoder.weight": params.W_enc.T,
        "encoder.bias": params.b_enc,
        "decoder.weight": params.W_dec.T,
        "decoder.bias": params.b_dec,
    }
    for key, value in ours.items():
        ref_step = m.state_dict()[key].numpy() - start[key]
        err = np.abs((np.asarray(value) - start[key]) - ref_step)
        assert np.abs(ref_step).max() > LR  # every param moved
        assert np.linalg.norm(err) <= ADAM_RTOL * np.linalg.norm(ref_step), key
        assert (err > 1e-2 * LR).mean() <= 1e-5, key
