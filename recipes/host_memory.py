"""Keep freed host memory for reuse when the step runs on the CPU: what CUDA's caching allocator does on a GPU.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
free, so each large activation of a CPU step is page-faulted in and zeroed by the kernel again, every step. A
PyramidCLIP step at batch 64 (bench/step.py's model) took 650,000 minor faults and 1.4 s of system time that way,
against 85,000 for CLIP: its stacked views and texts make more of its tensors cross the threshold, so the
churn grew faster than its FLOPs (docs/performance.md, "Training step"). With mmap off and trimming off, freed
blocks stay in the heap and the next step's tensors of the same sizes reuse them: no faults after the first
step. The cost is that the resident set stays at its peak, as a GPU's reserved memory does.

Only on glibc, and only when the environment sets no glibc malloc tuning of its own (`MALLOC_*_` variables:
the memory benchmarks lower the threshold so freed tensors leave the resident set, and measure that).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("hiclip")

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _glibc_tuning_in_env() -> list[str]:
    return sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming in this process (and the workers it forks).

    Returns whether it did; False off glibc or when `MALLOC_*_` variables already tune the allocator.
    """
    tuning = _glibc_tuning_in_env()
    if tuning:
        log.debug("host memory: glibc tuning from the environment (%s) left as it is", ", ".join(tuning))
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): the allocator keeps its own policy
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt takes an int: the largest trim threshold is 2 GiB of free heap top (mallopt(3)'s -1 for "never"
    # had no effect on glibc 2.36 here). A step that frees more at once gives the excess back, and faults it in
    # again next step; `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes>` in the environment (a size_t there) does
    # the same without that limit.
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        log.warning("host memory: mallopt refused; large CPU tensors will be page-faulted in every step")
    return ok
