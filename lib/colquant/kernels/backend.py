"""Which kernel backend can run here, and why not when it cannot; where tuning results are kept.

The fast path needs a CUDA device and Triton. Anything else (CPU, no Triton, an old GPU) runs the
reference path (dequantize + torch matmul, torch ops for the fused kernels) and says so once, in a
logged warning naming what is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

logger = logging.getLogger("colquant.kernels")

_WARNED: set[str] = set()


def warn_once(key: str, message: str, level: int = logging.WARNING) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.log(level, message)


def clear_cache() -> None:
    """Forget cached backend decisions (tests, env changes)."""
    _FAST_CACHE.clear()
    triton_import_error.cache_clear()


def package_import_error(package: str, disable_env: str, install_hint: str, modules: Sequence[str]) -> str | None:
    """None when every one of ``modules`` imports, else a one-line reason naming ``package``: switched
    off by ``disable_env``, not installed (``install_hint`` says what to install), or failing to import.
    One probe for every optional kernel package (Triton, humming-kernels), so they all say why alike."""
    if os.environ.get(disable_env, "") not in ("", "0"):
        return f"{package} disabled by {disable_env}"
    if importlib.util.find_spec(modules[0]) is None:
        return f"{package} is not installed ({install_hint})"
    try:
        for module in modules:
            importlib.import_module(module)
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"{package} failed to import ({type(exc).__name__}: {str(exc)[:160]})"
    return None


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton (and the project's Triton kernels) import, else a one-line reason."""
    return package_import_error("Triton", "COLQUANT_DISABLE_TRITON", "pip install 'colquant[gpu]' or triton>=3.4",
                                ("triton", "triton.language", "colquant.kernels.triton_ops"))


def gpu_unavailable(device: torch.device | str, what: str, missing: Callable[[], str | None], *,
                    min_capability: tuple[int, int] = (8, 0), needed_for: str = "bf16 tensor cores") -> str | None:
    """None when ``what`` (a kernel family) can run on ``device``; otherwise why not: not a CUDA
    device, no CUDA, what it depends on missing (``missing()``: a package failing to import, a torch
    op absent), or a GPU below ``min_capability`` (``needed_for`` says what needs it).
    Every kernel family's availability goes through this one check, so the reasons read alike."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device is {device.type}, {what} needs a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    err = missing()
    if err:
        return err
    capability = torch.cuda.get_device_capability(device)
    if capability < min_capability:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                f"{needed_for} need {min_capability[0]}.{min_capability[1]} or more")
    return None


def fast_path_unavailable(device: torch.device | str | None) -> str | None:
    """None when the Triton fast path can run on ``device``; otherwise why not."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return gpu_unavailable(device, "the fused W4A16 path", triton_import_error)


_FAST_CACHE: dict = {}


def use_fast_path(device) -> bool:
    """True on CUDA with Triton; else logs (once per reason) that the reference path runs.
    Cached per device (this sits on every Linear call)."""
    key = str(device)
    hit = _FAST_CACHE.get(key)
    if hit is not None:
        return hit
    reason = fast_path_unavailable(device)
    _FAST_CACHE[key] = reason is None
    if reason is None:
        return True
    on_cpu = torch.device(device).type == "cpu" if device is not None else True
    warn_once(
        "ref:" + reason,
        f"colquant.kernels: using the reference path (dequantize + torch.matmul) because {reason}.",
        level=logging.INFO if on_cpu else logging.WARNING,
    )
    return False


_CAPTURE_STREAMS: dict = {}


def capture_stream(device) -> torch.cuda.Stream:
    """One side stream per device for CUDA-graph warm-ups and captures (the model's query graphs and
    the tuner's timings): every new stream that runs a cuBLAS call gets its own, never-freed cuBLAS
    workspace."""
    device = torch.device(device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[key] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[key]


def graph_time_us(fn, n_inner: int, device: torch.device, reps: int = 10) -> float:
    """Median µs per GEMM of ``fn`` (``n_inner`` GEMMs over rotating weights) replayed as a CUDA graph:
    launch overhead counts as it does in the model's graphed query path."""
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / n_inner)
    del graph
    return statistics.median(times)


def default_cache_dir() -> Path:
    """``$COLQUANT_CACHE_DIR`` if set (optional), else ``$XDG_CACHE_HOME/colquant/kernels`` or
    ``~/.cache/colquant/kernels``."""
    if os.environ.get("COLQUANT_CACHE_DIR"):
        return Path(os.environ["COLQUANT_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "colquant" / "kernels"


def slug(text: str) -> str:
    """``text`` as a file-name part: letters, digits and dots, other runs as one dash, lower case."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()
