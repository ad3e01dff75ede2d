"""Checks for the public API's arguments: a value is refused when its type is not what it says.

Python reads any object as a boolean, so `load(..., bf16_copy="no")` would mean yes, and
`encode_queries(..., padded="no")` would return the padded tuple; a float batch size or `True` as a
count would fail deep inside, or not at all. The functions here run before any work, and each
error names the argument, the value and what to pass instead.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch


def require_flag(name: str, value: Any, *, none_means: str | None = None) -> None:
    """`value` is True or False (or None, when `none_means` says what None does)."""
    if isinstance(value, bool) or (value is None and none_means is not None):
        return
    choices = "True or False" + (f", or None ({none_means})" if none_means is not None else "")
    raise TypeError(f"{name}={value!r} is not a boolean: pass {choices}")


def require_count(name: str, value: Any, minimum: int) -> None:
    """`value` is an integer (Python's or numpy's; not a bool, a float or a string) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this machine has: a CUDA device without a GPU (or past the
    last one) is refused here, with the fix, instead of as torch's AssertionError at the first copy."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:  # torch lists its two dozen device types
        raise ValueError(f"device={device!r} is not a device: pass 'auto' (CUDA when present, else CPU), 'cpu', "
                         "'cuda' or 'cuda:N'") from error
    reason = cuda_unavailable_reason(str(resolved)) if resolved.type == "cuda" else None
    if reason is not None:
        raise ValueError(f"device={str(device)!r}: {reason}; pass device='auto' (CUDA when present, else CPU) or 'cpu'")
    return resolved


def cuda_unavailable_reason(device: str) -> str | None:
    """Why `device` (cpu, auto, cuda, cuda:N) cannot run here, or None when it can."""
    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return f"this machine has no CUDA device (torch {torch.__version__})"
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    return f"this machine has {count} CUDA device(s), so {device} does not exist" if index >= count else None
