"""Training on a device mesh: a `data` axis splits the batch, a `model` axis splits the latents.

With `mesh: {data: Dd, model: Dm}` in the config, the train state lives on a
`jax.sharding.Mesh` of Dd x Dm devices. Each device holds B/Dd tokens of every
batch and N/Dm latents: W_enc's columns [D, N/Dm], W_dec's rows [N/Dm, D],
b_enc and the dead-latent counter [N/Dm], and Adam's moments laid out like
their params; b_dec, the step and the scalars are replicated. The state is
created sharded (the init is jitted with these out_shardings), so an SAE too
large for one device is never materialised whole. XLA inserts the
collectives: the gradient all-reduce over `data`, and over `model` the sums
that contract N (decoding, the reconstruction error's gradient). B must be a
multiple of Dd and N of Dm.

Multi-host. Start the same command on every host with
`jax.distributed.initialize()` called first (on Cloud TPU and under SLURM
it needs no arguments; elsewhere pass `coordinator_address="host0:1234",
num_processes=P, process_id=i`). `jax.devices()` then lists every host's
devices, the mesh spans them all, and `data * model` must equal their total
count. Every host builds the same data source (same seed, same position) and
keeps only its rows of each batch, `process_rows(mesh, B)` (B/P of them when
the `data` axis spans the hosts), which `place_batch` assembles into the
global [B, D] array without copying between hosts. So the global batch, the
input scale and the data position saved in checkpoints are those of a
one-process run, and a run may resume on another number of hosts. The cost:
each host produces the whole batch to keep its share, cheap for the synthetic
and disk sources but P Llama forwards per batch for source 'llama'; avoiding
it needs each source to split its own input (shard files, text rows) by
process. Checkpoints are written by orbax from every host into one shared
directory. Only one process is tested (4 fake CPU devices, where a process's
rows are the whole batch); the export and final eval gather the params to one
host and are not yet written for several.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sae_jax.sae import SAEParams

AXES = ("data", "model")


def needs_mesh(cfg) -> bool:
    """Whether `cfg.mesh` asks for more than one device."""
    return cfg.mesh.data * cfg.mesh.model > 1


def make_mesh(cfg, devices: list | None = None) -> Mesh:
    """The (data, model) mesh of `cfg.mesh`, over the first data*model of `devices` (default: all of them).

    A mesh that does not fit the devices, the batch or the latents is a one-line ConfigError.
    """
    from sae_jax.config import ConfigError

    data, model = cfg.mesh.data, cfg.mesh.model
    devices = jax.devices() if devices is None else devices
    if data * model > len(devices):
        raise ConfigError(f"mesh: expected data * model <= {len(devices)} devices, found {data} * {model} = {data * model}")
    if cfg.data.batch_size % data:
        raise ConfigError(f"mesh.data: expected a divisor of data.batch_size = {cfg.data.batch_size}, found {data}")
    if cfg.sae.n_latents % model:
        raise ConfigError(f"mesh.model: expected a divisor of N = {cfg.sae.n_latents} latents, found {model}")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), AXES)


def param_shardings(mesh: Mesh) -> SAEParams:
    """Latents split over `model`: W_enc [D, N/m], b_enc [N/m], W_dec [N/m, D]; b_dec replicated."""
    s = lambda *spec: NamedSharding(mesh, P(*spec))
    return SAEParams(W_enc=s(None, "model"), b_enc=s("model"), W_dec=s("model", None), b_dec=s())


def state_shardings(mesh: Mesh, state: Any) -> Any:
    """A TrainState of shardings for `state` (arrays or ShapeDtypeStructs): every SAEParams in it
    (params, Adam's mu and nu) as `param_shardings`, since_fired over `model`, the rest replicated."""
    params = param_shardings(mesh)
    tree = jax.tree.map(
        lambda x: params if isinstance(x, SAEParams) else NamedSharding(mesh, P()),
        state,
        is_leaf=lambda x: isinstance(x, SAEParams),
    )
    return dataclasses.replace(tree, since_fired=NamedSharding(mesh, P("model")))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """x: [B, D] split over `data` by tokens."""
    return NamedSharding(mesh, P("data", None))


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of each [B, D] batch that this process's devices hold under `batch_sharding`: all B on one process."""
    from sae_jax.config import ConfigError

    index = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1))
    spans = sorted({idx[0].indices(batch_size)[:2] for idx in index.values()})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ConfigError(f"mesh: expected this process's devices to hold adjacent rows of the batch, found rows {spans}")
    return slice(spans[0][0], spans[-1][1])


def place_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """local: [B/P, D], this process's `process_rows` of the batch -> x: [B, D] with `batch_sharding` (B/P = B on one process)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
