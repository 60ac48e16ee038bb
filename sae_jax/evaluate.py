"""Evaluate an SAE inside its model: reconstruction, sparsity, and what splicing it in does to the LM loss.

On held-out token batches, at the SAE's site (layer, input/output):

- reconstruction over kept tokens (`TokenBatch.keep`: real, non-special): L0,
  MSE (mean over all elements), explained variance by the notebook's formula
  `1 - mean((x_hat - x)^2) / var(x)` over all elements, and the mean over tokens
  of the same formula's FVU per token, `mean_d((x_hat - x)^2) / var_d(x)`;
- latent density (the fraction of tokens each latent fires on): dead latents
  never fire on these tokens, dense ones fire on more than `dense_threshold`;
- next-token cross-entropy over positions whose next token is real: clean,
  with x_hat spliced in at the kept positions, and with those positions
  zero-ablated; loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean),
  delta loss = CE_sae - CE_clean, and KL(clean || spliced) per position;
- the site check: the same explained variance on the residuals around the
  site (inputs of layers L-1..L+1 and the output of L+1; the input of layer j
  is the output of layer j-1), naming the one the SAE fits best.

Special tokens are neither counted nor spliced: the release trained without
them, and the BOS residual's outsized norm would dominate every number.
With bfloat16 compute, XLA's default excess precision rounds the clean and
spliced forwards differently, so an exact SAE shows a KL of ~1e-4 rather than
0 (`XLA_FLAGS=--xla_allow_excess_precision=false` makes them agree).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae_jax.atomic import atomic_file, atomic_write_text
from sae_jax.attach import check_compatible
from sae_jax.data.text import TokenBatch
from sae_jax.llama.model import Edit, Llama, positions_and_mask, residuals, run_layers, site_index
from sae_jax.metrics import DENSE_THRESHOLD, moments, quick_eval, recon_sums  # noqa: F401 (quick_eval re-exported)
from sae_jax.sae import SAE, forward


def site_names(index: int, num_layers: int) -> list[str]:
    """The names of the residual after `index` layers: 'input of layer i' and/or 'output of layer i-1'."""
    names = [f"input of layer {index}"] if index < num_layers else []
    return names + ([f"output of layer {index - 1}"] if index > 0 else [])


def neighbour_indices(layer: int, num_layers: int) -> tuple[int, ...]:
    """Residual indices of the inputs and outputs of layers layer-1..layer+1 that exist."""
    return tuple(i for i in range(layer - 1, layer + 3) if 0 <= i <= num_layers)


# --- one batch, on device -------------------------------------------------------------


def _splice(p: dict, x: jax.Array) -> jax.Array:
    """The residual x [B, T, D] with p["x"] [B, T, D] in place of it at the kept positions p["keep"] [B, T]."""
    return jnp.where(p["keep"][..., None], p["x"].astype(x.dtype), x)


# Positions per chunk of the LM losses: the logits of one chunk ([3, 256, V] float32, 394 MB at V = 128256) are the
# only ones alive at a time; the whole batch's would be [3, S, T, V] (3 GB for 8 x 256 tokens).
LM_CHUNK = 256


def _lm(model: Llama, x, x_hat, keep, input_ids, attention_mask, layer: int, site: str) -> dict:
    """CE sums (clean, spliced, zero-ablated) and KL(clean || spliced) over positions whose next token is real.

    The three forwards run from the site; the head and the losses run over chunks of `LM_CHUNK` positions.
    """
    splice = lambda r: Edit({"x": r, "keep": keep}, layer, site, _splice)
    positions, mask = positions_and_mask(x.shape[:2], attention_mask)
    start = site_index(model.config, layer, site)
    last = lambda edit: run_layers(model, x, positions, mask, start, edit=edit)[0][:, :-1]  # [S, T-1, D]
    h = jnp.stack([last(None), last(splice(x_hat)), last(splice(jnp.zeros_like(x)))])  # [3, S, T-1, D]
    w = (attention_mask[:, 1:] * attention_mask[:, :-1]).astype(jnp.float32)  # [S, T-1]
    P = w.size
    pad = -P % LM_CHUNK
    chunks = lambda a: jnp.pad(a.reshape(P, *a.shape[2:]), [(0, pad)] + [(0, 0)] * (a.ndim - 2))
    h = jax.vmap(chunks)(h).reshape(3, -1, LM_CHUNK, h.shape[-1]).swapaxes(0, 1)  # [n, 3, C, D]
    target = chunks(input_ids[:, 1:]).reshape(-1, LM_CHUNK)  # [n, C]
    w = chunks(w).reshape(-1, LM_CHUNK)

    def sums(args):
        h, target, w = args
        logits = model.head(h)  # [3, C, V]
        lse = jax.nn.logsumexp(logits, -1)  # [3, C]
        nll = ((lse - jnp.take_along_axis(logits, target[None, :, None], -1)[..., 0]) * w).sum(-1)  # [3]
        # sum_v p_clean (log p_clean - log p_sae) without writing out either log-softmax; 0 when the logits agree
        p_clean = jnp.exp(logits[0] - lse[0, :, None])
        kl = (((p_clean * (logits[0] - logits[1])).sum(-1) - lse[0] + lse[1]) * w).sum()
        return jnp.concatenate([nll, kl[None]])

    ce_clean, ce_sae, ce_zero, kl = jax.lax.map(sums, (h, target, w)).sum(0)
    return {"predictions": w.sum(), "ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero, "kl": kl}


@functools.partial(jax.jit, static_argnums=0, static_argnames=("layer", "site", "scan", "lm"))
def _eval_batch(
    graphdef, state, sae, input_ids, attention_mask, keep, *, layer: int, site: str, scan: tuple[int, ...], lm: bool
):
    model = nnx.merge(graphdef, state)
    at = site_index(model.config, layer, site)
    xs = residuals(model, input_ids, (*scan, at), attention_mask)
    x = xs[at]
    x_hat, f, _ = forward(sae, x)
    out = {
        "recon": recon_sums(x, x_hat, f, keep),
        "scan": {j: moments(xs[j], forward(sae, xs[j]).x_hat, keep) for j in scan},
    }
    if lm:
        out["lm"] = _lm(model, x, x_hat, keep, input_ids, attention_mask, layer, site)
    return out


# --- accumulation on the host ---------------------------------------------------------


class Moments:
    """Running element count, mean, centred sum of squares and squared error, merged in float64 (Chan et al.)."""

    def __init__(self):
        self.n = self.mean = self.m2 = self.sse = 0.0

    def add(self, b: dict) -> None:
        n, mean, m2 = float(b["n"]), float(b["mean"]), float(b["m2"])
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n, self.sse = total, self.sse + float(b["sse"])

    @property
    def mse(self) -> float:
        return self.sse / self.n if self.n else math.nan

    @property
    def explained_variance(self) -> float:
        """1 - mean((x_hat - x)^2) / var(x) over every element seen."""
        return 1.0 - self.sse / self.m2 if self.m2 else math.nan


@dataclasses.dataclass
class SiteFit:
    index: int  # layers run before this residual
    names: list[str]  # e.g. ["input of layer 9", "output of layer 8"]
    explained_variance: float


@dataclasses.dataclass
class LMLoss:
    predictions: int  # next-token predictions scored
    ce_clean: float
    ce_sae: float  # with the SAE's reconstruction spliced in
    ce_zero: float  # with the residual zero-ablated at the same positions
    kl: float  # mean KL(clean || spliced) per prediction, nats

    @property
    def loss_recovered(self) -> float:
        """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 for a perfect SAE, 0 for zero ablation."""
        gap = self.ce_zero - self.ce_clean
        return (self.ce_zero - self.ce_sae) / gap if gap else math.nan

    @property
    def delta_loss(self) -> float:
        return self.ce_sae - self.ce_clean


@dataclasses.dataclass
class Evaluation:
    layer: int
    site: str
    sequences: int
    tokens: int  # kept tokens measured
    l0: float
    mse: float
    explained_variance: float
    fvu_per_token: float
    dense_threshold: float
    density: np.ndarray  # [N] fraction of kept tokens each latent fired on
    sites: list[SiteFit]
    lm: LMLoss | None

    @property
    def dead_fraction(self) -> float:
        return float(np.mean(self.density == 0))

    @property
    def dense_fraction(self) -> float:
        return float(np.mean(self.density > self.dense_threshold))

    @property
    def best_site(self) -> SiteFit:
        """The residual with the highest explained variance; on a tie, the SAE's own site."""
        own = self.layer + (self.site == "output")
        return max(self.sites, key=lambda s: (s.explained_variance, s.index == own))

    def to_json(self) -> dict:
        """Every number, with the site check and the LM losses; the density array is left to its own file."""
        d = {
            k: getattr(self, k)
            for k in ("layer", "site", "sequences", "tokens", "l0", "mse", "explained_variance", "fvu_per_token")
        }
        d.update(
            dead_fraction=self.dead_fraction, dense_fraction=self.dense_fraction, dense_threshold=self.dense_threshold
        )
        if self.lm is not None:
            d.update(dataclasses.asdict(self.lm), loss_recovered=self.lm.loss_recovered, delta_loss=self.lm.delta_loss)
        d["sites"] = [dataclasses.asdict(s) for s in self.sites]
        d["best_site"] = self.best_site.names
        return d

    def table(self) -> str:
        """The numbers as an aligned, readable table."""
        rows = [
            ("L0 (active latents per token)", f"{self.l0:.2f}"),
            ("MSE", f"{self.mse:.6g}"),
            ("explained variance", f"{self.explained_variance:.4f}"),
            ("FVU per token (mean)", f"{self.fvu_per_token:.4f}"),
            ("dead latents (never fired)", f"{100 * self.dead_fraction:.2f}%"),
            (f"dense latents (> {100 * self.dense_threshold:g}% of tokens)", f"{100 * self.dense_fraction:.2f}%"),
        ]
        if self.lm is not None:
            m = self.lm
            rows += [
                ("CE loss, clean", f"{m.ce_clean:.4f}"),
                ("CE loss, SAE spliced in", f"{m.ce_sae:.4f}"),
                ("CE loss, zero-ablated", f"{m.ce_zero:.4f}"),
                ("loss recovered", f"{m.loss_recovered:.4f}"),
                ("delta LM loss", f"{m.delta_loss:.4f}"),
                ("KL(clean || SAE) per token", f"{m.kl:.4f}"),
            ]
        lines = [f"layer {self.layer} {self.site}: {self.tokens} tokens in {self.sequences} sequences"]
        lines += [f"  {k:<34} {v:>10}" for k, v in rows]
        if self.lm is not None and self.lm.ce_zero <= self.lm.ce_clean:
            lines.append("  note: zero ablation does not raise the loss here, so loss recovered means nothing")
        best = self.best_site
        lines.append("site check (explained variance of this SAE on each residual):")
        for s in self.sites:
            mark = "  <- best" if s is best else ""
            lines.append(f"  {' = '.join(s.names):<40} {s.explained_variance:>10.4f}{mark}")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> Path:
        """Write eval.json, feature_density.npy and feature_density.png into `out_dir`; return it."""
        from sae_jax.plots import plot_density

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.json", json.dumps(self.to_json(), indent=2) + "\n")
        with atomic_file(out / "feature_density.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, self.density.astype(np.float32))
        plot_density(
            self.density,
            out / "feature_density.png",
            title=f"layer {self.layer} {self.site}, {self.tokens} tokens",
            dense_threshold=self.dense_threshold,
            tokens=self.tokens,
        )
        return out


def evaluate(
    model: Llama,
    sae: SAE,
    batches: Iterable[TokenBatch],
    n_tokens: int,
    *,
    lm: bool = True,
    dense_threshold: float = DENSE_THRESHOLD,
    progress: bool = False,
) -> Evaluation:
    """Evaluate `sae` at its site on batches until `n_tokens` kept tokens (or the batches run out).

    Each batch: input_ids, attention_mask [S, T] and keep [S, T] bool. `lm=False`
    skips the LM losses (no forward past the site check's residuals). `progress`: a bar of kept tokens.
    """
    from tqdm import tqdm

    check_compatible(sae, model)
    L, nl = sae.spec.hook_layer, model.config.num_layers
    scan = neighbour_indices(L, nl)
    graphdef, state = nnx.split(model)
    main, fits = Moments(), {j: Moments() for j in scan}
    sums = {"tokens": 0.0, "fvu": 0.0, "l0": 0.0}
    lm_sums: dict[str, float] = {}
    fired = np.zeros(sae.spec.n_latents, np.int64)
    sequences = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="evaluating", disable=not progress, dynamic_ncols=True)
    for batch in batches:
        if sums["tokens"] >= n_tokens:
            break
        ids, attn, keep = (jnp.asarray(a) for a in (batch.input_ids, batch.attention_mask, batch.keep))
        out = _eval_batch(graphdef, state, sae, ids, attn, keep, layer=L, site=sae.spec.hook_site, scan=scan, lm=lm)
        out = jax.device_get(out)
        r = out["recon"]
        main.add(r)
        for j in scan:
            fits[j].add(out["scan"][j])
        for k in sums:
            sums[k] += float(r[k])
        fired += r["fired"]
        for k, v in out.get("lm", {}).items():
            lm_sums[k] = lm_sums.get(k, 0.0) + float(v)
        sequences += ids.shape[0]
        bar.update(min(float(r["tokens"]), n_tokens - bar.n))
    bar.close()
    n = sums["tokens"]
    if n == 0:
        raise ValueError("evaluation data: expected kept tokens, found none")
    lm_result = None
    if lm:
        p = lm_sums["predictions"]
        lm_result = LMLoss(int(p), *(lm_sums[k] / p for k in ("ce_clean", "ce_sae", "ce_zero", "kl")))
    return Evaluation(
        layer=L,
        site=sae.spec.hook_site,
        sequences=sequences,
        tokens=int(n),
        l0=sums["l0"] / n,
        mse=main.mse,
        explained_variance=main.explained_variance,
        fvu_per_token=sums["fvu"] / n,
        dense_threshold=dense_threshold,
        density=fired / n,
        sites=[SiteFit(j, site_names(j, nl), fits[j].explained_variance) for j in scan],
        lm=lm_result,
    )


def text_batches(text_cfg, skip_rows: int = 0, tokenizer=None) -> Iterator[TokenBatch]:
    """Token batches of `text_cfg` (a TextConfig) from row `skip_rows` on, ending where the data would wrap around."""
    from sae_jax.data.text import TextSource

    source = TextSource(text_cfg, tokenizer)
    if skip_rows:
        source.restore({"epoch": 0, "row": skip_rows, "offset": 0})
    first = True
    while True:
        batch = source.next_batch()
        if source.state()["epoch"] > 0:  # this batch reused rows; a held-out set counts each token once
            if first:
                c = text_cfg
                raise ValueError(
                    f"{c.path}: expected at least one batch ({c.seqs_per_batch} sequences) of rows "
                    f"from row {skip_rows} on, found fewer"
                )
            return
        first = False
        yield batch
