"""Peak memory of one call, for the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _release_free_heap() -> None:
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes ``fn()`` needs above what was allocated before it: the CUDA allocator's peak on GPU; on CPU the
    resident-set peak, sampled every millisecond by a thread (a close lower bound)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _release_free_heap()  # otherwise memory freed by an earlier call is reused without growing the RSS
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(0, max(peak[0], _rss_bytes()) - base)
