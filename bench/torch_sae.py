"""The PyTorch reference trainer: the dense SAE step a researcher would write (as SAELens does).

Same math as `sae_jax.trainer.train_step`: inputs times a scale, relu or topk
codes, squared error summed over D and averaged over B, relu's
lambda * sum_i f_i |W_dec,i|, topk's AuxK only while some latent is dead,
gradient clipping by global norm, Adam, dead-latent counting.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class SparseDecode(torch.autograd.Function):
    """x_hat = sum_k a_k W_dec[idx_k], as EleutherAI sparsify decodes on CPU: embedding_bag forward, index_add_ for W_dec's gradient."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, a: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        """idx, a: [B, K], W_dec: [N, D] -> [B, D]."""
        ctx.save_for_backward(idx, a, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=a, mode="sum")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        idx, a, W_dec = ctx.saved_tensors
        rows = F.embedding(idx, W_dec)  # [B, K, D]
        da = torch.bmm(rows, g.unsqueeze(-1)).squeeze(-1)
        dW = torch.zeros_like(W_dec).index_add_(
            0, idx.reshape(-1), (a.unsqueeze(-1) * g.unsqueeze(1)).reshape(-1, W_dec.shape[1])
        )
        return None, da, dW


class TorchSAE(torch.nn.Module):
    """W_enc [D, N], b_enc [N], W_dec [N, D], b_dec [D], as in sae_jax (not nn.Linear's [out, in])."""

    def __init__(
        self,
        W_enc: np.ndarray,
        b_enc: np.ndarray,
        W_dec: np.ndarray,
        b_dec: np.ndarray,
        architecture: str,
        k: int | None,
    ):
        super().__init__()
        t = lambda a: torch.nn.Parameter(torch.tensor(np.asarray(a, np.float32)))
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = t(W_enc), t(b_enc), t(W_dec), t(b_dec)
        self.architecture, self.k = architecture, k

    def forward(
        self,
        x: torch.Tensor,
        dead: torch.Tensor,
        any_dead: bool,
        l1: float,
        auxk_k: int,
        auxk_alpha: float,
        sparse: bool = False,
    ):
        """x: [B, D] scaled, dead: [N] bool (any_dead: dead.any(), read on the host) -> (loss [], codes f [B, N])."""
        pre = x @ self.W_enc + self.b_enc
        if sparse:
            return self._sparse(x, pre, dead, any_dead, l1, auxk_k, auxk_alpha)
        if self.architecture == "relu":
            f = torch.relu(pre)
        else:
            vals, idx = pre.topk(self.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        x_hat = f @ self.W_dec + self.b_dec
        loss = ((x_hat - x) ** 2).sum(-1).mean()
        if self.architecture == "relu":
            loss = loss + l1 * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif any_dead:
            vals, idx = pre.masked_fill(~dead, -torch.inf).topk(min(auxk_k, pre.shape[-1]), dim=-1)
            vals = torch.where(torch.isfinite(vals), torch.relu(vals), 0.0)
            e_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ self.W_dec
            loss = loss + auxk_alpha * ((e_hat - (x - x_hat).detach()) ** 2).sum(-1).mean()
        return loss, f

    def _sparse(self, x, pre, dead, any_dead, l1, auxk_k, auxk_alpha):
        """The same loss decoded from the active latents only (sparsify's way). relu: K = the batch's largest L0, so exact."""
        k = self.k if self.architecture == "topk" else max(int((pre > 0).sum(-1).max()), 1)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        a = torch.relu(vals)
        x_hat = SparseDecode.apply(idx, a, self.W_dec) + self.b_dec
        loss = ((x_hat - x) ** 2).sum(-1).mean()
        if self.architecture == "relu":
            loss = loss + l1 * (a * self.W_dec.norm(dim=1)[idx]).sum(-1).mean()
        elif any_dead:
            vals, idx_aux = pre.masked_fill(~dead, -torch.inf).topk(min(auxk_k, pre.shape[-1]), dim=-1, sorted=False)
            v = torch.where(torch.isfinite(vals), torch.relu(vals), 0.0)
            e_hat = SparseDecode.apply(idx_aux, v, self.W_dec)
            loss = loss + auxk_alpha * ((e_hat - (x - x_hat).detach()) ** 2).sum(-1).mean()
        f = torch.zeros_like(pre).scatter_(-1, idx, a.detach())
        return loss, f


class TorchTrainer:
    """One SAE, its Adam and dead-latent counter; `step(x)` trains on one batch.

    variant: 'eager' (Adam, per-tensor loop), 'fused' (Adam(fused=True), or
    foreach where fused is unavailable), 'compile' (torch.compile of the whole
    step, foreach Adam inside) or 'sparse' (fused Adam, decoding from the
    active latents with embedding_bag and index_add_, as EleutherAI sparsify).
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        architecture: str,
        k: int | None,
        variant: str,
        *,
        lr: float,
        l1: float,
        grad_clip: float = 1.0,
        auxk_k: int = 256,
        auxk_alpha: float = 1 / 32,
        dead_tokens: int = 10_000_000,
        scale: float = 1.0,
        device: str = "cpu",
    ):
        self.sae = TorchSAE(params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], architecture, k).to(
            device
        )
        ps = list(self.sae.parameters())
        if variant == "eager":
            self.opt = torch.optim.Adam(ps, lr=lr, foreach=False)
        elif variant in ("fused", "sparse"):
            try:
                self.opt = torch.optim.Adam(ps, lr=lr, fused=True)
            except RuntimeError:
                self.opt = torch.optim.Adam(ps, lr=lr, foreach=True)
        elif variant == "compile":
            self.opt = torch.optim.Adam(ps, lr=lr, foreach=True)
        else:
            raise ValueError(f"variant: expected eager, fused, compile or sparse, found {variant!r}")
        self.since = torch.zeros(self.sae.W_enc.shape[1], dtype=torch.int64, device=device)
        self.cfg = dict(l1=l1, auxk_k=auxk_k, auxk_alpha=auxk_alpha)
        self.grad_clip, self.dead_tokens, self.scale, self.sparse = grad_clip, dead_tokens, scale, variant == "sparse"
        self._step = torch.compile(self._eager_step) if variant == "compile" else self._eager_step

    def _eager_step(self, x: torch.Tensor, any_dead: bool) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss, f = self.sae(x * self.scale, self.since >= self.dead_tokens, any_dead, **self.cfg, sparse=self.sparse)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.grad_clip)
        self.opt.step()
        with torch.no_grad():
            fired = (f > 0).any(0)
            self.since = torch.where(fired, 0, torch.clamp(self.since + x.shape[0], max=self.dead_tokens))
        return loss.detach()

    def step(self, x: torch.Tensor) -> float:
        """x: [B, D] raw activations -> the loss before the update."""
        # Read on the host so that torch.compile specialises on it instead of breaking the graph.
        any_dead = bool((self.since >= self.dead_tokens).any())
        return float(self._step(x, any_dead))
