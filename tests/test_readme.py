"""The README's snippets marked `<!-- readme-test: runs on the demo -->` run as written on the demo's artifacts.

The artifacts are made as `make demo` makes them (`python -m sae_jax.demo demo`, then `sae-jax train --config
configs/demo.yaml`) in a scratch folder, with a short training run (the snippets need a trained SAE, not a good
one). Each `$ command` of a marked shell block must exit 0; each marked Python block must run to the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test: runs on the demo -->"
SHORT = [
    "train.steps=4",
    "train.lr_warmup_steps=1",
    "data.batch_size=256",
    "run.save_every=2",
    "run.log_every=2",
    "run.eval_every=0",
    "run.eval_batches=1",
    "train.scale_batches=2",
    "data.text.buffer_tokens=2048",
]


def snippets() -> list[tuple[str, str]]:
    """(language, text) of every marked fenced block, in order."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(re.escape(MARK) + r"\n```(\w*)\n(.*?)\n```", text, flags=re.S)
    return [(lang or "console", body) for lang, body in found]


def run(cmd: list[str] | str, cwd: Path, shell: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(cmd, cwd=cwd, env=env, shell=shell, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    here = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", here / "configs")
    assert run([sys.executable, "-m", "sae_jax.demo", "demo"], here).returncode == 0
    sets = [x for s in SHORT for x in ("--set", s)]
    r = run([sys.executable, "-m", "sae_jax", "train", "--config", "configs/demo.yaml", "--no-progress", *sets], here)
    assert r.returncode == 0, r.stderr[-2000:]
    return here


def test_the_readme_has_marked_snippets():
    langs = [lang for lang, _ in snippets()]
    assert langs.count("python") == 2 and len(langs) == 7, langs


@pytest.mark.parametrize("index", range(7))
def test_snippet_runs_as_written(demo, index):
    lang, body = snippets()[index]
    if lang == "python":
        r = run([sys.executable, "-c", body], demo)
        assert r.returncode == 0, r.stderr[-2000:]
        return
    commands = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
    assert commands, body
    for command in commands:
        r = run(command, demo, shell=True)
        assert r.returncode == 0, (command, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
