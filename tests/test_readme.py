"""The README's snippets marked `<!-- readme-test: runs on the demo -->` run as written on the demo's artifacts.

The artifacts are made as `make demo` makes them (`sae_jax.demo.prepare("demo")`, then `sae-jax train --config
configs/demo.yaml`) in a scratch folder, with a short training run (the snippets need a trained SAE, not a good
one). Each `$ sae-jax ...` command of a marked shell block must return 0 from `sae_jax.cli.main`, the function
the `sae-jax` console script runs, with no traceback; each marked Python block must run to the end. Both run in
this process, in the scratch folder: a new interpreter per snippet would add only its start-up (about 2 s each).
`test_the_console_script_runs_a_snippet` runs one command through the installed `sae-jax` in a shell.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sae_jax import cli
from sae_jax.demo import prepare

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


def sae_jax(command: str, cwd: Path) -> int:
    """`command` ("sae-jax ARGS") through `sae_jax.cli.main` with `cwd` as the working folder: its return code."""
    argv = shlex.split(command)
    assert argv[0] == "sae-jax", command
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return cli.main(argv[1:])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    here = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "configs", here / "configs")
    prepare(here / "demo")
    sets = [x for s in SHORT for x in ("--set", s)]
    assert sae_jax(shlex.join(["sae-jax", "train", "--config", "configs/demo.yaml", "--no-progress", *sets]), here) == 0
    return here


def test_the_readme_has_marked_snippets():
    langs = [lang for lang, _ in snippets()]
    assert langs.count("python") == 2 and len(langs) == 7, langs


@pytest.mark.parametrize("index", range(7))
def test_snippet_runs_as_written(demo, index, capsys):
    lang, body = snippets()[index]
    if lang == "python":
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(demo)
            exec(compile(body, f"README.md snippet {index}", "exec"), {"__name__": "__main__"})
        return
    commands = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
    assert commands, body
    for command in commands:
        assert sae_jax(command, demo) == 0, (command, capsys.readouterr().err[-2000:])
        assert "Traceback" not in capsys.readouterr().err


def test_the_console_script_runs_a_snippet(demo):
    """The last marked command (`sae-jax plot`), through the installed console script in a shell, as a user runs it."""
    command = [line[2:] for line in snippets()[-1][1].splitlines() if line.startswith("$ ")][-1]
    assert command.startswith("sae-jax plot ")
    r = run(command, demo, shell=True)
    assert r.returncode == 0 and r.stdout.startswith("demo: 5 panels") and r.stderr == "", r.stderr[-2000:]
