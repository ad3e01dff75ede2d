"""Wall time and peak memory of a block of work, on CUDA or on the CPU.

On CUDA the peak is `torch.cuda.max_memory_allocated` (tensors only, what a memory budget is about).
On the CPU there is no allocator peak to reset, so a background thread samples the process's
resident set size; the figure is labelled `process_rss` so nobody compares it with GPU numbers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil
import torch

SAMPLE_INTERVAL_S = 0.02


@dataclass
class Measurement:
    wall_time_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""

    @property
    def peak_memory_mib(self) -> float:
        return self.peak_memory_bytes / 2**20


class measure:
    """`with measure(device) as m: ...` then read `m.wall_time_s`, `m.peak_memory_bytes`."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.result = Measurement(memory_kind="cuda_allocated" if self.device.type == "cuda" else "process_rss")
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
            self._sampler.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        self.result.wall_time_s = time.perf_counter() - self._start
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()

    def _sample_rss(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.result.peak_memory_bytes = max(self.result.peak_memory_bytes, process.memory_info().rss)
            self._stop.wait(SAMPLE_INTERVAL_S)
