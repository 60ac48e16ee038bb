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

Multi-host. With `mesh.distributed: true`, `run.train` first calls
`jax.distributed.initialize()` (`start_distributed`). Start the same command
on every host, one process each:

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=P JAX_PROCESS_ID=i \
        sae-jax train --config X.yaml --set mesh.distributed=true

with i = 0 on host0 (it serves the coordinator at that port) and 1 .. P-1 on
the others. JAX reads JAX_COORDINATOR_ADDRESS itself; the other two are read
here (jax 0.10 does not). Under SLURM, Open MPI, Cloud TPU or Kubernetes all
three may be left unset for JAX's cluster detection. On CPU the processes
reduce through gloo (jax's default `jax_cpu_collectives_implementation`).
`jax.devices()` then lists every host's devices, host by host, and
`data * model` must equal their total count (a ConfigError otherwise). The
mesh takes them in that order: with `model` = one host's device count, each
host holds one `data` row of the mesh and only the gradient all-reduce
crosses hosts; a larger `model` splits the latents across hosts too.

Every host builds the same data source (same seed, same position) and keeps
only its rows of each batch, `process_rows(mesh, B)` (B/P of them when the
`data` axis spans the hosts), which `place_batch` assembles into the global
[B, D] array without copying between hosts. So the global batch, the input
scale and the data position saved in checkpoints are those of a one-process
run, and a run may resume on another number of hosts or another mesh. The
cost: each host produces the whole batch to keep its share, cheap for the
synthetic and disk sources but P Llama forwards per batch for source 'llama';
avoiding it needs each source to split its own input (shard files, text rows)
by process. Every process saves and restores the checkpoints through orbax
into one shared directory (an unreadable one: `checkpoint.Checkpoints`).
Every process gathers the params for the export (`to_host`); process 0 alone
writes config.yaml, metrics.jsonl, sae/ and eval.json.

Tested with real processes (tests/test_multihost.py): 2 on localhost, 2 fake
CPU devices each, through train.py on {data: 2, model: 2}, stopped and
resumed, and resumed on {data: 1, model: 4} past checkpoints unreadable on
one or both processes: the exported params match one device's within 1e-5
(measured 3e-7), each resume starts at the checkpoint's step, and each output
file is written once, by process 0.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax.sae import SAEParams

AXES = ("data", "model")
ENV_PROCESSES, ENV_PROCESS_ID = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def start_distributed(environ: Mapping[str, str] = os.environ) -> None:
    """`jax.distributed.initialize()`, before any JAX computation; does nothing when already started.

    The process count and id come from `environ`'s JAX_NUM_PROCESSES and
    JAX_PROCESS_ID where set, else from JAX's cluster detection; JAX reads
    JAX_COORDINATOR_ADDRESS itself. A bad value or a failed start is a
    one-line ConfigError.
    """
    from sae_jax.config import ConfigError

    if jax.distributed.is_initialized():
        return
    args = {}
    for key, arg in ((ENV_PROCESSES, "num_processes"), (ENV_PROCESS_ID, "process_id")):
        if environ.get(key) is not None:
            try:
                args[arg] = int(environ[key])
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, found {environ[key]!r}") from None
    try:
        jax.distributed.initialize(**args)
    except (ValueError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"mesh.distributed: jax.distributed.initialize() failed ({first}); "
            f"expected JAX_COORDINATOR_ADDRESS, {ENV_PROCESSES} and {ENV_PROCESS_ID} or a cluster JAX detects"
        ) from None


def make_mesh(cfg, devices: list | None = None) -> Mesh:
    """The (data, model) mesh of `cfg.mesh`, over the first data*model of `devices` (default: all of them).

    A mesh that does not fit the devices, the batch or the latents is a one-line ConfigError.
    """
    from sae_jax.config import ConfigError

    data, model = cfg.mesh.data, cfg.mesh.model
    devices = jax.devices() if devices is None else devices
    if jax.process_count() > 1 and data * model != len(jax.devices()):
        raise ConfigError(
            f"mesh: expected data * model = {len(jax.devices())}, the devices of all {jax.process_count()} processes, "
            f"found {data} * {model} = {data * model}"
        )
    if data * model > len(devices):
        raise ConfigError(
            f"mesh: expected data * model <= {len(devices)} devices, found {data} * {model} = {data * model}"
        )
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
    # jumprelu's threshold [N] follows the latents.
    with_threshold = dataclasses.replace(params, threshold=NamedSharding(mesh, P("model")))
    tree = jax.tree.map(
        lambda x: (
            (params if x.threshold is None else with_threshold)
            if isinstance(x, SAEParams)
            else NamedSharding(mesh, P())
        ),
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
        raise ConfigError(
            f"mesh: expected this process's devices to hold adjacent rows of the batch, found rows {spans}"
        )
    return slice(spans[0][0], spans[-1][1])


def place_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """local: [B/P, D], this process's `process_rows` of the batch -> x: [B, D] with `batch_sharding`."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def gathered(tree: Any) -> Any:
    """Every array leaf whole on this process: one spanning several processes gathered from them (as `to_host`),
    the others as they are, with no copy.

    With several processes, every one must call it with the same tree (the gathers are collectives).
    """
    whole = lambda a: not isinstance(a, jax.Array) or a.is_fully_addressable
    return jax.tree.map(lambda a: a if whole(a) else to_host(a), tree)


def to_host(tree: Any) -> Any:
    """Every array leaf as a numpy array of its whole value; one spanning several processes is gathered from them.

    With several processes, every one must call it with the same tree (the gathers are collectives).
    """

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return multihost_utils.process_allgather(a, tiled=True)
        return np.asarray(jax.device_get(a))

    return jax.tree.map(get, tree)
