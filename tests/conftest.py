"""What every test module shares: four fake CPU devices, and the session's fixtures.

JAX fixes its device count when its backend starts, so it is set here, before any
test touches a device: sharding tests run on a 4-device mesh in this process, and
every other test runs on the first device as it would on a one-device machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")

# Subprocesses (command-line, crash, multi-process tests) compile as the quick modules below do, through XLA_FLAGS.
# XLA reads XLA_FLAGS once, when the backend starts: the backend starts here on the flags this session began with
# (kept for the xdist workers, which inherit the environment), and only then do the children's flags go in.
_BASE_FLAGS = os.environ.setdefault("SAE_JAX_TEST_BASE_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = _BASE_FLAGS
jax.devices()
CHILD_XLA_FLAGS = _BASE_FLAGS
if not os.environ.get("SAE_JAX_TEST_FULL_XLA"):
    CHILD_XLA_FLAGS += " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = CHILD_XLA_FLAGS.strip()

# One XLA compilation cache for the run, shared by the xdist workers (they inherit the variable): the many tiny runs
# compile the same programs again and again. In-process only: JAX writes entries in place, so a subprocess killed or
# stopped by a file-size limit mid-write would leave a truncated entry that warns on stderr where tests read it.
_MADE_CACHE = "SAE_JAX_TEST_XLA_CACHE" not in os.environ
if _MADE_CACHE:
    os.environ["SAE_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="sae-jax-test-xla-")
jax.config.update("jax_compilation_cache_dir", os.environ["SAE_JAX_TEST_XLA_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Most tests run programs of a few hundred FLOPs that XLA compiles for seconds: they compile with LLVM's optimizer
# off (--xla_backend_optimization_level=0) and XLA:CPU's older loop emitters instead of its MLIR fusion emitters
# (--xla_cpu_use_fusion_emitters=false): the same semantics, slower code, half the compile time (four of
# test_sparse's train steps: 6.2 CPU s to compile with the optimizer off alone, 3.0 s with both; test_sparse and
# test_precision together 114 -> 61 CPU s). Modules whose programs run long (training to recovery, harvesting from a
# model) carry `pytestmark = pytest.mark.full_xla` and compile as users' runs do, as do every subprocess, every
# function jitted at import time and every jit made inside a trace (JAX takes compiler options on top-level jits
# only). SAE_JAX_TEST_FULL_XLA=1: all compile fully.
QUICK_XLA = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_tracing = getattr(jax._src.core, "trace_state_clean", None)  # private: without it, everything compiles fully


@pytest.fixture(scope="module", autouse=True)
def _quick_xla(request):
    with pytest.MonkeyPatch.context() as mp:
        quick = request.node.get_closest_marker("full_xla") is None and not os.environ.get("SAE_JAX_TEST_FULL_XLA")
        if quick and _tracing is not None:
            jit = jax.jit
            mp.setattr(
                jax, "jit", lambda *a, **kw: jit(*a, **({"compiler_options": QUICK_XLA} | kw if _tracing() else kw))
            )
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "full_xla: compile with XLA's full optimisation (programs that run long)")


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The offline Llama-3 tokenizer (llama-models' tiktoken file), built once per session."""
    from sae_jax.tokenizer import llama3_tokenizer

    return llama3_tokenizer(tmp_path_factory.getbasetemp() / "sae_jax_cache")


@pytest.fixture(scope="session")
def ws(tmp_path_factory, tok):
    """A tiny 4-layer Llama with the real vocabulary, 40 chat rows and two SAEs (`sae_helpers.Workspace`), for the
    command-line tests; they only read it."""
    from sae_helpers import cli_workspace

    return cli_workspace(tmp_path_factory.mktemp("cli"), tok)


def pytest_unconfigure(config):
    if _MADE_CACHE:
        shutil.rmtree(os.environ["SAE_JAX_TEST_XLA_CACHE"], ignore_errors=True)
