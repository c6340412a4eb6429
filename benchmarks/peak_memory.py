"""Peak extra memory of a call: what it needs above what the process held before it."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Run ``fn`` once and return its peak memory above the level before it, in bytes.

    CUDA: the caching allocator's peak. CPU (Linux): the process's resident-set high-water mark,
    reset through /proc/self/clear_refs just before the call, so every allocator counts (torch,
    numpy, numba, OpenMP thread stacks), not only torch tensors.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # Memory freed earlier but kept by malloc would be reused without raising the resident set,
    # hiding the call's needs: hand it back to the system first.
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    fn()
    return (_status_kib("VmHWM") - before) * 1024
