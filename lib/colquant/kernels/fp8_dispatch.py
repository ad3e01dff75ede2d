"""Where `FP8Linear` layers run the fused FP8 kernels, and which quantizing producers feed them.

`colquant.retriever.fp8.FP8Linear` computes the dequantized reference (PyTorch, any device) until kernels are
attached to it: :func:`attach` gives each FP8 layer of a model :data:`KERNELS`, which decides per call
whether the fused kernels serve it (a CUDA GPU of compute capability 8.9 or more with Triton, bf16
activations, GEMM widths that are multiples of 16, `force_reference` off) and runs them: the fused
row quantization and `torch._scaled_mm` of :mod:`.fp8_ops`. `colquant.load` attaches them to every
FP8 checkpoint it loads, :func:`~colquant.kernels.accelerate_model` to every model it accelerates.
The path taken is logged once per device, naming the reason where it is the reference.

This module imports no Triton (:mod:`.fp8_ops` is imported on first use, on a GPU that has it), so
the choice is made, and said, on any machine.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from colquant.kernels.backend import gpu_unavailable, triton_import_error, warn_once
from colquant.kernels.linear import _FORCE_REFERENCE
from colquant.retriever.fp8 import FP8Linear, ReferenceProducers


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """None when the FP8 kernels (Triton quantization + `_scaled_mm`) can run on ``device``; else why not."""
    return gpu_unavailable(device, "the FP8 path", triton_import_error, min_capability=(8, 9),
                           needed_for="FP8 tensor cores")


@functools.cache
def kernels_run_on(device: str) -> bool:
    """Cached per device (this sits on every FP8 Linear call); logs once which path runs."""
    reason = fp8_unavailable_reason(device)
    if reason is None:
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        warn_once(f"fp8:{device}", f"FP8Linear: fused FP8 quantization + torch._scaled_mm on {device} "
                                   f"(compute capability {major}.{minor})", level=logging.INFO)
        return True
    on_cpu = torch.device(device).type == "cpu"
    warn_once(f"fp8-ref:{reason}", f"FP8Linear: running the dequantized reference (PyTorch) because {reason}",
              level=logging.INFO if on_cpu else logging.WARNING)
    return False


@functools.cache
def _fp8_ops() -> Any:
    """The Triton kernels module, imported once (an import statement per call costs host time on
    every Linear of the eager page path)."""
    from colquant.kernels import fp8_ops

    return fp8_ops


def producers(device: torch.device | str) -> Any:
    """The quantizing producers for activations on ``device``: the fused Triton kernels
    (:mod:`.fp8_ops`) where FP8 layers run their kernels, else `ReferenceProducers` (same names,
    same arithmetic in PyTorch)."""
    if _FORCE_REFERENCE[0] or not kernels_run_on(str(device)):
        return ReferenceProducers
    return _fp8_ops()


class FP8Kernels:
    """What :func:`attach` gives an FP8Linear: whether the fused kernels serve a call, and the kernels."""

    @staticmethod
    def serves(layer: FP8Linear, rows: torch.Tensor, out_dtype: torch.dtype) -> bool:
        """The FP8 kernels serve this call: bf16 output (rowwise `_scaled_mm`'s only type), GEMM widths
        it takes, at least one row, and a device that has them (checked once per device, and logged)."""
        if rows.shape[0] == 0 or _FORCE_REFERENCE[0] or not kernels_run_on(str(rows.device)):
            return False
        if out_dtype == torch.bfloat16 and layer.gemm_shape_ok:
            return True
        why = (f"its activations are {out_dtype} (rowwise torch._scaled_mm outputs bfloat16 only; load the model in "
               "bfloat16)" if out_dtype != torch.bfloat16 else
               f"its widths {layer.in_features}->{layer.out_features} are not multiples of 16 (FP8 GEMM)")
        warn_once(f"fp8-layer:{why}", f"FP8Linear: a layer runs the dequantized reference on {rows.device} because {why}")
        return False

    @staticmethod
    def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _fp8_ops().quantize_rows(x)

    @staticmethod
    def scaled_mm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, *, fast_accum: bool) -> torch.Tensor:
        return _fp8_ops().scaled_mm(q, scale, weight, weight_scale, bias, out_dtype, fast_accum=fast_accum)


KERNELS = FP8Kernels()


def attach(model: nn.Module) -> int:
    """Let every FP8Linear of ``model`` run the fused FP8 kernels wherever they can (each call checks,
    see `FP8Kernels.serves`); returns how many layers. A model without FP8 layers is left as it is."""
    layers = [module for module in model.modules() if isinstance(module, FP8Linear)]
    for layer in layers:
        layer.kernels = KERNELS
    return len(layers)
