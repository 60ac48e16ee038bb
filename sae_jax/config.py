"""Typed run configuration: YAML in, frozen dataclasses out, every error one line.

Each field is documented where it is declared (`help=`); that text is also the
CLI's `--help-config`. A wrong key, type or value raises `ConfigError` naming
the key path before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sae_jax import typed
from sae_jax.errors import ConfigError


def opt(default: Any, help: str) -> Any:
    """A config field with a default and its documentation."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _copy(x):
    return dataclasses.replace(x) if dataclasses.is_dataclass(x) else type(x)(x)


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"] = opt(
        "relu",
        "Training recipe (sae_jax/arch/): 'relu' (the release), 'topk' (k largest per token), "
        "'batchtopk' (the B*k largest per batch), 'jumprelu' (a trained threshold per latent) or 'matryoshka' "
        "(nested prefixes over a batchtopk code). batchtopk and matryoshka export as jumprelu with their threshold.",
    )
    d_in: int = opt(2048, "D, the width of the activations (Llama-3.2-1B: 2048).")
    expansion: int = opt(16, "N = expansion * D latents (release: 16, so N = 32768).")
    k: int | None = opt(
        None,
        "Active latents per token for topk, batchtopk and matryoshka (a batch mean); unset otherwise.",
    )
    hook_layer: int = opt(9, "Decoder layer whose residual stream the SAE reads.")
    hook_site: Literal["input", "output"] = opt(
        "input", "'input': entering the layer (the notebook's hook, hidden_states[L]); 'output': leaving it."
    )
    dec_init_norm: float = opt(0.1, "Norm of each decoder row at init; the encoder starts as the decoder's transpose.")
    pre_encoder_bias: bool = opt(
        False,
        "Encode x - b_dec instead of x (SAELens's apply_b_dec_to_input; the release does not).",
    )
    unit_norm_decoder: bool | None = opt(
        None,
        "Unit-norm decoder rows, gradients projected (OpenAI 2024); topk family only; null: false.",
    )
    auxk_normalize: bool = opt(
        False,
        "Divide AuxK by the residual's variance (OpenAI's normalized MSE); false: the plain squared error.",
    )
    batchtopk_threshold_lr: float = opt(
        0.01,
        "batchtopk/matryoshka: rate r of theta <- (1 - r) theta + r min(kept activation) (SAELens).",
    )
    batchtopk_token_topk_frac: float = opt(
        0.0,
        "batchtopk/matryoshka: fraction of training, at the start, coded per token (each token's k largest, as "
        "topk) before the batch's B*k largest take over; theta tracks the batch code throughout. 0: never. Dense "
        "kernel only.",
    )
    matryoshka_prefixes: list = opt(
        [],
        "matryoshka: inner prefix sizes, increasing, each in [k, N); N is always the last. []: N/2.",
    )
    jumprelu_bandwidth: float = opt(
        0.05,
        "jumprelu: eps, the straight-through rectangle kernel's width (SAELens's 0.05 at input norm sqrt(D)).",
    )
    jumprelu_init_threshold: float = opt(0.01, "jumprelu: every theta_i at init (SAELens).")
    l0_coefficient: float = opt(1.0, "jumprelu: lambda of the sparsity penalty (SAELens's l0_coefficient default).")
    l0_warmup_frac: float = opt(
        0.05,
        "jumprelu: fraction of training over which lambda rises linearly from 0 (Gemma Scope).",
    )
    jumprelu_sparsity: Literal["l0", "tanh"] = opt(
        "l0",
        "jumprelu: 'l0', sum_i H(pre_i - theta_i) (Rajamanoharan 2024), or 'tanh' (Anthropic, January 2025).",
    )
    jumprelu_tanh_scale: float = opt(4.0, "jumprelu, sparsity 'tanh': c (Anthropic, January 2025).")
    # Anthropic's January 2025 update trains JumpReLU with this loss to revive dead latents, and SAELens's jumprelu
    # has it (pre_act_loss_coefficient; 3e-6 in its recipe for Anthropic's setup, other units). 3e-3 measured here:
    # on configs/realistic.yaml it left 30% of latents dead against 78% without, recovery 0.84 -> 0.85, MCC
    # 0.92 -> 0.93. With the per-token phase below the yaml sets it to 0: after the switch the latents it revived
    # crowded the weak features (0.89 / 0.90 recovered with it, 0.92 / 0.93 without).
    jumprelu_pre_act_coefficient: float = opt(
        3e-3,
        "jumprelu: lambda_p of the pre-activation loss that revives dead latents (Anthropic, January 2025; SAELens).",
    )
    jumprelu_token_topk_frac: float = opt(
        0.0,
        "jumprelu: fraction of training, at the start, coded per token (each token's sae.k largest, AuxK, as topk) "
        "while theta learns to separate each latent's kept from its dropped pre-activations; then jumprelu. 0: never.",
    )

    @property
    def n_latents(self) -> int:
        return self.expansion * self.d_in

    def check(self, path: str) -> None:
        _positive(self, path, "d_in", "expansion", "dec_init_norm")
        _nonnegative(self, path, "hook_layer")
        topk_family = self.architecture in ("topk", "batchtopk", "matryoshka")
        token_phase = self.architecture == "jumprelu" and self.jumprelu_token_topk_frac > 0
        if topk_family or token_phase:
            if self.k is None or not 0 < self.k <= self.n_latents:
                why = " with sae.jumprelu_token_topk_frac > 0" if token_phase else ""
                raise ConfigError(
                    f"{path}.k: expected 1 <= k <= N = {self.n_latents} for {self.architecture}{why}, found {self.k}"
                )
        elif self.k is not None:
            raise ConfigError(f"{path}.k: expected unset for architecture {self.architecture!r}, found {self.k}")
        if self.unit_norm_decoder and not topk_family:
            raise ConfigError(
                f"{path}.unit_norm_decoder: expected null or false for {self.architecture!r} (topk family only), "
                "found true"
            )
        _positive(self, path, "jumprelu_bandwidth", "jumprelu_tanh_scale")
        _nonnegative(self, path, "l0_coefficient", "jumprelu_pre_act_coefficient", "jumprelu_init_threshold")
        _in_unit(self, path, "l0_warmup_frac")
        _in_unit(self, path, "batchtopk_threshold_lr")
        _in_unit(self, path, "batchtopk_token_topk_frac")
        _in_unit(self, path, "jumprelu_token_topk_frac")
        sizes = self.matryoshka_prefixes
        if not all(isinstance(m, int) and not isinstance(m, bool) for m in sizes) or sizes != sorted(set(sizes)):
            raise ConfigError(f"{path}.matryoshka_prefixes: expected strictly increasing integers, found {sizes}")
        if sizes and not (self.k or 1) <= sizes[0] <= sizes[-1] < self.n_latents:
            raise ConfigError(f"{path}.matryoshka_prefixes: expected sizes in [k, N = {self.n_latents}), found {sizes}")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    n_features: int = opt(512, "Size of the true dictionary of random unit directions.")
    active: float = opt(8.0, "Mean number of true features active per token (Bernoulli).")
    noise: float = opt(0.01, "Std of Gaussian noise added to each coordinate.")
    dict_seed: int = opt(1234, "Seed of the true dictionary, so a trained SAE can be scored against it.")
    zipf_exponent: float = opt(
        0.0,
        "Feature i fires with probability proportional to (i + 1)^-a (Zipf-like near 1); 0: all equally often.",
    )
    correlation: float = opt(
        0.0,
        "Correlation of firing within groups of `correlation_group` features (a Gaussian copula); 0: independent.",
    )
    correlation_group: int = opt(8, "Size of the groups of correlated features.")
    hierarchy_parents: int = opt(
        0,
        "The first P features are parents with `hierarchy_children` children each; a child fires only with its parent.",
    )
    hierarchy_children: int = opt(4, "Children per parent.")
    hierarchy_child_prob: float = opt(0.25, "Probability that a child fires when its parent fires.")
    magnitude_spread: float = opt(
        0.0,
        "Each feature's typical magnitude is exp(N(0, s^2)), times Uniform(0.5, 1.5) per firing; 0: all 1.",
    )

    def check(self, path: str) -> None:
        _positive(self, path, "n_features", "active", "correlation_group", "hierarchy_children")
        _nonnegative(self, path, "noise", "zipf_exponent", "hierarchy_parents", "magnitude_spread")
        _in_unit(self, path, "hierarchy_child_prob")
        if not 0 <= self.correlation < 1:
            raise ConfigError(f"{path}.correlation: expected 0 <= value < 1, found {self.correlation}")
        if self.hierarchy_parents * (1 + self.hierarchy_children) > self.n_features:
            raise ConfigError(
                f"{path}.hierarchy_parents: expected P * (1 + hierarchy_children) <= n_features = {self.n_features}, "
                f"found {self.hierarchy_parents} * {1 + self.hierarchy_children}"
            )
        if self.active > self.n_features:
            raise ConfigError(f"{path}.active: expected <= n_features = {self.n_features}, found {self.active}")


@dataclasses.dataclass(frozen=True)
class DiskConfig:
    path: str = opt("", "A .npy/.safetensors file, or a folder of them, each holding [T, D] activations.")
    key: str = opt("activations", "Tensor name inside .safetensors shards.")
    shuffle: bool = opt(True, "Shuffle tokens within each shard (seeded by data.seed, shard and epoch).")

    def check(self, path: str) -> None:
        if not self.path:
            raise ConfigError(f"{path}.path: expected a file or folder of activation shards, found nothing")
        if not Path(self.path).exists():
            raise ConfigError(f"{path}.path: expected an existing file or folder, found no such path {self.path!r}")


# Local dataset files and the `datasets` builder that reads each.
TEXT_FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    path: str = opt("", "A hub dataset id (e.g. 'lmsys/lmsys-chat-1m') or a local .jsonl/.json/.parquet file.")
    name: str | None = opt(None, "Hub dataset config name.")
    split: str = opt("train", "Hub dataset split (local files have only 'train').")
    streaming: bool = opt(True, "Stream rows instead of building an Arrow copy first.")
    cache_dir: str | None = opt(None, "Where a non-streaming load writes its Arrow cache (null: the datasets default).")
    field: str = opt(
        "conversation", "Row field: a list of {role, content} turns (chat-formatted) or a string (BOS + text)."
    )
    tokenizer: str = opt(
        "llama3-offline", "'llama3-offline' (built from llama-models' tiktoken file) or a tokenizer folder."
    )
    chat_date: str | None = opt(
        None,
        "The date a dated chat template renders (Llama-3.2-Instruct's 'Today Date'), e.g. '26 Jul 2024'; null: today.",
    )
    context_size: int = opt(1024, "T, tokens per sequence (release: 1024).")
    seqs_per_batch: int = opt(8, "S, sequences per forward pass.")
    pack: bool = opt(
        False, "Concatenate rows and cut T-token chunks, instead of one truncated, padded row per sequence."
    )
    exclude_special: bool = opt(
        True, "Keep no special-token positions (BOS, headers, eot): the BOS residual's norm is outsized."
    )
    buffer_tokens: int = opt(1 << 18, "C, shuffle-buffer capacity in tokens (each refill harvests C/2).")

    def check(self, path: str) -> None:
        if not self.path:
            raise ConfigError(f"{path}.path: expected a hub dataset id or a local file, found nothing")
        local = Path(self.path).expanduser()
        if local.suffix in TEXT_FILE_SUFFIXES and not local.is_file():
            raise ConfigError(f"{path}.path: expected an existing file, found no such file {self.path!r}")
        for name in ("context_size", "seqs_per_batch", "buffer_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: expected an integer > 0, found {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = opt("", "A local Hugging Face folder of a Llama-3 checkpoint (config.json + model.safetensors).")
    dtype: Literal["float32", "bfloat16"] = opt("bfloat16", "Compute dtype of the forward that harvests activations.")

    def check(self, path: str) -> None:
        if not (Path(self.path) / "config.json").is_file():
            raise ConfigError(
                f"{path}.path: expected a local Hugging Face folder with config.json, found {self.path!r} "
                "(nothing is downloaded: fetch the checkpoint first, e.g. "
                "`hf download meta-llama/Llama-3.2-1B-Instruct --local-dir DIR`)"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "disk", "llama"] = opt(
        "synthetic",
        "Where activations come from: 'synthetic' ground truth, 'disk' shards, or 'llama' (text through data.model).",
    )
    batch_size: int = opt(4096, "Tokens per training step (B).")
    seed: int = opt(0, "Seed of the data stream (sampling, shuffling).")
    synthetic: SyntheticConfig = opt(SyntheticConfig(), "Synthetic ground-truth activations.")
    disk: DiskConfig = opt(DiskConfig(), "Activations stored on disk.")
    model: ModelConfig = opt(ModelConfig(), "The Llama whose residual stream is harvested (source 'llama').")
    text: TextConfig = opt(TextConfig(), "The text fed to the model (source 'llama').")

    def check(self, path: str) -> None:
        _positive(self, path, "batch_size")
        for section in {"synthetic": ["synthetic"], "disk": ["disk"], "llama": ["model", "text"]}[self.source]:
            getattr(self, section).check(f"{path}.{section}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = opt(10_000, "Total optimizer steps.")
    lr: float = opt(5e-5, "Peak Adam learning rate.")
    lr_warmup_steps: int = opt(1000, "Steps of linear learning-rate warm-up from 0.")
    lr_decay_frac: float = opt(
        0.2, "Fraction of training, at the end, over which the learning rate decays linearly to 0."
    )
    adam_b1: float = opt(0.9, "Adam beta1.")
    adam_b2: float = opt(0.999, "Adam beta2.")
    grad_clip: float = opt(1.0, "Clip gradients to this global norm (0 disables).")
    l1_coefficient: float = opt(5.0, "lambda in loss = |x - x_hat|^2 + lambda * sum_i f_i |W_dec,i| (relu only).")
    l1_warmup_frac: float = opt(0.05, "Fraction of training over which lambda rises linearly from 0.")
    auxk_coefficient: float = opt(1 / 32, "Weight of the AuxK loss (topk only): dead latents fit the residual.")
    auxk_k: int = opt(256, "Dead latents used by AuxK (topk only).")
    dead_tokens: int = opt(10_000_000, "A latent is dead when it has not fired over this many tokens (M).")
    scale_batches: int = opt(10, "Batches used to estimate the input scale that makes the mean norm sqrt(D).")
    seed: int = opt(0, "Seed of the SAE init.")
    on_nonfinite: Literal["stop", "skip"] = opt(
        "stop",
        "On a non-finite loss, gradient or input: 'stop' (keep the last good checkpoint) or 'skip' the batch.",
    )
    kernel: Literal["auto", "dense", "sparse"] = opt(
        "auto",
        "'dense' (the reference), 'sparse' (active latents only; same gradients) or 'auto' (sparse where faster).",
    )
    sparse_k_max: int = opt(
        128,
        "Per-token sparse kernel (relu, batchtopk, matryoshka): active latents per token; tokens over it run dense.",
    )
    sparse_encoder_grad: Literal["matmul", "scatter"] = opt(
        "matmul",
        "How the sparse kernel forms W_enc's gradient: 'matmul' (one GEMM x^T @ dpre) or 'scatter' (O(B*K*D)).",
    )
    compute_dtype: Literal["float32", "bfloat16"] = opt(
        "float32", "Dtype of the matmul inputs (accumulated in float32); params and Adam state stay float32."
    )

    def check(self, path: str) -> None:
        _positive(self, path, "steps", "lr", "auxk_k", "dead_tokens", "scale_batches", "sparse_k_max")
        _nonnegative(self, path, "lr_warmup_steps", "grad_clip", "l1_coefficient", "auxk_coefficient")
        for name in ("lr_decay_frac", "l1_warmup_frac"):
            _in_unit(self, path, name)
        for name in ("adam_b1", "adam_b2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{path}.{name}: expected 0 <= value < 1, found {v}")
        if self.lr_warmup_steps > self.steps:
            raise ConfigError(f"{path}.lr_warmup_steps: expected <= steps = {self.steps}, found {self.lr_warmup_steps}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    out_dir: str = opt(
        "runs/default", "Run directory: resolved config, metrics.jsonl, checkpoints/, the exported sae/."
    )
    save_every: int = opt(1000, "Checkpoint every this many steps (and always at the end).")
    keep: int = opt(3, "How many of the latest checkpoints to keep.")
    log_every: int = opt(50, "Write a metrics.jsonl line and refresh the progress bar every this many steps.")
    eval_every: int = opt(
        500,
        "Held-out eval_* metrics on the next unseen batch every this many steps (a multiple of log_every; 0: never).",
    )
    eval_batches: int = opt(4, "Unseen batches drawn after the last step for the final eval.json (0: none).")

    def check(self, path: str) -> None:
        _positive(self, path, "save_every", "keep", "log_every")
        _nonnegative(self, path, "eval_every", "eval_batches")
        if self.eval_every % self.log_every:
            raise ConfigError(
                f"{path}.eval_every: expected a multiple of log_every = {self.log_every}, found {self.eval_every}"
            )
        if not self.out_dir:
            raise ConfigError(f"{path}.out_dir: expected a directory path, found nothing")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = opt(1, "Devices along the batch axis: each holds B/data tokens of every step (a divisor of B).")
    model: int = opt(
        1,
        "Devices along the latent axis: each holds N/model latents' params and Adam moments (a divisor of N).",
    )
    distributed: bool = opt(
        False,
        "Several processes, one per host, running the same command (jax.distributed; see the README).",
    )

    def check(self, path: str) -> None:
        _positive(self, path, "data", "model")


@dataclasses.dataclass(frozen=True)
class Config:
    sae: SAEConfig = opt(SAEConfig(), "The SAE's shape and hook site.")
    data: DataConfig = opt(DataConfig(), "The activation stream.")
    train: TrainConfig = opt(TrainConfig(), "The optimisation.")
    run: RunConfig = opt(RunConfig(), "Where and how often to write.")
    mesh: MeshConfig = opt(MeshConfig(), "Devices the step runs on (sae_jax.sharding); data * model of them.")

    def check(self, path: str = "") -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check(f"{path}{f.name}")


# --- checks shared by the sections -------------------------------------------------


def _positive(obj, path, *names):
    for n in names:
        v = getattr(obj, n)
        if not v > 0 or (isinstance(v, float) and not math.isfinite(v)):
            raise ConfigError(f"{path}.{n}: expected a finite number > 0, found {v}")


def _nonnegative(obj, path, *names):
    for n in names:
        v = getattr(obj, n)
        if not v >= 0 or (isinstance(v, float) and not math.isfinite(v)):
            raise ConfigError(f"{path}.{n}: expected a finite number >= 0, found {v}")


def _in_unit(obj, path, name):
    v = getattr(obj, name)
    if not 0 <= v <= 1:
        raise ConfigError(f"{path}.{name}: expected 0 <= value <= 1, found {v}")


# --- building typed config from plain data: sae_jax.typed ----------------------------


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    return typed.from_dict(cls, data, path, ConfigError)


_show, _plain = typed.show, typed.plain


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to nested plain data, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {_plain(assignment)}: expected key.path=value, found no '='")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {_plain(assignment)}: expected a dotted key path, found {key!r}")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, ValueError) as e:  # ValueError: an integer of over 4300 digits
        raise ConfigError(f"--set {_plain(key)}: value {_show(raw)} is not valid YAML ({type(e).__name__})") from None
    node = data
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {_plain(key)}: {_plain('.'.join(parts[: i + 1]))} is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read YAML at `path` (or defaults if None), apply `--set` overrides, type and check it."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: expected a YAML config file, found no such file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:  # ValueError: an integer of over 4300 digits
            raise ConfigError(
                f"{p}: not valid YAML ({(str(e).strip().splitlines() or [type(e).__name__])[0]})"
            ) from None
        except RecursionError:
            raise ConfigError(f"{p}: not valid YAML (nested too deeply)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, found {type(data).__name__}")
        _resolve_paths(data, p.parent)
    for o in overrides:
        apply_override(data, o)
    cfg = from_dict(Config, data)
    cfg.check()
    return cfg


# Keys holding paths. In a config file they are relative to the file's folder: run.out_dir always (its default
# too), the others
# when they name something there or start with ./ or ../ (else they stay as written: a hub id like
# lmsys/lmsys-chat-1m, or llama3-offline). `--set` values are relative to the working directory.
PATH_KEYS = ("data.model.path", "data.text.path", "data.text.tokenizer", "data.disk.path", "run.out_dir")


def _resolve_paths(data: dict, folder: Path) -> None:
    """Resolve PATH_KEYS in `data` (from the file in `folder`) in place; run.out_dir even when left to its default."""
    run = data.get("run", {}) if isinstance(data.get("run", {}), dict) else None
    if run is not None and "out_dir" not in run:
        data["run"] = {**run, "out_dir": RunConfig.out_dir}
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(name) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        joined = Path(os.path.normpath(folder / value))
        if key == "run.out_dir" or joined.exists() or value.startswith(("./", "../")):
            node[name] = str(joined)


def describe(cls=Config, path: str = "") -> list[str]:
    """One line per field: key path, default and its documentation."""
    lines = (
        [] if path else ["# Paths in a config file are relative to its folder; --set paths to the working directory."]
    )
    for f in dataclasses.fields(cls):
        key = f"{path}{f.name}"
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            lines += describe(t, key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{key} = {default!r}: {f.metadata.get('help', '')}")
    return lines
