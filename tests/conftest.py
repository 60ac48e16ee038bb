"""What every test module shares: four fake CPU devices, and the session's fixtures.

JAX fixes its device count when its backend starts, so it is set here, before any
test touches a device: sharding tests run on a 4-device mesh in this process, and
every other test runs on the first device as it would on a one-device machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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
    CHILD_XLA_FLAGS += " --xla_cpu_parallel_codegen_split_count=1"
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


# Most tests run programs of a few hundred FLOPs that XLA compiles for seconds: they compile with LLVM's optimizer off
# (--xla_backend_optimization_level=0) and XLA:CPU's older loop emitters instead of its MLIR fusion emitters
# (--xla_cpu_use_fusion_emitters=false): the same semantics, slower code, half the compile time (four of test_sparse's
# train steps: 6.2 CPU s to compile with the optimizer off alone, 3.0 s with both; test_sparse and test_precision
# together 114 -> 61 CPU s), and as one LLVM module rather than split for parallel codegen
# (--xla_cpu_parallel_codegen_split_count=1: with both cores busy the split only adds work; test_sparse, test_precision
# and test_sharding 100.9 -> 89.3 CPU s). The options go into every compilation this process makes while such a module
# runs (JAX's private `pxla.create_compile_options`, through which every jitted program is compiled; without it,
# everything compiles fully). Modules whose programs run long (training to recovery, harvesting from a model) carry
# `pytestmark = pytest.mark.full_xla` and compile as users' runs do, with JAX's in-memory caches cleared first so that
# no quick executable is reused there. SAE_JAX_TEST_FULL_XLA=1: all compile fully.
QUICK_XLA = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_parallel_codegen_split_count": 1,
}
_QUICK = [False]  # whether the running module compiles quick
_pxla = jax._src.interpreters.pxla
_create_compile_options = getattr(_pxla, "create_compile_options", None)


def _compile_options(computation, tuple_args, to_inputs, to_outputs, backend, devices, compiler_options):
    options = QUICK_XLA | dict(compiler_options) if _QUICK[0] else compiler_options
    return _create_compile_options(computation, tuple_args, to_inputs, to_outputs, backend, devices, options)


if _create_compile_options is not None:
    _pxla.create_compile_options = _compile_options


@pytest.fixture(scope="module", autouse=True)
def _quick_xla(request):
    quick = request.node.get_closest_marker("full_xla") is None and not os.environ.get("SAE_JAX_TEST_FULL_XLA")
    if not quick and _QUICK[0]:
        jax.clear_caches()
    _QUICK[0] = quick
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "full_xla: compile with XLA's full optimisation (programs that run long)")


# The modules that take longest, longest first (CPU seconds of the last full run, 2026-12-06: 46 ... 9.5). `make test`
# hands whole modules to the xdist workers in collection order (--dist loadfile --no-loadscope-reorder): started
# first, the long ones cannot be the last to finish while the other worker sits idle. The rest keep their order.
SLOWEST = (
    "test_arch_recovery",
    "test_sparse",
    "test_readme",
    "test_multihost",
    "test_site_check_trained",
    "test_train_run",
    "test_precision",
    "test_sharding",
    "test_crash_kill",
    "test_train_cli",
    "test_arch_train",
    "test_filesystem",
    "test_torch_parity",
    "test_convert_cli",
    "test_llama_source",
    "test_llama_parity",
    "test_evaluate_cli",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(SLOWEST)))


# The offline Llama-3 tokenizer takes 1.1 s to load (its 9 MB tokenizer.json is parsed twice, by the Rust tokenizer and
# by transformers), and the in-process tests asked for it 22 times (28.9 CPU s): each worker builds it once (in its own
# cache folder, so the conversion runs too), the `tok` fixture is that object, and `load_tokenizer("llama3-offline")`
# without a cache folder (the command lines, TextSource, the README's snippets) hands out the same one. The library
# never changes a tokenizer it is given. Calls with their own cache_dir (test_tokenizer) load for real, as do the
# command lines the tests start as subprocesses.
_TOKENIZER: list = []


def _shared_tokenizer(basetemp: Path):
    if not _TOKENIZER:
        from sae_jax.tokenizer import llama3_tokenizer

        _TOKENIZER.append(llama3_tokenizer(basetemp / "sae_jax_cache"))
    return _TOKENIZER[0]


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The offline Llama-3 tokenizer (llama-models' tiktoken file), built once per worker."""
    return _shared_tokenizer(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session", autouse=True)
def _one_tokenizer(tmp_path_factory):
    from sae_jax import tokenizer

    real = tokenizer.llama3_tokenizer

    def shared(cache_dir=None):
        return real(cache_dir) if cache_dir is not None else _shared_tokenizer(tmp_path_factory.getbasetemp())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer, "llama3_tokenizer", shared)
        yield


@pytest.fixture(scope="session")
def ws(tmp_path_factory, tok):
    """A tiny 4-layer Llama with the real vocabulary, 40 chat rows and two SAEs (`sae_helpers.Workspace`), for the
    command-line tests; they only read it."""
    from sae_helpers import cli_workspace

    return cli_workspace(tmp_path_factory.mktemp("cli"), tok)


@pytest.fixture(scope="module")
def synthetic_once():
    """Within the module, each synthetic batch is generated once: `SyntheticSource.next_batch` keeps what it returns
    per (data config, width, batch size, seed, index) and hands out copies after. For modules whose runs train on the
    same batches (test_arch_recovery: 5 recipes on one set; test_train_run), where the generator took 24 CPU s."""
    from sae_jax.data.synthetic import SyntheticSource

    memo, real = {}, SyntheticSource.next_batch

    def next_batch(self):
        key = (self.cfg, self.d_in, self.batch_size, self.seed, self.index)
        if key in memo:
            self.index += 1
        else:
            memo[key] = real(self)
        return memo[key].copy()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SyntheticSource, "next_batch", next_batch)
        yield
    memo.clear()


def pytest_unconfigure(config):
    if _MADE_CACHE:
        shutil.rmtree(os.environ["SAE_JAX_TEST_XLA_CACHE"], ignore_errors=True)
