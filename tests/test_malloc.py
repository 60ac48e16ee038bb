"""`sae_jax.malloc.keep_freed_memory`: a step's large temporary is mapped once, not page-faulted again every call.

Each case runs in a fresh interpreter (the allocator is per process): a jitted
function whose [8192, 8192] float32 product (256 MiB, 65536 pages) is a
temporary, called four times. With glibc's defaults every call maps and
faults the block again; kept, only the first call does.
"""

import json
import os
import subprocess
import sys

import pytest

PAGES = 8192 * 8192 * 4 // 4096

PROBE = """
import json, resource
from sae_jax.malloc import keep_freed_memory
kept = keep_freed_memory()
import jax, jax.numpy as jnp
x, w = jnp.ones((8192, 8), jnp.float32), jnp.ones((8, 8192), jnp.float32)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w), axis=0))
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def probe(system: bool) -> dict:
    env = {**os.environ, "SAE_JAX_SYSTEM_MALLOC": "1" if system else "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_kept_malloc_faults_the_temporary_once_system_malloc_every_call():
    kept, system = probe(system=False), probe(system=True)
    assert kept["kept"] is True and system["kept"] is False
    # Later calls: kept reuses the heap (well under 1% of the block's pages), the default maps it afresh.
    assert max(kept["faults"][1:]) < PAGES // 100, kept
    assert min(system["faults"][1:]) > PAGES * 9 // 10, system
