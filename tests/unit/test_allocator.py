"""glibc keeps a worker's freed tensors for reuse once the allocator is tuned."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import torch
from handlers.allocator import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert retain_freed_memory()
block = torch.ones(5 * 1024 * 1024)  # 20 MiB of activations, say
del block
print(libc.mallinfo2().fordblks)  # free bytes the heap kept
"""


def _free_heap_after_a_20_mib_tensor(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_freed_tensor_stays_in_the_heap_only_when_tuned() -> None:
    mib = 1024 * 1024
    assert _free_heap_after_a_20_mib_tensor("default") < 20 * mib  # mmap'd, given back
    assert _free_heap_after_a_20_mib_tensor("tuned") >= 20 * mib  # kept for the next pass
