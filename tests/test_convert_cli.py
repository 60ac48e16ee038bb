"""The entry points, run as a user runs them: exit code, one line out, no traceback."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
D, N = 8, 32


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "convert" / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def shim(script: str):
    """convert/SCRIPT as a module: its `main(argv)` is all `python convert/SCRIPT` runs."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO / "convert" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_here(capsys, script: str, *args) -> subprocess.CompletedProcess:
    """`run(script, *args)` in this process, for the error cases and the overwrite check (a new interpreter per call
    would only add its start-up); the round trips and the damaged checkpoint run the real scripts."""
    capsys.readouterr()
    rc = shim(script).main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def assert_error(p: subprocess.CompletedProcess, *fragments) -> None:
    assert p.returncode == 1 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    for part in fragments:
        assert part in p.stderr, (part, p.stderr)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "encoder.weight": torch.randn(N, D, generator=g),
        "encoder.bias": torch.randn(N, generator=g),
        "decoder.weight": torch.randn(D, N, generator=g),
        "decoder.bias": torch.randn(D, generator=g),
    }
    tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    path = tmp_path_factory.mktemp("cli") / "release.pt"
    torch.save(tensors, path)
    return path, tensors


def test_release_to_jax_to_safetensors_and_saelens(release, tmp_path):
    src, tensors = release
    p = run("torch_to_jax.py", src, tmp_path / "sae", "--hook-layer", "9", "--hook-site", "output")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout == f"wrote {tmp_path / 'sae'} (jax: relu, D={D}, N={N}, bfloat16, layer 9 output)\n"
    assert json.loads((tmp_path / "sae" / "spec.json").read_text())["hook_site"] == "output"

    p = run("jax_to_torch.py", tmp_path / "sae", tmp_path / "out.safetensors")
    assert (
        p.returncode == 0
        and p.stderr == ""
        and p.stdout == f"wrote {tmp_path / 'out.safetensors'} (safetensors: relu, D={D}, N={N}, bfloat16)\n"
    )
    out = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(out[k].view(torch.int16), v.view(torch.int16)) for k, v in tensors.items())

    p = run(
        "jax_to_torch.py",
        tmp_path / "sae",
        tmp_path / "sl",
        "--model-name",
        "meta-llama/Llama-3.2-1B-Instruct",
        "--context-size",
        "1024",
    )
    assert p.returncode == 0 and p.stdout.startswith(f"wrote {tmp_path / 'sl'} (saelens:"), p.stderr
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.9.hook_resid_post"
    assert cfg["metadata"] == {
        "model_name": "meta-llama/Llama-3.2-1B-Instruct",
        "context_size": 1024,
        "hook_name": "blocks.9.hook_resid_post",
        "sae_lens_version": "6.0.0",
    }

    p = run("torch_to_jax.py", tmp_path / "sl", tmp_path / "back")  # SAELens folder in: hook from its hook_name
    assert p.returncode == 0 and p.stdout.endswith("bfloat16, layer 9 output)\n")


def test_existing_destination_and_overwrite(release, tmp_path, capsys):
    src, _ = release
    (tmp_path / "out.pt").write_bytes(b"keep")
    assert_error(
        run_here(capsys, "jax_to_torch.py", src, tmp_path / "out.pt"),
        str(tmp_path / "out.pt"),
        "destination exists",
        "--overwrite",
    )
    assert (tmp_path / "out.pt").read_bytes() == b"keep"
    p = run_here(capsys, "jax_to_torch.py", src, tmp_path / "out.pt", "--overwrite")
    assert p.returncode == 0 and torch.load(tmp_path / "out.pt", weights_only=True).keys() == {
        "encoder.weight",
        "encoder.bias",
        "decoder.weight",
        "decoder.bias",
    }


def test_bad_inputs_give_one_line(tmp_path, capsys):
    torch.save(
        {
            "encoder.weight": torch.zeros(D, N),
            "encoder.bias": torch.zeros(N),
            "decoder.weight": torch.zeros(D, N),
            "decoder.bias": torch.zeros(D),
        },
        tmp_path / "t.pt",
    )
    assert_error(
        run_here(capsys, "torch_to_jax.py", tmp_path / "t.pt", tmp_path / "x"),
        "torch_to_jax: error:",
        "t.pt: encoder.weight: expected shape [32, 8], found [8, 32] (transposed)",
    )
    assert_error(
        run_here(capsys, "torch_to_jax.py", tmp_path / "missing.pt", tmp_path / "x"),
        "missing.pt: no such file or directory",
    )
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00")
    assert_error(
        run_here(capsys, "jax_to_torch.py", tmp_path / "trunc.safetensors", tmp_path / "y.pt"),
        "jax_to_torch: error:",
        "trunc.safetensors: truncated",
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.pt").exists()


def test_damaged_jax_dir_gives_one_line(release, tmp_path):
    """orbax logs a warning of its own for this one; the entry point keeps stderr to our line."""
    assert run("torch_to_jax.py", release[0], tmp_path / "sae").returncode == 0
    (data,) = (tmp_path / "sae" / "params" / "d").iterdir()
    data.unlink()
    assert_error(
        run("jax_to_torch.py", tmp_path / "sae", tmp_path / "y.pt"),
        str(tmp_path / "sae" / "params"),
        "unreadable orbax checkpoint",
    )
