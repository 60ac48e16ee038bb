"""Bad input: each is refused with one SAEFormatError line naming the file, the key, expected and found."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_jax.formats import SAEFormatError, load_sae, save_sae
from sae_jax.sae import SAE, SAESpec, cast, init_params

D, N = 8, 32


def release(**changes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "encoder.weight": torch.randn(N, D, generator=g),
        "encoder.bias": torch.randn(N, generator=g),
        "decoder.weight": torch.randn(D, N, generator=g),
        "decoder.bias": torch.randn(D, generator=g),
    }
    t.update(changes)
    return {k: v for k, v in t.items() if v is not None}


def saelens_folder(tmp_path: Path, tensors=None, **cfg) -> Path:
    folder = tmp_path / "sl"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = tensors or {
        "W_enc": torch.randn(D, N, generator=g),
        "b_enc": torch.randn(N, generator=g),
        "W_dec": torch.randn(N, D, generator=g),
        "b_dec": torch.randn(D, generator=g),
    }
    save_file(tensors, folder / "sae_weights.safetensors")
    base = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": N,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": "blocks.9.hook_resid_pre"},
    }
    (folder / "cfg.json").write_text(json.dumps({**base, **cfg}))
    return folder


def refused(path, *fragments, **kwargs) -> str:
    """load_sae(path) raises a one-line SAEFormatError that names the path and every fragment."""
    with pytest.raises(SAEFormatError) as e:
        load_sae(path, **kwargs)
    return one_line(e.value, path, *fragments)


def one_line(err: Exception, path, *fragments) -> str:
    msg = str(err)
    assert "\n" not in msg, msg
    for part in (str(path), *fragments):
        assert part in msg, (part, msg)
    return msg


def write(tmp_path, tensors, suffix=".pt") -> Path:
    path = tmp_path / f"sae{suffix}"
    torch.save(tensors, path) if suffix == ".pt" else save_file(tensors, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_missing_key(tmp_path, suffix):
    refused(write(tmp_path, release(**{"decoder.weight": None}), suffix), "decoder.weight", "expected keys")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_extra_key(tmp_path, suffix):
    refused(write(tmp_path, release(**{"encoder.scale": torch.ones(1)}), suffix), "encoder.scale", "extra key")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_transposed_encoder_weight(tmp_path, suffix):
    msg = refused(write(tmp_path, release(**{"encoder.weight": torch.zeros(D, N)}), suffix), "encoder.weight")
    assert msg.endswith(f"expected shape [{N}, {D}], found [{D}, {N}] (transposed)")


def test_mismatched_decoder_shape(tmp_path):
    msg = refused(write(tmp_path, release(**{"decoder.weight": torch.zeros(D + 1, N)})), "decoder.weight")
    assert msg.endswith(f"expected shape [{D}, {N}], found [{D + 1}, {N}]")


def test_bias_that_is_not_1d(tmp_path):
    refused(
        write(tmp_path, release(**{"encoder.bias": torch.zeros(1, N)})),
        "encoder.bias",
        "expected a 1-D bias, found shape [1, 32]",
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("cut", [0, 100, 0.5, -1])
def test_truncated_file(tmp_path, suffix, cut):
    path = write(tmp_path, release(), suffix)
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut % len(data)])
    refused(path, "truncated")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight(tmp_path, suffix, bad):
    w = torch.randn(D, N)
    w[3, 5], w[6, 1] = bad, bad
    msg = refused(write(tmp_path, release(**{"decoder.weight": w}), suffix), "decoder.weight", "expected finite values")
    assert msg.endswith("found 2 NaN/inf (first at [3, 5])")


def test_non_finite_bf16_weight(tmp_path):
    refused(
        write(
            tmp_path,
            {k: v.to(torch.bfloat16) for k, v in release(**{"encoder.bias": torch.full((N,), math.nan)}).items()},
        ),
        "encoder.bias",
        f"found {N} NaN/inf",
    )


class Payload:
    """A pickle that would create a file if it were ever unpickled with full pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({**release(), "encoder.bias": Payload(marker)}, path)
    refused(path, "not a plain tensor dict", "weights_only", "io.open was not an allowed global")
    assert not marker.exists()


@pytest.mark.parametrize("value,found", [(3, "int"), ("x", "str"), ({"a": torch.ones(1)}, "dict")])
def test_dict_with_non_tensor_value(tmp_path, value, found):
    refused(write(tmp_path, release(**{"decoder.bias": value})), "decoder.bias", "expected a tensor", found)


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    refused(path, "top level", "expected a dict of tensors, found list")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_unsupported_dtype(tmp_path, suffix, dtype):
    refused(
        write(tmp_path, release(**{"encoder.bias": torch.zeros(N, dtype=dtype)}), suffix),
        "encoder.bias",
        "expected dtype one of float32, bfloat16, float16",
    )


def test_mixed_dtypes(tmp_path):
    refused(
        write(tmp_path, release(**{"decoder.bias": torch.zeros(D, dtype=torch.float16)})),
        "decoder.bias",
        "expected dtype float32",
        "found float16",
    )


def test_unknown_suffix_and_missing_path(tmp_path):
    (tmp_path / "sae.bin").write_bytes(b"x")
    refused(tmp_path / "sae.bin", "suffix", "'.bin'")
    refused(tmp_path / "nothing.pt", "no such file")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "expected spec.json (sae-jax) or cfg.json (SAELens, sparsify)")


# --- SAELens -----------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,key,found",
    [
        ({"architecture": "batchtopk"}, "architecture", '"batchtopk"'),
        ({"architecture": "transcoder"}, "architecture", '"transcoder"'),
        ({"normalize_activations": "layer_norm"}, "normalize_activations", '"layer_norm"'),
        ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations", '"constant_norm_rescale"'),
        ({"normalize_activations": True}, "normalize_activations", "true"),
        ({"reshape_activations": "hook_z"}, "reshape_activations", '"hook_z"'),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations", '"expected_average_only_in"'),
        ({"metadata": {"hook_name": "blocks.9.hook_mlp_out"}}, "hook_name", '"blocks.9.hook_mlp_out"'),
        ({"metadata": {}}, "hook_name", "null"),
        ({"d_in": "2048"}, "d_in", '"2048"'),
        ({"architecture": "topk"}, "k", "null"),
        ({"activation_fn_str": "tanh-relu"}, "activation_fn_str", '"tanh-relu"'),
        ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm", "true"),
    ],
)
def test_saelens_cfg_refused(tmp_path, cfg, key, found):
    msg = refused(saelens_folder(tmp_path, **cfg), "cfg.json", key)
    assert msg.endswith(f"found {found}"), msg


def test_saelens_weights_checked_against_cfg(tmp_path):
    t = {"W_enc": torch.zeros(N, D), "b_enc": torch.zeros(N), "W_dec": torch.zeros(N, D), "b_dec": torch.zeros(D)}
    refused(saelens_folder(tmp_path, tensors=t), "sae_weights.safetensors", "W_enc", "(transposed)")


def test_saelens_threshold_key_is_extra(tmp_path):
    t = {
        "W_enc": torch.zeros(D, N),
        "b_enc": torch.zeros(N),
        "W_dec": torch.zeros(N, D),
        "b_dec": torch.zeros(D),
        "threshold": torch.zeros(N),
    }
    refused(saelens_folder(tmp_path, tensors=t), "sae_weights.safetensors", "threshold", "extra key")


def test_saelens_missing_weights_and_bad_json(tmp_path):
    folder = saelens_folder(tmp_path)
    (folder / "sae_weights.safetensors").unlink()
    refused(folder, "sae_weights.safetensors")
    (folder / "cfg.json").write_text("{not json")
    refused(folder, "cfg.json", "unreadable JSON")


# --- our format ----------------------------------------------------------------


@pytest.fixture
def jax_dir(tmp_path) -> Path:
    spec = SAESpec("relu", D, N)
    return save_sae(SAE(init_params(jax.random.key(0), spec), spec), tmp_path / "sae")


def edit_spec(folder: Path, **changes) -> None:
    path = folder / "spec.json"
    spec = json.loads(path.read_text())
    spec.update(changes)
    path.write_text(json.dumps({k: v for k, v in spec.items() if v != "DELETE"}))


@pytest.mark.parametrize(
    "changes,key,found",
    [
        ({"n_latents": N * 2}, "W_enc", f"found [{D}, {N}]"),
        ({"dtype": "bfloat16"}, "W_enc", "found float32"),
        ({"format_version": 2}, "format_version", "found 2"),
        ({"format_version": "DELETE"}, "format_version", "found null"),
        ({"hidden": 1}, "hidden", "extra key 'hidden'"),
        ({"architecture": "gated"}, "architecture", "found 'gated'"),
        (
            {"architecture": "jumprelu"},
            "threshold",
            "found arrays ['W_dec', 'W_enc', 'b_dec', 'b_enc']",
        ),  # jumprelu needs it
        ({"architecture": "DELETE"}, "architecture", "missing"),
    ],
)
def test_jax_spec_inconsistent(jax_dir, changes, key, found):
    edit_spec(jax_dir, **changes)
    refused(jax_dir, key, found)


# After a failed read, tensorstore's late callbacks hit orbax's closed event loop and
# report "Event loop is closed" as unraisable; harmless, and kept off the CLI by quiet_orbax.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_jax_damaged_checkpoint(jax_dir, damage):
    (data,) = (jax_dir / "params" / "d").iterdir()  # the finalized ocdbt store: arrays and their metadata
    data.write_bytes(data.read_bytes()[:16]) if damage == "truncate" else data.unlink()
    refused(jax_dir, "params", "unreadable orbax checkpoint")


def test_jax_missing_params(jax_dir):
    shutil.rmtree(jax_dir / "params")
    refused(jax_dir, "params", "an orbax checkpoint directory")


def test_bad_hook_override(tmp_path):
    refused(write(tmp_path, release()), "hook_site", "middle", hook_site="middle")


# --- writing -------------------------------------------------------------------


def small(architecture="relu") -> SAE:
    spec = SAESpec(architecture, D, N, k=4 if architecture == "topk" else None)
    return SAE(init_params(jax.random.key(0), spec), spec)


@pytest.mark.parametrize(
    "fmt,name", [("jax", "j"), ("pt", "a.pt"), ("safetensors", "a.safetensors"), ("saelens", "sl")]
)
def test_existing_destination_is_refused(tmp_path, fmt, name):
    dst = save_sae(small(), tmp_path / name, fmt)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SAEFormatError) as e:
        save_sae(small(), dst, fmt)
    one_line(e.value, dst, "destination exists", "overwrite")
    assert sorted(os.listdir(tmp_path)) == before


def test_write_refusals(tmp_path):
    f16 = cast(small(), "float16")
    with_inf = SAE(dataclasses.replace(f16.params, W_enc=f16.params.W_enc.at[0, 3].set(np.inf)), f16.spec)
    mislabelled = SAE(small().params, SAESpec("relu", D, N, dtype="bfloat16"))
    cases = [
        (dict(sae=small("topk"), path=tmp_path / "a.pt", format="pt"), "architecture", "expected relu for format pt"),
        (dict(sae=small(), path=tmp_path / "a.bin", format="pt"), "suffix", "'.bin'"),
        (dict(sae=small(), path=tmp_path / "a.pt", format="onnx"), "format", "'onnx'"),
        (
            dict(sae=small(), path=tmp_path / "a.pt", format="pt", metadata={"model_name": "m"}),
            "metadata",
            "only with formats jax, saelens, sparsify",
        ),
        (dict(sae=mislabelled, path=tmp_path / "j"), "W_enc", "expected dtype bfloat16", "found float32"),
        (
            dict(sae=small(), path=tmp_path / "sl", format="saelens", metadata={"context_size": np.int64(3)}),
            "metadata",
            "expected JSON values",
        ),
        (dict(sae=with_inf, path=tmp_path / "j"), "W_enc", "found 1 NaN/inf (first at [0, 3])"),
    ]
    for kwargs, *fragments in cases:
        with pytest.raises(SAEFormatError) as e:
            save_sae(**kwargs)
        one_line(e.value, kwargs["path"], *fragments)
    assert os.listdir(tmp_path) == []
