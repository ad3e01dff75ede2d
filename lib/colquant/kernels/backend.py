"""Which kernel backend can run here, and why not when it cannot.

The fast path needs a CUDA device and Triton. Anything else (CPU, no Triton, an old GPU) runs the
reference path (dequantize + torch matmul, torch ops for the fused kernels) and says so once, in a
logged warning naming what is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable

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
    from colquant.kernels import humming_ops

    humming_ops.clear_cache()


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton imports, else a one-line reason."""
    if os.environ.get("COLQUANT_DISABLE_TRITON", "") not in ("", "0"):
        return "Triton disabled by COLQUANT_DISABLE_TRITON"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'colquant[gpu]' or triton>=3.4)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        from colquant.kernels import triton_ops  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"Triton failed to import ({type(exc).__name__}: {exc})"
    return None


def gpu_unavailable(device: torch.device, what: str, import_error: Callable[[], str | None]) -> str | None:
    """None when `what` (a kernel family) can run on ``device``; otherwise why not: not a CUDA
    device, no CUDA, its package failing to import (`import_error`), or a pre-Ampere GPU."""
    if device.type != "cuda":
        return f"device is {device.type}, {what} needs a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    err = import_error()
    if err:
        return err
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU compute capability {major}.x < 8.0 (bf16 tensor cores needed)"
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


def backend_report(device=None) -> dict:
    """What would run where: for logs, the benchmark JSON and the loader's message."""
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    reason = fast_path_unavailable(device)
    info = {
        "device": str(device),
        "backend": "triton" if reason is None else "reference",
        "reason": reason,
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    # optional GEMM candidates beside the Triton ones (offered to the dispatcher only when available)
    from colquant.kernels import humming_ops

    h_reason = humming_ops.unavailable_reason(device)
    info["candidates"] = {
        "triton": dict(available=reason is None, reason=reason),
        "dequant+cublas": dict(available=reason is None, reason=reason),
        "humming": dict(available=h_reason is None, reason=h_reason, version=humming_ops.version()),
    }
    return info
