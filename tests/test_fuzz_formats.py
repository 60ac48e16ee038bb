"""Hostile SAE files: random bytes, truncations, flipped bytes and wrong-shaped tensors, as `.pt`,
`.safetensors`, SAELens folders and sae-jax folders, given to `load_sae` and to both converters.

Every case ends in one SAEFormatError line naming the file, or a correct SAE: for damage the
format cannot notice (a file restore does not read), bit-identical to the undamaged one; for
random tensors, exactly when they form a valid SAE, holding exactly those values. A failed
convert leaves nothing at the destination and no temporary sibling. Derandomized: the same cases
every run; SAE_FUZZ_EXAMPLES=2000 hunts with fresh random ones.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from sae_jax.formats import SAEFormatError, load_sae, save_sae
from sae_jax.sae import SAE, SAESpec, init_params

ROOT = Path(__file__).resolve().parents[1]
D, N = 4, 8
HUNT = int(os.environ.get("SAE_FUZZ_EXAMPLES", 0))


def fuzz(n: int):
    return settings(
        max_examples=HUNT or n,
        deadline=None,
        derandomize=not HUNT,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


RELEASE_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
SAELENS_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float64": np.float64,
    "int32": np.int32,
}


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """One valid SAE in every format; cases copy these and damage the copy."""
    d = tmp_path_factory.mktemp("templates")
    spec = SAESpec("relu", D, N)
    params = init_params(jax.random.key(0), spec)
    params = jax.tree.map(lambda a: a + 0.25, params)  # nonzero biases
    sae = SAE(params, spec)
    return {
        "jax": save_sae(sae, d / "jax"),
        "pt": save_sae(sae, d / "release.pt", "pt"),
        "safetensors": save_sae(sae, d / "release.safetensors", "safetensors"),
        "saelens": save_sae(sae, d / "saelens", "saelens"),
        "sparsify": save_sae(SAE(params, SAESpec("topk", D, N, k=2)), d / "layers.8", "sparsify"),
    }


def fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz_"))


def copy_of(template: Path, into: Path) -> Path:
    dst = into / template.name
    (shutil.copytree if template.is_dir() else shutil.copyfile)(template, dst)
    return dst


def files_of(sae_path: Path) -> list[Path]:
    return sorted(p for p in sae_path.rglob("*") if p.is_file()) if sae_path.is_dir() else [sae_path]


def load_outcome(path: Path):
    """The SAE, or the one-line message of the SAEFormatError; anything else fails the test."""
    try:
        sae = load_sae(path)
    except SAEFormatError as e:
        msg = str(e)
        assert "\n" not in msg and " ()" not in msg and msg.startswith(str(path)), (
            msg
        )  # one line; no empty "()" where a cause goes
        event("one-line error")
        return msg
    event("loaded")
    return sae


def assert_valid(sae: SAE) -> None:
    for name, shape in sae.spec.shapes().items():
        a = np.asarray(getattr(sae.params, name))
        assert a.shape == shape and a.dtype.name == sae.spec.dtype and np.isfinite(a.astype(np.float32)).all()


def same_bits(a: SAE, b: SAE) -> bool:
    return (
        all(
            np.asarray(getattr(a.params, k)).tobytes() == np.asarray(getattr(b.params, k)).tobytes()
            for k in SAELENS_KEYS
        )
        and a.spec.dtype == b.spec.dtype
    )


# --- damaged files: an error, or exactly the undamaged SAE ---------------------------

damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("zero"), st.just(0.0)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("delete"), st.just(0.0)),
)


def apply(how, f: Path) -> None:
    kind, arg = how
    b = f.read_bytes()
    if kind == "truncate":
        f.write_bytes(b[: int(len(b) * arg)])
    elif kind == "flip" and b:
        i = int(len(b) * arg)
        f.write_bytes(b[:i] + bytes([b[i] ^ 0x5A]) + b[i + 1 :])
    elif kind == "zero":
        f.write_bytes(bytes(len(b)))
    elif kind == "bytes":
        f.write_bytes(arg)
    elif kind == "delete":
        f.unlink()


@fuzz(80)
@given(
    fmt=st.sampled_from(["jax", "pt", "safetensors", "saelens", "sparsify"]),
    which=st.floats(0, 1, exclude_max=True),
    how=damage,
)
@example(fmt="jax", which=0.0, how=("bytes", b"[" * 100_000))  # spec.json nested deeper than Python recurses
@example(fmt="saelens", which=0.0, how=("bytes", b"[" * 100_000))  # cfg.json likewise
@example(fmt="sparsify", which=0.0, how=("bytes", b"[" * 100_000))
@example(
    fmt="jax", which=0.0, how=("bytes", b'{"format_version": 1, "architecture": "relu", "d_in": 4.0, "n_latents": 8}')
)
@example(
    fmt="jax", which=0.0, how=("bytes", b'{"format_version": 1, "architecture": "relu", "d_in": true, "n_latents": 8}')
)
@example(
    fmt="saelens",
    which=0.0,
    how=("bytes", b'{"d_in": 4, "d_sae": 8, "hook_name": "blocks.9.hook_resid_pre", "architecture": []}'),
)
def test_damaged_file_is_one_line_or_the_same_sae(templates, fmt, which, how):
    d = fresh_dir()
    try:
        path = copy_of(templates[fmt], d)
        files = files_of(path)
        apply(how, files[int(which * len(files))])
        out = load_outcome(path)
        if isinstance(out, SAE):
            assert_valid(out)
            if how[0] != "flip" or fmt == "jax":  # .pt and .safetensors keep no checksum: a flipped value is a value
                assert same_bits(out, load_sae(templates[fmt])), "damage went unnoticed and changed the SAE"
    finally:
        shutil.rmtree(d)


# --- random tensors: loaded exactly when they form a valid SAE -----------------------

dims = st.integers(0, 3)


@st.composite
def tensor_dicts(draw, keys):
    out = {}
    for key in draw(st.lists(st.sampled_from(keys + ("extra", "")), min_size=0, max_size=5, unique=True)):
        shape = tuple(draw(st.lists(dims, max_size=3)))
        dtype = draw(st.sampled_from(list(DTYPES)))
        a = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape).astype(DTYPES[dtype])
        if a.size and draw(st.integers(0, 9)) == 0:
            a.reshape(-1)[0] = np.nan if dtype != "int32" else 0
        out[key] = a
    return out


@st.composite
def near_valid(draw, keys, shapes):
    """Mostly-valid tensor sets (so success happens), each with a chance of one fault."""
    d, n = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    out = {k: rng.standard_normal(s).astype(DTYPES[dtype]) for k, s in zip(keys, shapes(d, n))}
    fault = draw(st.sampled_from(["none"] * 4 + ["transpose", "dtype", "nan", "drop", "extra", "reshape"]))
    key = draw(st.sampled_from(keys))
    if fault == "transpose":
        out[key] = np.ascontiguousarray(out[key].T.reshape(out[key].shape[::-1]))
    elif fault == "dtype":
        out[key] = out[key].astype(np.float64 if dtype != "float32" else np.float16)
    elif fault == "nan":
        out[key].reshape(-1)[0] = np.inf
    elif fault == "drop":
        del out[key]
    elif fault == "extra":
        out["extra"] = np.zeros(1, np.float32)
    elif fault == "reshape":
        out[key] = out[key].reshape(-1)[: max(out[key].size - 1, 0)].copy()
    return out


def release_ok(t: dict) -> bool:
    if set(t) != set(RELEASE_KEYS) or t["decoder.bias"].ndim != 1 or t["encoder.bias"].ndim != 1:
        return False
    d, n = len(t["decoder.bias"]), len(t["encoder.bias"])
    return valid_set(
        t, {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n), "decoder.bias": (d,)}, d, n
    )


def valid_set(t: dict, shapes: dict, d: int, n: int, float64: bool = False) -> bool:
    """float64: SAELens files may hold it (read as float32, one rounding that must stay finite)."""
    dtypes = {a.dtype.name for a in t.values()}
    return (
        d > 0
        and n > 0
        and set(t) == set(shapes)
        and all(t[k].shape == s for k, s in shapes.items())
        and len(dtypes) == 1
        and dtypes <= {"float32", "float16", "bfloat16", *(["float64"] if float64 else [])}
        and all(np.isfinite(a.astype(np.float32)).all() for a in t.values())
    )


def write_tensors(t: dict, path: Path) -> None:
    if path.suffix == ".pt":
        torch.save(
            {
                k: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
                if a.dtype == ml_dtypes.bfloat16
                else torch.from_numpy(a)
                for k, a in t.items()
            },
            path,
        )
    else:
        save_file(t, path)


@fuzz(60)
@given(
    t=st.one_of(tensor_dicts(RELEASE_KEYS), near_valid(RELEASE_KEYS, lambda d, n: [(n, d), (n,), (d, n), (d,)])),
    suffix=st.sampled_from([".pt", ".safetensors"]),
)
def test_release_tensors_load_exactly_when_valid(t, suffix):
    d = fresh_dir()
    try:
        path = d / f"sae{suffix}"
        write_tensors(t, path)
        out = load_outcome(path)
        assert isinstance(out, SAE) == release_ok(t), out if isinstance(out, str) else "loaded an invalid set"
        if isinstance(out, SAE):
            assert_valid(out)
            for ours, theirs in [
                ("W_enc", t["encoder.weight"].T),
                ("b_enc", t["encoder.bias"]),
                ("W_dec", t["decoder.weight"].T),
                ("b_dec", t["decoder.bias"]),
            ]:
                assert np.asarray(getattr(out.params, ours)).tobytes() == np.ascontiguousarray(theirs).tobytes()
    finally:
        shutil.rmtree(d)


@fuzz(50)
@given(
    t=st.one_of(tensor_dicts(SAELENS_KEYS), near_valid(SAELENS_KEYS, lambda d, n: [(d, n), (n,), (n, d), (d,)])),
    dims=st.one_of(st.none(), st.tuples(st.integers(-1, 3), st.integers(-1, 3))),
)
def test_saelens_tensors_load_exactly_when_valid(t, dims):
    """cfg.json's d_in and d_sae: half the time those of the biases, else any small numbers."""
    length = lambda k: t[k].shape[0] if k in t and t[k].ndim == 1 else 2
    d_in, d_sae = dims or (length("b_dec"), length("b_enc"))
    d = fresh_dir()
    try:
        folder = d / "sl"
        folder.mkdir()
        cfg = {
            "architecture": "standard",
            "d_in": d_in,
            "d_sae": d_sae,
            "apply_b_dec_to_input": False,
            "metadata": {"hook_name": "blocks.9.hook_resid_pre"},
        }
        (folder / "cfg.json").write_text(json.dumps(cfg))
        write_tensors(t, folder / "sae_weights.safetensors")
        out = load_outcome(folder)
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        ok = valid_set(t, shapes, d_in, d_sae, float64=True)
        assert isinstance(out, SAE) == ok, out if isinstance(out, str) else "loaded an invalid set"
        if ok:
            assert_valid(out)
            stored = lambda a: a.astype(np.float32) if a.dtype == np.float64 else a
            assert all(np.asarray(getattr(out.params, k)).tobytes() == stored(t[k]).tobytes() for k in SAELENS_KEYS)
    finally:
        shutil.rmtree(d)


DELETE = object()
SPEC_VALUES = {
    "format_version": [2, "1", None, DELETE],
    "architecture": ["topk", "gated", 3, DELETE],
    "d_in": [N, 0, -1, 4.0, True, "4", None, DELETE],
    "n_latents": [D, 0, 8.5, 8.0, None, DELETE],
    "k": [1, 4, 9, 0, "x"],
    "hook_layer": [0, -1, None, "9", 2**70, DELETE],
    "hook_site": ["output", "middle", 1, DELETE],
    "dtype": ["bfloat16", "int8", None, DELETE],
    "input_scale": [2.5, 0.0, -1.0, float("inf"), float("nan"), "1", 10**400, DELETE],
    "source": ["x", 1, None, DELETE],
    "extra": [1],
}


@fuzz(40)
@given(changes=st.lists(st.tuples(st.sampled_from(sorted(SPEC_VALUES)), st.integers(0, 7)), max_size=2))
@example(changes=[("d_in", 3)])  # 4.0
@example(changes=[("d_in", 4)])  # true
@example(changes=[("input_scale", 6)])  # an integer no float can hold
def test_jax_folder_with_a_rewritten_spec(templates, changes):
    """spec.json with up to two fields changed or dropped, over the template's params: it loads only
    with a spec the params fit, holding exactly the template's bits; else one line."""
    d = fresh_dir()
    try:
        path = copy_of(templates["jax"], d)
        spec = json.loads((path / "spec.json").read_text())
        for key, i in changes:
            value = SPEC_VALUES[key][i % len(SPEC_VALUES[key])]
            spec.pop(key, None) if value is DELETE else spec.__setitem__(key, value)
        (path / "spec.json").write_text(json.dumps(spec))
        out = load_outcome(path)
        if isinstance(out, SAE):
            assert_valid(out)
            assert (
                type(out.spec.d_in) is int
                and type(out.spec.n_latents) is int
                and (out.spec.d_in, out.spec.n_latents) == (D, N)
            )
            assert (
                isinstance(out.spec.input_scale, float)
                and type(out.spec.hook_layer) is int
                and out.spec.hook_layer >= 0
            )
            assert same_bits(out, load_sae(templates["jax"]))
    finally:
        shutil.rmtree(d)


# --- the converters: one line and nothing written, or a faithful copy ------------------


def converter(name: str):
    spec = importlib.util.spec_from_file_location(f"convert_{name}", ROOT / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def converters():
    """The entry points' main(); what their quiet_orbax changes process-wide is put back afterwards."""
    levels, hook = {n: logging.getLogger(n).level for n in ("absl", "asyncio")}, sys.unraisablehook
    yield {n: converter(n) for n in ("torch_to_jax", "jax_to_torch")}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    sys.unraisablehook = hook


@fuzz(40)
@given(
    fmt=st.sampled_from(["jax", "pt", "safetensors", "saelens"]),
    which=st.floats(0, 1, exclude_max=True),
    how=damage,
    script=st.sampled_from(["torch_to_jax", "jax_to_torch"]),
    dst_name=st.sampled_from(["out", "out.pt", "out.safetensors"]),
)
def test_converters_end_in_one_line_or_a_faithful_copy(
    templates, converters, capsys, fmt, which, how, script, dst_name
):
    d = fresh_dir()
    try:
        src = copy_of(templates[fmt], d)
        files = files_of(src)
        apply(how, files[int(which * len(files))])
        out_dir = d / "out_dir"
        out_dir.mkdir()
        dst = out_dir / dst_name
        rc = converters[script].main([str(src), str(dst)])
        stdout, stderr = capsys.readouterr()
        event(f"exit {rc}")
        if rc == 1:
            assert (
                stdout == ""
                and len(stderr.splitlines()) == 1
                and stderr.startswith(f"{script}: error: ")
                and " ()" not in stderr
            ), stderr
            assert list(out_dir.iterdir()) == [], "a failed convert left something behind"
        else:
            assert rc == 0 and stderr == "" and stdout.startswith(f"wrote {dst} ")
            assert sorted(p.name for p in out_dir.iterdir()) == [dst_name]
            assert same_bits(load_sae(dst), load_sae(src))
    finally:
        shutil.rmtree(d)


# --- a few through the entry points as a user runs them -------------------------------

CLI_CASES = [
    ("torch_to_jax", "saelens", "cfg.json", b"[" * 100_000, "cfg.json: unreadable JSON (RecursionError"),
    (
        "jax_to_torch",
        "jax",
        "spec.json",
        b'{"format_version": 1, "architecture": "relu", "d_in": 4, "n_latents": 8, "input_scale": 1e999}',
        "spec.json: input_scale: expected a finite number, found Infinity",
    ),
    (
        "torch_to_jax",
        "pt",
        None,
        bytes(range(256)) * 4,
        "release.pt: not a plain tensor dict: torch.load(weights_only=True) refused it (Unsupported operand 0)",
    ),
]


@pytest.mark.parametrize("script, fmt, member, content, expected", CLI_CASES)
def test_hostile_inputs_through_the_converter_cli_are_one_line(
    templates, tmp_path, script, fmt, member, content, expected
):
    import subprocess

    src = copy_of(templates[fmt], tmp_path)
    (src / member if member else src).write_bytes(content)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / ("x.pt" if script == "jax_to_torch" else "x")
    r = subprocess.run(
        [sys.executable, str(ROOT / "convert" / f"{script}.py"), str(src), str(dst)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"{script}: error: ") and expected in r.stderr, (
        r.stderr
    )
    assert list(out_dir.iterdir()) == []
