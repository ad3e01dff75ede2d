"""Wall time and peak memory of a block of work, on CUDA or on the CPU.

On CUDA the peak is `torch.cuda.max_memory_allocated` (tensors only: what a memory budget is
about; the CUDA context, ~0.5 GiB, is not included). On the CPU it is the process's resident-set
high-water mark (VmHWM), reset through /proc/self/clear_refs so the peak belongs to the measured
work and not to something larger before it (`ru_maxrss` cannot be reset). The figure is labelled
`process_rss` so nobody compares it with GPU numbers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


@dataclass
class Measurement:
    wall_time_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_reserved_bytes: int | None = None
    in_use_before_bytes: int = 0
    memory_kind: str = ""

    @property
    def peak_memory_mib(self) -> float:
        return self.peak_memory_bytes / MIB


def memory_kind(device: torch.device) -> str:
    return "cuda_allocated" if device.type == "cuda" else "process_rss"


def _proc_status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: CPU peak memory needs Linux")
    return int(match.group(1)) * 1024


def reset_peak_memory(device: torch.device) -> int:
    """Start a new peak; return the bytes in use now (weights, caches)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # so `reserved` reflects what follows, not an earlier cache
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def peak_memory(device: torch.device) -> tuple[int, int | None]:
    """(peak bytes, peak reserved bytes or None on CPU) since the last `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return _proc_status_bytes("VmHWM"), None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MAX_TIMED_CALLS = 200  # a row's cap on timed calls, however short each call


def call_times(fn: Callable[[], Any], device: torch.device, *, calls: int, min_time_s: float = 0.0,
               max_calls: int = MAX_TIMED_CALLS) -> list[float]:
    """Wall times (s) of at least `calls` calls of `fn`, each waited for on `device`, and more until
    `min_time_s` of calls have passed (at most `max_calls`). The one timing loop of the bench and of
    notebook 06's sweep, so the two report the same statistic of the same calls."""
    synchronize(device)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < calls or (time.perf_counter() - began < min_time_s and len(times) < max_calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class measure:
    """`with measure(device) as m: ...` then read `m.wall_time_s`, `m.peak_memory_bytes`."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.result = Measurement(memory_kind=memory_kind(self.device))

    def __enter__(self) -> Measurement:
        synchronize(self.device)
        self.result.in_use_before_bytes = reset_peak_memory(self.device)
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc_info: object) -> None:
        synchronize(self.device)
        self.result.wall_time_s = time.perf_counter() - self._start
        self.result.peak_memory_bytes, self.result.peak_reserved_bytes = peak_memory(self.device)
