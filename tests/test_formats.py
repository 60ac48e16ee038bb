"""Round trips between the release files, SAELens folders and our format, bit for bit.

The foreign files are written by torch / safetensors' own writers and our
output is read back by them, so each test checks both directions against the
reference tools, not only against ourselves.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sae_jax.formats as formats
from sae_jax.formats import SAEFormatError, detect_format, load_sae, save_sae
from sae_jax.sae import SAE, SAESpec, cast, decode, encode, init_params

D, N = 8, 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def random_tensors(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int, awkward: bool
) -> dict[str, torch.Tensor]:
    """Random normal values; `awkward` plants -0.0, a subnormal and the dtype's max in each."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g).to(dtype)
        if awkward:
            flat = t.view(-1)
            flat[0], flat[1], flat[2] = -0.0, torch.finfo(dtype).smallest_normal / 4, torch.finfo(dtype).max
        out[key] = t
    return out


def release_tensors(dtype: torch.dtype, seed: int = 0, awkward: bool = True) -> dict[str, torch.Tensor]:
    shapes = {"encoder.weight": (N, D), "encoder.bias": (N,), "decoder.weight": (D, N), "decoder.bias": (D,)}
    return random_tensors(shapes, dtype, seed, awkward)


def saelens_tensors(dtype: torch.dtype, seed: int = 0, awkward: bool = True) -> dict[str, torch.Tensor]:
    return random_tensors({"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}, dtype, seed, awkward)


def write_saelens_folder(folder, tensors, **cfg):
    folder.mkdir()
    save_file(tensors, folder / "sae_weights.safetensors")
    base = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.9.hook_resid_pre", "model_name": "m", "sae_lens_version": "6.1.0"},
    }
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return folder


def assert_bits_equal(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]):
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype, key
        assert torch.equal(ours[key].view(INT_VIEW[ref[key].dtype]), ref[key].view(INT_VIEW[ref[key].dtype])), key


def read_back(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True) if path.suffix == ".pt" else load_file(path)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_release_to_jax_to_release_is_bit_exact(tmp_path, suffix, dtype):
    ref = release_tensors(DTYPES[dtype])
    src = tmp_path / f"release{suffix}"
    torch.save(ref, src) if suffix == ".pt" else save_file(ref, src)
    save_sae(load_sae(src), tmp_path / "jax")
    sae = load_sae(tmp_path / "jax")
    assert (sae.spec.architecture, sae.spec.d_in, sae.spec.n_latents, sae.spec.dtype) == ("relu", D, N, dtype)
    assert np.asarray(sae.params.W_enc).shape == (D, N)
    out = save_sae(sae, tmp_path / f"out{suffix}", format=suffix[1:])
    assert_bits_equal(read_back(out), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_release_pt_and_safetensors_convert_into_each_other(tmp_path, dtype):
    ref = release_tensors(DTYPES[dtype], seed=1)
    torch.save(ref, tmp_path / "a.pt")
    save_sae(load_sae(tmp_path / "a.pt"), tmp_path / "b.safetensors", "safetensors")
    save_sae(load_sae(tmp_path / "b.safetensors"), tmp_path / "c.pt", "pt")
    assert_bits_equal(load_file(tmp_path / "b.safetensors"), ref)
    assert_bits_equal(torch.load(tmp_path / "c.pt", weights_only=True), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_saelens_to_jax_to_saelens_is_bit_exact(tmp_path, dtype):
    ref = saelens_tensors(DTYPES[dtype])
    src = write_saelens_folder(tmp_path / "src", ref, dtype=dtype)
    save_sae(load_sae(src), tmp_path / "jax")
    sae = load_sae(tmp_path / "jax")
    assert (sae.spec.hook_layer, sae.spec.hook_site, sae.spec.dtype) == (9, "input", dtype)
    out = save_sae(sae, tmp_path / "out", "saelens", metadata={"model_name": "m"})
    assert_bits_equal(load_file(out / "sae_weights.safetensors"), ref)
    assert json.loads((out / "cfg.json").read_text()) == {
        "architecture": "standard",
        "d_in": D,
        "d_sae": N,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name": "blocks.9.hook_resid_pre",
        "metadata": {"model_name": "m", "hook_name": "blocks.9.hook_resid_pre", "sae_lens_version": "6.1.0"},
    }


def test_saelens_topk_at_resid_post_round_trips(tmp_path):
    ref = saelens_tensors(torch.bfloat16, seed=2)
    src = write_saelens_folder(
        tmp_path / "src", ref, architecture="topk", k=5, metadata={"hook_name": "blocks.12.hook_resid_post"}
    )
    sae = load_sae(src)
    assert (sae.spec.architecture, sae.spec.k, sae.spec.hook_layer, sae.spec.hook_site) == ("topk", 5, 12, "output")
    out = save_sae(sae, tmp_path / "out", "saelens")
    cfg = json.loads((out / "cfg.json").read_text())
    # No sae_lens_version: read as SAELens reads a pre-6.0 file (prepend_bos true); written as 6.0.
    meta = {
        "hook_name": "blocks.12.hook_resid_post",
        "prepend_bos": True,
        "neuronpedia_id": None,
        "sae_lens_version": "6.0.0",
    }
    assert (cfg["architecture"], cfg["k"], cfg["hook_name"], cfg["metadata"]) == (
        "topk",
        5,
        "blocks.12.hook_resid_post",
        meta,
    )
    assert_bits_equal(load_file(out / "sae_weights.safetensors"), ref)


def test_saelens_pre_v6_config_is_read(tmp_path):
    """Before v6: hook_name at the top level, top-k as activation_fn_str + activation_fn_kwargs."""
    src = write_saelens_folder(
        tmp_path / "src",
        saelens_tensors(torch.float32),
        metadata=None,
        hook_name="blocks.3.hook_resid_pre",
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 7},
    )
    spec = load_sae(src).spec
    assert (spec.architecture, spec.k, spec.hook_layer, spec.hook_site) == ("topk", 7, 3, "input")


@pytest.mark.parametrize("dtype", DTYPES)
def test_saelens_apply_b_dec_to_input_is_held_not_folded(tmp_path, dtype):
    ref = saelens_tensors(DTYPES[dtype], seed=3, awkward=False)
    sae = load_sae(write_saelens_folder(tmp_path / "src", ref, apply_b_dec_to_input=True))
    assert sae.spec.apply_b_dec_to_input and sae.spec.dtype == dtype  # no widened b_enc' = b_enc - b_dec @ W_enc
    assert_bits_equal(
        {
            k: torch.from_numpy(np.asarray(getattr(sae.params, k)).astype(np.float32)).to(v.dtype)
            for k, v in ref.items()
        },
        ref,
    )
    w = {k: v.double().numpy() for k, v in ref.items()}
    x = np.random.default_rng(0).normal(size=(4, D))
    expected = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)  # SAELens: relu((x - b_dec) @ W_enc + b_enc)
    got = np.asarray(encode(sae, jnp.asarray(x, jnp.float32)), np.float64)
    assert (expected > 0).sum() > 10
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))  # fp32 sums of D=8 terms
    out = save_sae(sae, tmp_path / "out", "saelens")
    assert json.loads((out / "cfg.json").read_text())["apply_b_dec_to_input"] is True
    assert_bits_equal(load_file(out / "sae_weights.safetensors"), ref)


def test_release_export_of_a_pre_encoder_bias_folds_in_float64_or_refuses(tmp_path):
    ref = saelens_tensors(torch.float32, seed=3, awkward=False)
    sae = load_sae(write_saelens_folder(tmp_path / "src", ref, apply_b_dec_to_input=True))
    out = load_sae(save_sae(sae, tmp_path / "r.safetensors", "safetensors"))
    w = {k: v.double().numpy() for k, v in ref.items()}
    b_enc = (w["b_enc"] - w["b_dec"] @ w["W_enc"]).astype(np.float32)  # float64, rounded once
    assert np.array_equal(np.asarray(out.params.b_enc), b_enc) and not out.spec.apply_b_dec_to_input
    with pytest.raises(SAEFormatError) as e:  # bfloat16 cannot hold the folded bias
        save_sae(cast(sae, "bfloat16"), tmp_path / "b.safetensors", "safetensors")
    assert "apply_b_dec_to_input" in str(e.value) and "float32" in str(e.value)
    big = dict(ref, b_dec=torch.full((D,), 3e38))  # b_dec @ W_enc overflows float32
    sae = load_sae(write_saelens_folder(tmp_path / "big", big, apply_b_dec_to_input=True))
    with pytest.raises(SAEFormatError, match="b_enc: expected finite values"):
        save_sae(sae, tmp_path / "big.pt", "pt")


def small_sae(architecture="relu", dtype="float32", **spec) -> SAE:
    s = SAESpec(architecture, D, N, k=4 if architecture == "topk" else None, **spec)
    return cast(SAE(init_params(jax.random.key(0), s), s), dtype)


def test_jax_format_keeps_every_spec_field_and_bit(tmp_path):
    sae = small_sae("topk", "bfloat16", hook_layer=5, hook_site="output", input_scale=2.5, source="runs/x")
    sae = SAE(jax.tree.map(lambda a: a + jnp.asarray(0.25, a.dtype), sae.params), sae.spec)  # nonzero biases
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.spec == sae.spec
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        ours, ref = np.asarray(getattr(loaded.params, name)), np.asarray(getattr(sae.params, name))
        assert ours.dtype == ref.dtype and np.array_equal(ours.view(np.int16), ref.view(np.int16)), name
    spec_json = json.loads((tmp_path / "sae" / "spec.json").read_text())
    assert spec_json == {"format_version": 1, **dataclasses.asdict(sae.spec), "metadata": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary left beside it


def test_jax_format_without_source_records_its_path(tmp_path):
    assert load_sae(save_sae(small_sae(), tmp_path / "sae")).spec.source == str(tmp_path / "sae")


@pytest.mark.parametrize("scale", [4.0, 2.5])
@pytest.mark.parametrize("fmt,name", [("pt", "a.pt"), ("safetensors", "a.safetensors"), ("saelens", "sl")])
def test_export_folds_input_scale(tmp_path, fmt, name, scale):
    sae = small_sae(input_scale=scale)
    sae = SAE(dataclasses.replace(sae.params, b_dec=jnp.linspace(-1, 1, D), b_enc=jnp.linspace(-0.1, 0.1, N)), sae.spec)
    loaded = load_sae(save_sae(sae, tmp_path / name, fmt))
    assert loaded.spec.input_scale == 1.0
    x = jax.random.normal(jax.random.key(1), (4, D)) * 3
    f, f_ref = np.asarray(encode(loaded, x)), np.asarray(encode(sae, x))
    x_hat, x_hat_ref = np.asarray(decode(loaded, f_ref)), np.asarray(decode(sae, f_ref))
    if scale == 4.0:  # a power of two scales exactly: the same function bit for bit
        assert np.array_equal(f, f_ref) and np.array_equal(x_hat, x_hat_ref)
    else:  # one fp32 rounding of each folded weight
        assert np.max(np.abs(f - f_ref)) <= 1e-6 * np.max(np.abs(f_ref))
        assert np.max(np.abs(x_hat - x_hat_ref)) <= 1e-6 * np.max(np.abs(x_hat_ref))


def test_hook_defaults_and_overrides(tmp_path):
    torch.save(release_tensors(torch.float32), tmp_path / "r.pt")
    spec = load_sae(tmp_path / "r.pt").spec
    assert (spec.hook_layer, spec.hook_site, spec.source) == (9, "input", str(tmp_path / "r.pt"))
    spec = load_sae(tmp_path / "r.pt", hook_layer=10, hook_site="output").spec
    assert (spec.hook_layer, spec.hook_site) == (10, "output")
    src = write_saelens_folder(tmp_path / "sl", saelens_tensors(torch.float32))
    assert load_sae(src, hook_site="output").spec.hook_layer == 9
    assert load_sae(src, hook_site="output").spec.hook_site == "output"
    save_sae(small_sae(hook_layer=4), tmp_path / "j")
    assert load_sae(tmp_path / "j", hook_layer=8).spec.hook_layer == 8


def test_hook_names():
    assert formats.hook_name(SAESpec("relu", D, N, hook_layer=9)) == "blocks.9.hook_resid_pre"
    assert formats.hook_name(SAESpec("relu", D, N, hook_layer=9, hook_site="output")) == "blocks.9.hook_resid_post"
    assert formats.parse_hook_name("blocks.19.hook_resid_post") == (19, "output")
    assert formats.parse_hook_name("blocks.19.hook_mlp_out") is None


def test_detect_format(tmp_path):
    torch.save(release_tensors(torch.float32), tmp_path / "r.pt")
    save_sae(load_sae(tmp_path / "r.pt"), tmp_path / "r.safetensors", "safetensors")
    save_sae(load_sae(tmp_path / "r.pt"), tmp_path / "sl", "saelens")
    save_sae(load_sae(tmp_path / "r.pt"), tmp_path / "j")
    assert [detect_format(tmp_path / p) for p in ("r.pt", "r.safetensors", "sl", "j")] == [
        "pt",
        "safetensors",
        "saelens",
        "jax",
    ]


@pytest.mark.parametrize("fmt,name", [("jax", "j"), ("pt", "a.pt"), ("saelens", "sl")])
def test_overwrite_replaces_and_leaves_no_temporaries(tmp_path, fmt, name):
    save_sae(small_sae(), tmp_path / name, fmt)
    newer = cast(small_sae(), "float16")
    save_sae(newer, tmp_path / name, fmt, overwrite=True)
    assert load_sae(tmp_path / name).spec.dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize(
    "fmt,name,writer", [("jax", "j", "write_jax"), ("pt", "a.pt", "write_release"), ("saelens", "sl", "write_saelens")]
)
def test_failed_write_keeps_the_old_output_and_leaves_nothing_else(tmp_path, monkeypatch, fmt, name, writer):
    save_sae(small_sae(), tmp_path / name, fmt)
    real = getattr(formats, writer)

    def half_then_crash(sae, path, *args):
        real(sae, path, *args)
        raise OSError("disk full")

    monkeypatch.setattr(formats, writer, half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_sae(cast(small_sae(), "float16"), tmp_path / name, fmt, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_sae(small_sae(), tmp_path / ("fresh.pt" if fmt == "pt" else "fresh"), fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert load_sae(tmp_path / name).spec.dtype == "float32"


def test_saelens_metadata_goes_into_cfg(tmp_path):
    meta = {
        "model_name": "meta-llama/Llama-3.2-1B-Instruct",
        "context_size": 1024,
        "dataset_path": "lmsys/lmsys-chat-1m",
    }
    out = save_sae(small_sae(), tmp_path / "sl", "saelens", metadata=meta)
    expected = {**meta, "hook_name": "blocks.9.hook_resid_pre", "sae_lens_version": "6.0.0"}
    assert json.loads((out / "cfg.json").read_text())["metadata"] == expected


def jumprelu_sae(dtype="float32") -> SAE:
    s = SAESpec(
        "jumprelu",
        D,
        N,
        dtype="float32",
        apply_b_dec_to_input=True,
        input_scale=2.5,
        hook_layer=4,
        metadata=json.dumps({"model_name": "m", "context_size": 1024, "prepend_bos": False}),
    )
    p = init_params(jax.random.key(3), s)
    p = dataclasses.replace(p, b_dec=jnp.linspace(-1000, 1000, D), threshold=jnp.linspace(0, 1, N))
    return cast(SAE(p, s), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_format_keeps_jumprelu_threshold_pre_bias_and_metadata(tmp_path, dtype):
    sae = jumprelu_sae(dtype)
    loaded = load_sae(save_sae(sae, tmp_path / "sae", metadata={"dataset_path": "lmsys/lmsys-chat-1m"}))
    expected_meta = {
        "model_name": "m",
        "context_size": 1024,
        "prepend_bos": False,
        "dataset_path": "lmsys/lmsys-chat-1m",
    }
    assert loaded.spec == dataclasses.replace(
        sae.spec, metadata=json.dumps(expected_meta, sort_keys=True), source=str(tmp_path / "sae")
    )
    assert json.loads((tmp_path / "sae" / "spec.json").read_text())["metadata"] == expected_meta
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        ours, ref = np.asarray(getattr(loaded.params, name)), np.asarray(getattr(sae.params, name))
        assert ours.dtype == ref.dtype and ours.tobytes() == ref.tobytes(), name


def test_dtypes_are_accepted_as_strings_numpy_and_jax(tmp_path):
    src = save_sae(small_sae(), tmp_path / "a.safetensors", "safetensors")
    for i, dtype in enumerate(["bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16), jnp.dtype("bfloat16")]):
        assert load_sae(src, dtype=dtype).spec.dtype == "bfloat16"
        assert cast(small_sae(), dtype).spec.dtype == "bfloat16"
        out = save_sae(small_sae(), tmp_path / f"{i}.safetensors", "safetensors", dtype=dtype)
        assert load_sae(out).spec.dtype == "bfloat16"
    for dtype in ["float32", np.float32, jnp.float32, np.dtype("float32")]:
        assert load_sae(src, dtype=dtype).spec.dtype == "float32"
    with pytest.raises(SAEFormatError, match=r"dtype: expected one of float32, bfloat16, float16 .*found int8"):
        load_sae(src, dtype=np.int8)


def test_formats_that_cannot_hold_an_architecture_refuse_it(tmp_path):
    for fmt, name in [("pt", "a.pt"), ("safetensors", "a.safetensors")]:
        with pytest.raises(SAEFormatError, match=f"architecture: expected relu for format {fmt}.*found jumprelu"):
            save_sae(jumprelu_sae(), tmp_path / name, fmt)
    for arch in ("relu", "jumprelu"):
        sae = jumprelu_sae() if arch == "jumprelu" else small_sae()
        with pytest.raises(SAEFormatError, match=f"architecture: expected topk for format sparsify.*found {arch}"):
            save_sae(sae, tmp_path / "sp", "sparsify")
    negative = jumprelu_sae()
    negative = SAE(dataclasses.replace(negative.params, threshold=negative.params.threshold - 0.5), negative.spec)
    with pytest.raises(SAEFormatError, match=r"threshold: expected >= 0 \(SAELens applies relu before the jump\)"):
        save_sae(negative, tmp_path / "sl", "saelens")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(130, 70), (64, 1), (1, 200), (0, 5)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transposed_is_a_t_bit_for_bit_in_row_blocks(shape, dtype):
    a = np.random.default_rng(0).standard_normal(shape).astype(formats.common.np_dtype(dtype))
    if a.size > 2:
        a.flat[:3] = [-0.0, np.finfo(np.float32).smallest_normal / 4, np.inf]  # sign, subnormal, inf kept
    out = formats.common.transposed(a, rows=64)
    assert out.shape == shape[::-1] and out.dtype == a.dtype and out.flags.c_contiguous
    assert out.tobytes() == np.ascontiguousarray(a.T).tobytes()
