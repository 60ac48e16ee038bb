"""Training on a (data, model) mesh of 4 fake CPU devices gives one device's params; the state is created sharded.

Also through `run.train`: batches placed by `sharding.place_batch`, and a run
resumed on other meshes (one device -> 2 x 2 -> 1 x 4) from its checkpoints.
Only one process: with several, each would pass `place_batch` its own rows.

The 4 devices are conftest.py's `jax_num_cpu_devices`; the checks run once per
module (`report`) and the tests assert on what they found.

Tolerance: sharding changes only the order of float32 sums (the gradient
all-reduce over `data`, the N-contractions over `model`). Over 5 Adam steps at
lr 1e-3 that measures <= 3.5e-7 of each param's largest entry (losses <= 9e-7;
6 steps of run.train: 2.4e-7 on 2 x 2, 1.6e-7 resumed across meshes);
TOL = 1e-5 leaves a ~30x margin, while a dropped all-reduce (each data shard
stepping on its own quarter of the batch) moves params by ~1 of that scale
(test_wrong_reduction_is_seen).
"""

from __future__ import annotations

import pytest

MESHES = {"one": (1, 1), "data": (4, 1), "model": (1, 4), "both": (2, 2)}
RUNS = [("relu", "dense"), ("relu", "sparse"), ("topk", "sparse"), ("topk", "sparse-scatter")]  # kernel[-encoder grad]
RUNS += [("batchtopk", "sparse")]
TOL = 1e-5
D, EXPANSION, B, STEPS = 16, 4, 32, 5
BIG = (256, 64)  # D, expansion: N = 16384, W_enc and W_dec 16 MiB each


@pytest.fixture(scope="module")
def report():
    return _checks()


@pytest.mark.parametrize("arch,kernel", RUNS)
@pytest.mark.parametrize("mesh", ["data", "model", "both"])
def test_sharded_training_matches_one_device(report, arch, kernel, mesh):
    r = report["runs"][f"{arch}/{kernel}/{mesh}"]
    assert r["devices"] == 4
    assert r["max_rel_diff"] <= TOL, r
    assert r["loss_rel_diff"] <= TOL, r


@pytest.mark.parametrize("mesh", ["data", "model", "both"])
def test_state_and_batch_shards_have_the_mesh_shapes(report, mesh):
    dm = MESHES[mesh]
    N = D * EXPANSION
    shapes = report["runs"][f"relu/dense/{mesh}"]["shard_shapes"]
    assert shapes["W_enc"] == [D, N // dm[1]]
    assert shapes["W_dec"] == [N // dm[1], D]
    assert shapes["b_enc"] == [N // dm[1]]
    assert shapes["b_dec"] == [D]
    assert shapes["mu.W_enc"] == [D, N // dm[1]] and shapes["nu.W_dec"] == [N // dm[1], D]
    assert shapes["since_fired"] == [N // dm[1]]


def test_wrong_reduction_is_seen(report):
    assert report["unreduced_rel_diff"] > 100 * TOL


def test_large_sae_is_created_and_restored_sharded_never_whole(report):
    big = report["big"]
    Db, N = BIG[0], BIG[0] * BIG[1]
    whole = Db * N * 4  # bytes of one of W_enc, W_dec, mu.*, nu.*
    assert big["shards"] == {"W_enc": [[Db, N // 4]] * 4, "W_dec": [[N // 4, Db]] * 4, "mu.W_enc": [[Db, N // 4]] * 4}
    assert big["distinct_devices"] == 4
    # Per device, XLA's own accounting of the compiled init: its outputs are a quarter of the six
    # [D, N] arrays (params and moments), and its temporaries about one shard, far from a whole array.
    assert big["output_bytes_per_device"] < 6 * whole / 4 + (1 << 20)
    assert big["temp_bytes_per_device"] < whole / 2
    assert big["matches_one_device_init"]  # bit for bit: the random bits are generated shard by shard
    assert big["restored_shards"] == [[N // 4, Db]] * 4 and big["restored_equal"]


def test_mesh_that_does_not_fit_is_a_config_error(report):
    assert report["errors"] == {
        "devices": "mesh: expected data * model <= 4 devices, found 4 * 2 = 8",
        "batch": "mesh.data: expected a divisor of data.batch_size = 30, found 4",
        "latents": "mesh.model: expected a divisor of N = 64 latents, found 3",
    }


@pytest.mark.parametrize("mesh", ["data", "model", "both"])
def test_placed_batch_has_the_batch_sharding_and_the_batch_values(report, mesh):
    dm = MESHES[mesh]
    assert report["placed"][mesh] == {
        "rows": [0, B],
        "batch_sharding": True,
        "equal": True,
        "shard_shapes": [[B // dm[0], D]] * 4,
    }


def test_run_train_on_a_mesh_matches_one_device(report):
    r = report["train"]
    # Every run places each step's batch on its mesh (one device is a 1x1 mesh): 6 + 6 steps, then 3, 3 and 2 resumed.
    assert r["placed"] == 6 + 6 + 3 + 3 + 2 and r["placed_with_batch_sharding"]
    assert r["both_rel_diff"] <= TOL, r


def test_run_resumed_on_other_meshes_continues_and_matches_one_device(report):
    r = report["train"]
    assert r["starts"] == [0, 0, 0, 2, 4] and r["steps"] == 6 and r["resumed_devices"] == 4
    assert r["resumed_rel_diff"] <= TOL, r


# --- the checks ----------------------------------------------------------------------------


def _checks() -> dict:
    import tempfile

    import jax
    import numpy as np

    from sae_jax import sharding
    from sae_jax.checkpoint import Checkpoints
    from sae_jax.config import ConfigError, load_config
    from sae_jax.trainer import _init_state, abstract_state, init_state, make_step

    def config(arch, kernel, mesh, d=D, expansion=EXPANSION, b=B):
        kernel, _, encoder_grad = kernel.partition("-")
        sets = [
            f"sae.d_in={d}",
            f"sae.expansion={expansion}",
            f"data.batch_size={b}",
            f"train.kernel={kernel}",
            f"train.sparse_encoder_grad={encoder_grad or 'matmul'}",
            "train.lr=1e-3",
            "train.lr_warmup_steps=0",
            "train.steps=100",
            f"mesh.data={mesh[0]}",
            f"mesh.model={mesh[1]}",
        ]
        if arch != "relu":
            sets += [
                f"sae.architecture={arch}",
                "sae.k=4",
                "train.auxk_k=8",
                "train.dead_tokens=64",
            ]  # dead latents by step 3
        return load_config(None, sets)

    batches = [np.random.default_rng(i).standard_normal((B, D)).astype(np.float32) for i in range(STEPS)]

    def train(cfg):
        state, step = init_state(cfg), make_step(cfg)
        losses = []
        for x in batches:
            state, m = step(state, x, np.float32(1.0))
            losses.append(float(m["loss"]))
        return state, losses

    def rel(a, b):
        la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
        return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)) for x, y in zip(la, lb))

    def shard_shape(a):
        return list(a.addressable_shards[0].data.shape)

    runs = {}
    for arch, kernel in RUNS:
        ref, ref_losses = train(config(arch, kernel, MESHES["one"]))
        for name in ("data", "model", "both"):
            state, losses = train(config(arch, kernel, MESHES[name]))
            mu, nu = state.opt_state[1][0].mu, state.opt_state[1][0].nu
            runs[f"{arch}/{kernel}/{name}"] = {
                "devices": len(state.params.W_enc.sharding.device_set),
                "max_rel_diff": rel(state.params, ref.params),
                "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
                "shard_shapes": {
                    **{k: shard_shape(getattr(state.params, k)) for k in ("W_enc", "W_dec", "b_enc", "b_dec")},
                    "mu.W_enc": shard_shape(mu.W_enc),
                    "nu.W_dec": shard_shape(nu.W_dec),
                    "since_fired": shard_shape(state.since_fired),
                },
            }

    # Each data shard stepping on its own quarter of the batch, without the all-reduce.
    cfg = config("relu", "dense", MESHES["one"], b=B // 4)
    state, step = init_state(cfg), make_step(cfg)
    for x in batches:
        state, _ = step(state, x[: B // 4], np.float32(1.0))
    ref, _ = train(config("relu", "dense", MESHES["one"]))
    unreduced = rel(state.params, ref.params)

    # A large SAE on a 1 x 4 model mesh: created sharded, compared with the one-device init.
    big_cfg = config("relu", "dense", (1, 4), d=BIG[0], expansion=BIG[1])
    mesh = sharding.make_mesh(big_cfg)
    out = sharding.state_shardings(mesh, jax.eval_shape(lambda: _init_state(big_cfg)))
    mem = jax.jit(lambda: _init_state(big_cfg), out_shardings=out).lower().compile().memory_analysis()
    big_state = init_state(big_cfg)
    shards = lambda a: [list(s.data.shape) for s in a.addressable_shards]
    one = jax.jit(lambda: _init_state(big_cfg))()  # the same program on one device
    big = {
        "shards": {
            "W_enc": shards(big_state.params.W_enc),
            "W_dec": shards(big_state.params.W_dec),
            "mu.W_enc": shards(big_state.opt_state[1][0].mu.W_enc),
        },
        "distinct_devices": len({s.device for s in big_state.params.W_enc.addressable_shards}),
        "output_bytes_per_device": mem.output_size_in_bytes,
        "temp_bytes_per_device": mem.temp_size_in_bytes,
        "matches_one_device_init": rel(big_state.params, one.params) == 0.0,
    }

    # A checkpoint of it restores shard by shard into `abstract_state`, as run.py resumes.
    ckpts = Checkpoints(tempfile.mkdtemp() + "/ckpt", keep=1)
    ckpts.save(1, big_state, {"scale": 1.0})
    ckpts.wait()
    _, restored, _ = ckpts.restore_latest(abstract_state(big_cfg))
    ckpts.close()
    big["restored_shards"] = shards(restored.params.W_dec)
    big["restored_equal"] = rel(restored.params, big_state.params) == 0.0

    errors = {}
    for name, sets in {"devices": (4, 2, B, 4), "batch": (4, 1, 30, 4), "latents": (1, 3, B, 4)}.items():
        cfg = load_config(
            None,
            [
                f"sae.d_in={D}",
                f"sae.expansion={sets[3]}",
                f"data.batch_size={sets[2]}",
                f"mesh.data={sets[0]}",
                f"mesh.model={sets[1]}",
            ],
        )
        try:
            sharding.make_mesh(cfg)
        except ConfigError as e:
            errors[name] = str(e)

    # A batch placed as run.py places it: this process's rows (here all B) assembled with the batch sharding.
    placed = {}
    for name in ("data", "model", "both"):
        mesh = sharding.make_mesh(config("relu", "dense", MESHES[name]))
        rows = sharding.process_rows(mesh, B)
        x = sharding.place_batch(mesh, batches[0][rows])
        placed[name] = {
            "rows": [rows.start, rows.stop],
            "batch_sharding": x.sharding == sharding.batch_sharding(mesh),
            "equal": bool((np.asarray(x) == batches[0]).all()),
            "shard_shapes": [list(s.data.shape) for s in x.addressable_shards],
        }
    return {
        "runs": runs,
        "unreduced_rel_diff": unreduced,
        "big": big,
        "errors": errors,
        "placed": placed,
        "train": _run_train(),
    }


def _run_train() -> dict:
    """run.train on one device, on a 2 x 2 mesh, and stopped and resumed on other meshes: params, start steps, batch shardings."""
    import tempfile
    from pathlib import Path

    import jax

    from sae_jax import run, sharding
    from sae_jax.config import load_config

    def cfg(out_dir, mesh):
        return load_config(
            None,
            [
                f"sae.d_in={D}",
                f"sae.expansion={EXPANSION}",
                f"data.batch_size={B}",
                "train.steps=6",
                "train.lr=1e-3",
                "train.lr_warmup_steps=0",
                "run.save_every=2",
                "run.eval_batches=0",
                f"run.out_dir={out_dir}",
                f"mesh.data={mesh[0]}",
                f"mesh.model={mesh[1]}",
            ],
        )

    starts, shardings, loop, place = [], [], run._loop, sharding.place_batch
    run._loop = lambda c, state, start, *a: starts.append(start) or loop(c, state, start, *a)
    sharding.place_batch = lambda mesh, local: (
        shardings.append((x := place(mesh, local)).sharding == sharding.batch_sharding(mesh)) or x
    )
    tmp = Path(tempfile.mkdtemp())
    one = run.train(cfg(tmp / "one", MESHES["one"]), progress=False)
    both = run.train(cfg(tmp / "both", MESHES["both"]), progress=False)
    # Checkpoints at 2 and 4: one device -> 2 x 2 from step 2 -> 1 x 4 from step 4.
    run.train(cfg(tmp / "resumed", MESHES["one"]), stop_after=3, progress=False)
    run.train(cfg(tmp / "resumed", MESHES["both"]), stop_after=5, progress=False)
    resumed = run.train(cfg(tmp / "resumed", MESHES["model"]), progress=False)
    run._loop, sharding.place_batch = loop, place
    rel = lambda a, b: max(
        float(abs(x - y).max() / max(abs(y).max(), 1e-30))
        for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
    )
    return {
        "both_rel_diff": rel(both.state.params, one.state.params),
        "resumed_rel_diff": rel(resumed.state.params, one.state.params),
        "starts": starts,
        "placed": len(shardings),
        "placed_with_batch_sharding": all(shardings),
        "resumed_devices": len(resumed.state.params.W_enc.sharding.device_set),
        "steps": int(resumed.state.step),
    }
