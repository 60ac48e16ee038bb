"""What every test module shares: four fake CPU devices, and the session's fixtures.

JAX fixes its device count when its backend starts, so it is set here, before any
test touches a device: sharding tests run on a 4-device mesh in this process, and
every other test runs on the first device as it would on a one-device machine.
"""

from __future__ import annotations

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")


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
