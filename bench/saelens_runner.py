"""One SAELens run on exactly a sae-jax run's data, scored by the code that scores ours.

    from bench.saelens_runner import train_saelens
    ev = train_saelens(load_config("configs/realistic.yaml", ["sae.architecture=topk", "sae.k=4"]), Path("runs/x"))

What is shared with `sae_jax.run.train` on the same config: the source (`make_source(cfg)`) and its batch
stream (the first `train.scale_batches` batches estimate the input scale, the next `train.steps` train, the next
`run.eval_batches` score), the scale (`run.estimate_scale`, mean norm sqrt(D), given to SAELens's own
`ActivationScaler` and folded into the weights by its trainer), the token budget, Adam's betas, and the learning
rate schedule (linear warm-up, constant, linear decay over the last `train.lr_decay_frac`; SAELens's warm-up starts
at lr / warmup where ours starts at 0). The sparsity settings are translated key by key (`saelens_config`).
SAELens's own: its `SAETrainer.fit` loop, each architecture's math, gradient clipping at norm 1 (fixed in
SAELens), AuxK over k_aux = D/2 dead latents (fixed), a pre-activation loss on dead latents only.

The SAE is saved with SAELens's `save_inference_model`, read back by `sae_jax.formats.saelens.load_saelens`, and
scored by `sae_jax.run.final_eval` (eval.json: L0, FVU, dead fraction; ground-truth recovery, MCC, F1 on
synthetic data), as a run of ours is.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_jax.config import Config, to_dict  # noqa: E402

# Our architecture -> SAELens's training architecture (sae_lens.registry).
ARCHITECTURE = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "matryoshka": "matryoshka_batchtopk",
}


def saelens_config(cfg: Config) -> tuple[str, dict]:
    """(SAELens architecture, its training-config kwargs) meaning what `cfg.sae` and `cfg.train` mean to ours."""
    from sae_jax.arch.matryoshka import prefixes

    s, t = cfg.sae, cfg.train
    kw = {
        "d_in": s.d_in,
        "d_sae": s.n_latents,
        "decoder_init_norm": s.dec_init_norm,
        "apply_b_dec_to_input": s.pre_encoder_bias,
    }
    if s.architecture == "relu":
        kw |= {"l1_coefficient": t.l1_coefficient, "l1_warm_up_steps": round(t.l1_warmup_frac * t.steps)}
    elif s.architecture == "jumprelu":
        kw |= {
            "l0_coefficient": s.l0_coefficient,
            "l0_warm_up_steps": round(s.l0_warmup_frac * t.steps),
            "jumprelu_bandwidth": s.jumprelu_bandwidth,
            "jumprelu_init_threshold": s.jumprelu_init_threshold,
            "jumprelu_sparsity_loss_mode": {"l0": "step", "tanh": "tanh"}[s.jumprelu_sparsity],
            "jumprelu_tanh_scale": s.jumprelu_tanh_scale,
            "pre_act_loss_coefficient": s.jumprelu_pre_act_coefficient or None,
        }
    else:  # the topk family: SAELens's rescale_acts_by_decoder_norm is its unit-norm decoder
        kw |= {
            "k": s.k,
            "aux_loss_coefficient": t.auxk_coefficient,
            "rescale_acts_by_decoder_norm": bool(s.unit_norm_decoder),
        }
        if s.architecture in ("batchtopk", "matryoshka"):
            kw["topk_threshold_lr"] = s.batchtopk_threshold_lr
        if s.architecture == "matryoshka":
            kw["matryoshka_widths"] = prefixes(s, s.n_latents)
    return ARCHITECTURE[s.architecture], kw


def trainer_config(cfg: Config):
    """SAELens's SAETrainerConfig for `cfg`'s budget and schedule (no wandb, no checkpoints)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    t, B = cfg.train, cfg.data.batch_size
    decay_start = max(int(round(t.steps * (1 - t.lr_decay_frac))), t.lr_warmup_steps)  # trainer.lr_schedule's
    return SAETrainerConfig(
        total_training_samples=t.steps * B,
        train_batch_size_samples=B,
        lr=t.lr,
        lr_end=t.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=t.lr_warmup_steps,
        lr_decay_steps=t.steps - decay_start,
        adam_beta1=t.adam_b1,
        adam_beta2=t.adam_b2,
        device="cpu",
        dead_feature_window=math.ceil(t.dead_tokens / B),  # steps without firing; ours counts tokens
        feature_sampling_window=t.steps,
        logger=LoggingConfig(log_to_wandb=False),
    )


def build_sae(cfg: Config, overrides: dict | None = None):
    """A fresh SAELens TrainingSAE for `cfg` (seeded by train.seed), `overrides` applied over `saelens_config`."""
    import torch
    from sae_lens.registry import get_sae_training_class

    arch, kw = saelens_config(cfg)
    sae_cls, cfg_cls = get_sae_training_class(arch)
    torch.manual_seed(cfg.train.seed)
    return sae_cls(cfg_cls(**(kw | (overrides or {}))))


def train_saelens(cfg: Config, out: Path, overrides: dict | None = None, progress: bool = False) -> dict:
    """Train SAELens's SAE for `cfg` on `cfg`'s batches; write out/{config.yaml, saelens.json, sae/, eval.json}.

    Returns eval.json's dict (`sae_jax.run.score` of the SAE read back through our SAELens loader).
    """
    import sae_lens.training.sae_trainer as sae_trainer
    import torch

    from sae_jax.data import make_source
    from sae_jax.formats.saelens import load_saelens
    from sae_jax.run import estimate_scale, final_eval

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = make_source(cfg)
    scale = estimate_scale(source, cfg.train.scale_batches, cfg.sae.d_in)  # the batches our run spends on it
    sae = build_sae(cfg, overrides)
    batches = (torch.from_numpy(np.asarray(source.next_batch(), np.float32)) for _ in itertools.count())
    trainer = sae_trainer.SAETrainer(trainer_config(cfg), sae, batches)
    trainer.activation_scaler.scaling_factor = scale  # scales each batch; fit() folds it into the weights
    bar = functools.partial(sae_trainer.tqdm, disable=not progress)
    with mock.patch.object(sae_trainer, "tqdm", bar):  # fit() draws its own bar
        trainer.fit()
    sae.save_inference_model(out / "sae")
    ours = load_saelens(out / "sae", cfg.sae.hook_layer, cfg.sae.hook_site)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    arch, kw = saelens_config(cfg)
    (out / "saelens.json").write_text(
        json.dumps({"architecture": arch, **kw, **(overrides or {}), "scale": scale}) + "\n"
    )
    return final_eval(ours, source, cfg.run.eval_batches, out / "eval.json", cfg)


def finished(cfg: Config, out: Path, overrides: dict | None = None) -> dict | None:
    """eval.json of a finished `train_saelens(cfg, out, overrides)`, or None (absent, or another config's)."""
    out = Path(out)
    try:
        same = yaml.safe_load((out / "config.yaml").read_text()) == to_dict(cfg)
        saved = json.loads((out / "saelens.json").read_text())
        ev = json.loads((out / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    arch, kw = saelens_config(cfg)
    want = json.loads(json.dumps({"architecture": arch, **kw, **(overrides or {})}))
    return ev if same and {k: saved.get(k) for k in want} == want else None
