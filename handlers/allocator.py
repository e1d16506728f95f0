"""glibc ``malloc`` settings for a process that runs torch on the CPU.

Torch allocates a fresh tensor for every activation and gradient and frees it right after.
With glibc's defaults a large block comes from ``mmap`` and goes back to the kernel when
freed (the threshold starts at 128 KiB and only grows by trial), and the heap's free top is
handed back above 128 KiB, so every pass over a large batch page-faults its memory in again,
zeroed by the kernel. Keeping freed memory in the heap removes that work and changes no
value; the multi-pass explainers gain most, for a little more resident memory, and turning
``mmap`` off altogether (``M_MMAP_MAX = 0``) gains nothing more and keeps more memory
(measured: benchmarks/results/inference.md).

The TorchServe adapter applies this when a worker starts; the speed benchmarks apply it to
their own process, so that what they time is what the service runs.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks up to this size come from the heap (glibc's largest allowed value on 64 bits)."""
TRIM_THRESHOLD = 256 * 1024 * 1024
"""Free memory kept at the heap's top before any is given back to the kernel."""
TOP_PAD = 16 * 1024 * 1024
"""Extra memory asked from the kernel whenever the heap grows."""


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks up to 32 MiB for reuse; ``False`` where not glibc.

    Process-wide and idempotent. A worker's memory stays near its peak use (plus at most
    :data:`TRIM_THRESHOLD` of free heap) instead of shrinking after every request.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (M_TOP_PAD, TOP_PAD))  # fmt: skip
    applied = all(mallopt(option, value) == 1 for option, value in settings)
    if not applied:
        log.warning("glibc refused the malloc settings; keeping its defaults")
    return applied
