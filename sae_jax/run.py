"""The training loop: resume, step, log, checkpoint, export.

Rerunning the same config continues from the newest complete checkpoint in
`run.out_dir` and ends with the same params as a run never stopped. The rerun
may change run.*, the mesh and the kernel (SPEED_ONLY): those change how the
params are computed, not what they are. With several processes
(`mesh.distributed`), every one computes and checkpoints; process 0 alone
writes config.yaml, metrics.jsonl, sae/ and eval.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm import tqdm

from sae_jax import sharding
from sae_jax.atomic import atomic_write_text, remove_leftovers
from sae_jax.checkpoint import Checkpoints, largest_leaf_bytes
from sae_jax.config import Config, ConfigError, to_dict
from sae_jax.data import Source, make_source
from sae_jax.errors import Interrupted, NonFiniteError
from sae_jax.metrics import quick_eval
from sae_jax.sae import SAE, fold_input_scale
from sae_jax.trainer import (
    NONFINITE,
    STEP_AVERAGED,
    TrainState,
    abstract_state,
    init_state,
    kernel,
    make_step,
    spec_from_config,
)


@dataclasses.dataclass
class RunResult:
    state: TrainState
    scale: float  # the input scale the params were trained at
    run_dir: Path
    sae: SAE | None  # the exported SAE (raw-activation units), None if stopped early
    start: int  # the step this call began at: 0, or the checkpoint it resumed from


def estimate_scale(source: Source, n_batches: int, d_in: int) -> float:
    """The factor that makes the mean activation norm sqrt(D), from the next `n_batches` batches."""
    norms = [np.linalg.norm(source.next_batch().astype(np.float64), axis=1).mean() for _ in range(n_batches)]
    mean = float(np.mean(norms))
    if not math.isfinite(mean) or mean <= 0:
        raise NonFiniteError(f"input scale: expected a finite positive mean activation norm, found {mean}")
    return math.sqrt(d_in) / mean


def exported_sae(state: TrainState, cfg: Config, scale: float, source: str) -> SAE:
    """The trained SAE with the input scale folded in (it takes raw activations), gathered from every process;
    its metadata says what it was trained on (SAELens's fields, carried into SAELens exports)."""
    meta = training_metadata(cfg)
    spec = dataclasses.replace(
        spec_from_config(cfg),
        input_scale=scale,
        source=source,
        metadata=json.dumps(meta, sort_keys=True) if meta else "",
    )
    return fold_input_scale(SAE(sharding.gathered(state.params), spec))


def training_metadata(cfg: Config) -> dict:
    """SAELens's metadata fields for a run on a Llama's activations (model, text, context size, BOS); else none."""
    d = cfg.data
    if d.source != "llama":
        return {}
    return {
        "model_name": Path(d.model.path).name,
        "dataset_path": d.text.path,
        "context_size": d.text.context_size,
        "prepend_bos": True,
    }


def writes_files() -> bool:
    """Whether this process writes the run's files: process 0 of several (all of them compute)."""
    return jax.process_index() == 0


def open_run_dir(cfg: Config) -> Path:
    """Create `run.out_dir`, refuse one holding another run; on process 0, clear a killed run's temporaries and
    write config.yaml."""
    run_dir = Path(cfg.run.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.out_dir: expected a directory, found a file at {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.out_dir: cannot create {run_dir} ({e.strerror or e})") from None
    _check_same_run(run_dir, cfg)
    if not writes_files():
        return run_dir
    for name in ("config.yaml", "metrics.jsonl", "sae", "eval.json"):
        remove_leftovers(run_dir / name)
    try:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    except OSError as e:
        raise ConfigError(f"run.out_dir: cannot write in {run_dir} ({e.strerror or e})") from None
    return run_dir


# train.* keys that change how the step is computed, not what: the same loss and gradients up to
# the order of float32 sums (in bfloat16 too: both kernels multiply the same bf16 inputs), so a run
# may resume with another value. (compute_dtype is not one: bfloat16 matmul inputs change the numbers.)
SPEED_ONLY = {"train.kernel", "train.sparse_k_max", "train.sparse_encoder_grad"}


def _check_same_run(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run directory written by a different sae.*, data.* or train.* config.

    run.*, mesh.* (the checkpoint restores into the new mesh's shardings) and SPEED_ONLY may differ.
    """
    old_path = run_dir / "config.yaml"
    if not old_path.exists():
        return
    try:
        old = yaml.safe_load(old_path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{old_path}: unreadable ({type(e).__name__}); use another run.out_dir") from None
    new = to_dict(cfg)
    for section in ("sae", "data", "train"):
        if not isinstance(old, dict) or not isinstance(old.get(section, {}), dict):
            raise ConfigError(
                f"{old_path}: expected the config a run wrote, found {type(old).__name__}; use another run.out_dir"
            )
        for key, value in _flatten(new[section], section).items():
            was = _flatten(old.get(section, {}), section).get(key)
            if was != value and key not in SPEED_ONLY:
                raise ConfigError(
                    f"{key}: {run_dir} holds a run with {was!r}, this config says {value!r}; use another run.out_dir"
                )


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics lines after `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    kept = []
    for l in lines:
        try:
            if json.loads(l)["step"] <= step:
                kept.append(l)
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def _quiet(line: str) -> None:
    pass


def is_complete(cfg: Config) -> bool:
    """Whether `run.out_dir` already holds this run, finished: its last checkpoint, exported SAE and eval.json."""
    run_dir = Path(cfg.run.out_dir)
    if not (run_dir / "sae" / "spec.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    if cfg.run.eval_batches and not (run_dir / "eval.json").is_file():
        return False
    _check_same_run(run_dir, cfg)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())
    return bool(steps) and steps[-1] == cfg.train.steps


def train(cfg: Config, *, stop_after: int | None = None, progress: bool = True, say=_quiet) -> RunResult:
    """Train (or resume) the run `cfg` describes. `stop_after`: return after that step, unsaved, as if killed.

    `say(line)` hears each phase (loading, resuming, compiling, exporting). The config is checked against the
    data (the model's width and layers) before anything is written.
    Ctrl-C waits for the checkpoint being written, then raises `Interrupted` naming the one kept.
    With `mesh.distributed`, every process calls this with the same `cfg` (sharding.start_distributed runs first).
    """
    if cfg.mesh.distributed:
        sharding.start_distributed()
    say(
        f"opening the {cfg.data.source} source"
        + (f" (model {cfg.data.model.path})" if cfg.data.source == "llama" else "")
    )
    source = make_source(cfg)
    run_dir = open_run_dir(cfg)
    like = abstract_state(cfg)
    ckpts = Checkpoints(run_dir / "checkpoints", cfg.run.keep, largest_leaf_bytes(like))
    metrics_path = run_dir / "metrics.jsonl"
    try:
        restored = ckpts.restore_latest(like)
        if restored:
            start, state, meta = restored
            say(f"resuming {run_dir} from checkpoint {start}")
            scale = float(meta["scale"])
            source.restore(meta["data"])
        else:
            start, state = 0, init_state(cfg)
            say(f"estimating the input scale from {cfg.train.scale_batches} batches of {cfg.data.batch_size} tokens")
            scale = estimate_scale(source, cfg.train.scale_batches, cfg.sae.d_in)
        if writes_files():
            _keep_metrics_until(metrics_path, start)
        try:
            state = _loop(cfg, state, start, scale, source, ckpts, metrics_path, stop_after, progress, say)
        except KeyboardInterrupt:
            ckpts.wait()
            last = ckpts.latest_step()
            kept = f"checkpoint {last} kept" if last is not None else "no checkpoint was saved yet"
            raise Interrupted(f"{kept}; rerun the same command to resume") from None
    finally:
        try:
            ckpts.wait()
        finally:
            ckpts.close()
    done = int(state.step) >= cfg.train.steps
    sae = None
    if done:
        from sae_jax.formats import save_sae

        say(f"exporting the SAE to {run_dir / 'sae'}")
        sae = exported_sae(state, cfg, scale, str(run_dir))
        if writes_files():
            save_sae(sae, run_dir / "sae", format="jax", overwrite=True)
            if cfg.run.eval_batches:
                say(f"held-out evaluation on {cfg.run.eval_batches} unseen batches")
                final_eval(sae, source, cfg.run.eval_batches, run_dir / "eval.json", cfg)
    return RunResult(state, scale, run_dir, sae, start)


def score(sae: SAE, source: Source, n_batches: int, cfg: Config) -> dict:
    """`quick_eval` of `sae` on the next `n_batches` batches of `source`; on synthetic data, beside it under
    "ground_truth", its scores against the known directions (`groundtruth.score_synthetic`: recovery, MCC, F1...)."""
    x = np.concatenate([source.next_batch() for _ in range(n_batches)])
    result = {"tokens": int(x.shape[0]), **quick_eval(sae, x)}
    if cfg.data.source == "synthetic":
        from sae_jax.groundtruth import score_synthetic

        result["ground_truth"] = score_synthetic(sae, cfg)
    return result


def final_eval(sae: SAE, source: Source, n_batches: int, path: Path, cfg: Config) -> dict:
    """`score` of the exported SAE on the next `n_batches` (unseen) batches, written to `path`."""
    result = score(sae, source, n_batches, cfg)
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def batch_placer(cfg: Config) -> Callable[[np.ndarray], jax.Array]:
    """x: [B, D] host batch -> on device: this process's rows placed with the mesh's batch sharding."""
    mesh = sharding.make_mesh(cfg)
    rows = sharding.process_rows(mesh, cfg.data.batch_size)
    return lambda x: sharding.place_batch(mesh, x[rows])


def _loop(cfg, state, start, scale, source, ckpts, metrics_path, stop_after, progress, say) -> TrainState:
    t, B = cfg.train, cfg.data.batch_size
    step_fn, put = make_step(cfg), batch_placer(cfg)
    scale_dev = jnp.float32(scale)
    # On the CPU the step's temporaries are host memory: waiting for each step (once the next batch is ready)
    # keeps one step's in use at a time. On an accelerator the host is free to run ahead.
    one_at_a_time = jax.default_backend() == "cpu"
    end = t.steps if stop_after is None else min(t.steps, stop_after)
    bar = tqdm(
        total=t.steps, initial=start, disable=not progress or not writes_files(), unit="step", dynamic_ncols=True
    )
    if start < end:
        which = kernel(spec_from_config(cfg), t, cfg.sae)
        say(
            f"compiling the training step (B={B}, D={cfg.sae.d_in}, N={cfg.sae.n_latents}, kernel {which}"
            f"{' from auto' if t.kernel == 'auto' else ''}); the first step waits on it"
        )
    last_time, last_step, skipped, since_log = time.perf_counter(), start, 0, {}
    with (
        open(metrics_path, "a") if writes_files() else contextlib.nullcontext() as mfile,
        _ctrl_c_between_steps() as asked,
    ):
        pos = source.state()
        x = put(source.next_batch()) if start < end else None
        for step in range(start, end):
            state, m = step_fn(state, x, scale_dev)
            # Which way each step went, summed on the device until the next log line (no sync per step).
            since_log = {k: m[k] + since_log.get(k, 0.0) for k in STEP_AVERAGED if k in m}
            done = step + 1
            # The next batch is prepared while the step runs; `pos` is where it starts.
            pos = source.state()
            x = put(source.next_batch()) if done < end else None
            if one_at_a_time:
                jax.block_until_ready(state)
            log_now = done % cfg.run.log_every == 0 or done == t.steps
            save_now = done % cfg.run.save_every == 0 or done == t.steps
            if log_now or save_now:
                skipped = _check_finite(state, done, t.on_nonfinite, ckpts)
            if log_now:
                m = {k: float(v) for k, v in sharding.to_host({**m, **since_log}).items()}
                m.update({k: m[k] / (done - last_step) for k in since_log})
                since_log = {}
                now = time.perf_counter()
                m.update(
                    step=done,
                    tokens=done * B,
                    tokens_per_s=(done - last_step) * B / max(now - last_time, 1e-9),
                    skipped=skipped,
                )
                if cfg.run.eval_every and done % cfg.run.eval_every == 0 and x is not None:
                    # x is the next batch, not yet trained on: held-out for the params as they are now.
                    held_out = quick_eval(SAE(state.params, spec_from_config(cfg)), x * scale_dev)
                    m.update({f"eval_{k}": v for k, v in held_out.items()})
                last_time, last_step = now, done
                if mfile:
                    mfile.write(json.dumps(m) + "\n")
                    mfile.flush()
                shown = dict(
                    tok_s=f"{m['tokens_per_s']:.3g}",
                    loss=f"{m['loss']:.4g}",
                    L0=f"{m['l0']:.1f}",
                    EV=f"{m['explained_variance']:.3f}",
                    dead=f"{m['dead_fraction']:.3f}",
                )
                bar.set_postfix(shown)
                if not progress and writes_files():
                    say(f"step {done}/{t.steps}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
            if save_now:
                ckpts.save(done, state, {"data": pos, "scale": scale})
            bar.update(1)
            if asked():
                raise KeyboardInterrupt
    bar.close()
    return state


@contextlib.contextmanager
def _ctrl_c_between_steps():
    """Ctrl-C stops the loop at the next step boundary (yields `asked()`), never inside orbax or XLA, which may
    swallow the exception mid-save; a second Ctrl-C interrupts at once. Outside the main thread: unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    asked = []

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_finite(state: TrainState, done: int, mode: str, ckpts: Checkpoints) -> int:
    """The count of skipped steps, checked before anything is logged or saved.

    Raises NonFiniteError at the first skipped step when `mode` is 'stop', and in
    either mode when the params themselves are non-finite: finite gradients can
    still step to them (a learning rate that overflows float32), and no skipped
    batch can bring them back.
    """
    skipped, (bad_step, what), params_ok = sharding.to_host((state.skipped, state.first_bad, _all_finite(state.params)))
    last = ckpts.latest_step()
    kept = (
        f"the last good checkpoint, step {last}, is kept" if last is not None else "no checkpoint was saved before it"
    )
    if mode == "stop" and bad_step >= 0:
        raise NonFiniteError(
            f"step {int(bad_step) + 1}: non-finite {NONFINITE[int(what)]}; stopped (train.on_nonfinite=stop), {kept}"
        )
    if not params_ok:
        raise NonFiniteError(
            f"by step {done}: non-finite params (an update overflowed; is train.lr too large?); stopped, {kept}"
        )
    return int(skipped)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))
