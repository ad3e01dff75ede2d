"""The Triton kernel tests' shared set-up: compiled on a GPU, else Triton's interpreter on CPU.

`TRITON_INTERPRET=1` is read when the kernels are decorated, i.e. when their module is imported, so
a test module calls :func:`device_or_skip` before importing them. The module is skipped where Triton
is not installed, and in the interpreter under NumPy >= 2.4 (Triton 3.6's interpreter then cannot
loop over tensor bounds: `int()` of a 1-element array; use NumPy < 2.4 there)."""

from __future__ import annotations

import os

import pytest
import torch


def device_or_skip() -> str:
    """"cuda" where a GPU is, else "cpu" with the interpreter on; skips the calling module otherwise."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    import numpy as np

    if not cuda and tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip(f"Triton's interpreter loops over tensor bounds with int(), which NumPy {np.__version__} refuses "
                    "for 1-element arrays: run with NumPy < 2.4", allow_module_level=True)
    return "cuda" if cuda else "cpu"
