"""Keep freed host memory mapped, so XLA:CPU's per-step buffers do not page-fault every step.

XLA:CPU allocates each execution's temporaries as one block (about 0.9 GB for
a release-size SAE step: the [D, N] gradients among them) with
`posix_memalign` from its worker threads. glibc serves a block that large
from a fresh `mmap` in the thread's arena and unmaps it on `free`, so every
step the kernel maps and zero-fills the whole block again: 240k page faults
and 0.4-0.9 s of kernel time per release-size step on the 2-core machine of
bench/sae_step.py, more than the step's arithmetic. One arena, no `mmap` and
no trimming make freed blocks stay in the heap for the next step (0 faults
after the first three steps).

`train.py` and the benchmarks call `keep_freed_memory()` first; the library
itself never changes the allocator. `SAE_JAX_SYSTEM_MALLOC=1` opts out.
The cost: the process keeps its peak host memory until it exits, and
fragmentation adds to that peak (a release-size run on synthetic data with
evals every 10 steps: 10.1 GB peak RSS against 7.0 GB, 12% less wall time).
On a GPU the step's buffers live in device memory and this changes little.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters, from glibc's malloc.h; a trim threshold of -1 turns trimming off (mallopt(3)).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Set glibc's malloc to one arena, no mmap, no trimming; True if it was set.

    A no-op (False) off Linux/glibc or with SAE_JAX_SYSTEM_MALLOC=1. Call it
    before the first JAX computation: threads pick their arena at their first
    allocation.
    """
    if os.environ.get("SAE_JAX_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
