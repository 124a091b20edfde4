"""Keep freed CPU memory in the process: a process-level setting for MAML's large tensors.

:func:`tune_cpu_allocator` keeps freed memory in the process instead of handing it back to
the OS. MAML allocates and frees the same large activation and graph tensors every
meta-iteration; with glibc's defaults each large block is a fresh ``mmap`` that the kernel
zero-fills page by page. Measured on 2 CPU cores (torch 2.13, 1 thread, Conv-4 5-way 1-shot,
vmap over 16 tasks): 2.1 s of system time per meta-iteration (~600k page faults) on ~4 s of
compute, gone after tuning; the per-task loop saves 2-8%. The cost: the process keeps its
peak memory (RSS does not shrink after a large step). It changes the whole process, so the
library never calls it by itself; the programs that own their process do: the ``metattn``
command line (``METATTN_MALLOC_TUNE=0`` opts out; runs record ``malloc_tuned`` in
summary.json) and the benchmarks (for every method alike). Measured for a ProtoNet training
step of ``configs/omniglot_5w1s_protonet_cpu.yaml`` (Conv-4 forward and backward on 180
images, channels-last, Adam; 2 threads): 241-281 ms -> 176-193 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator() -> bool:
    """Serve large CPU tensors from the heap and never trim it (glibc ``mallopt``).

    Returns True when applied (Linux with glibc), False elsewhere (then nothing changes).
    Idempotent. PyTorch's own knob for the same cost, ``THP_MEM_ALLOC_ENABLE=1`` (huge pages),
    must be set in the environment before ``import torch``; this one works at any time.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # blocks up to 1 GiB come from the heap (not mmap), and the heap is never trimmed
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _tuned = bool(ok)
    return _tuned


def cpu_allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has been applied in this process."""
    return _tuned
