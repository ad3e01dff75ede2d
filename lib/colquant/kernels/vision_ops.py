"""Triton kernels of the fast vision tower's residual stream: the residual add fused into the next LayerNorm.

Why: a ViT block adds its attention output and its MLP output to the residual stream, and each add is
followed by a LayerNorm of the sum. Run as torch ops that is two passes over the (patches, hidden)
activation per add: the add (read two, write one) and the LayerNorm (read one, write one); on the
H200 a 16-page batch spent 11.2 ms in 52 LayerNorms and 6.0 ms in 55 adds
(benchmarks/results/kernel-breakdown-h200.log). One kernel reads ``x`` and ``delta`` once and writes
both the new residual ``x + delta`` and LayerNorm of it:

* :func:`add_layernorm`: ``(x + delta, LayerNorm(x + delta))`` for a 16-bit consumer;
* :func:`add_layernorm_quant`: the same with the normed rows quantized to e4m3 per row (one fp32 scale
  a row) for an FP8 consumer (fp8-all), replacing the separate residual add and LayerNorm.

Rounding as transformers' eager tower: the residual is rounded to the activation dtype (``x + delta``
in bf16), the LayerNorm statistics and affine map are computed in float32 from that rounded residual and
the output is rounded to the activation dtype (what ``nn.LayerNorm`` returns), before quantization.

Imported only where Triton is (like :mod:`.triton_ops`); the torch twins live in
:mod:`colquant.kernels.fast_vision` and are what CPU runs. On CPU the kernels can be checked with
``TRITON_INTERPRET=1`` on small shapes (tests/kernels/test_vision_ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from colquant.fp8 import FP8_DTYPE
from colquant.kernels.fp8_ops import _common_args, _store_quantized

__all__ = ["add_layernorm", "add_layernorm_quant"]


@triton.jit
def _add_layernorm_rows(x_ptr, d_ptr, w_ptr, b_ptr, r_ptr, row, offs, mask, N, eps, HAS_BIAS: tl.constexpr):
    """Store ``r = x + delta`` (activation dtype) for one row and return LayerNorm(r), rounded to the
    activation dtype, as float32."""
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
    d = tl.load(d_ptr + row * N + offs, mask=mask, other=0.0)
    r = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
    tl.store(r_ptr + row * N + offs, r, mask=mask)
    rf = r.to(tl.float32)
    mean = tl.sum(rf, axis=0) / N
    centred = tl.where(mask, rf - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / N + eps)
    y = centred * rstd * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return y.to(x.dtype).to(tl.float32)


@triton.jit
def _add_layernorm_kernel(x_ptr, d_ptr, w_ptr, b_ptr, r_ptr, y_ptr, N, eps, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    y = _add_layernorm_rows(x_ptr, d_ptr, w_ptr, b_ptr, r_ptr, row, offs, mask, N, eps, HAS_BIAS)
    tl.store(y_ptr + row * N + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_layernorm_quant_kernel(x_ptr, d_ptr, w_ptr, b_ptr, r_ptr, q_ptr, s_ptr, N, eps, HAS_BIAS: tl.constexpr,
                                BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr, FLOOR: tl.constexpr,
                                EMULATE_ROUNDING: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    y = _add_layernorm_rows(x_ptr, d_ptr, w_ptr, b_ptr, r_ptr, row, offs, mask, N, eps, HAS_BIAS)
    # the text tower's producers' quantized store: same scale and rounding as the torch twin
    _store_quantized(y, q_ptr, s_ptr, row, offs, mask, N, FP8_MAX_C, FLOOR, EMULATE_ROUNDING)


def _checked(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    """(rows, width) of two equal, contiguous 2-D activations normed over a width-long weight."""
    if x.dim() != 2 or x.shape != delta.shape or x.dtype != delta.dtype or weight.shape != (x.shape[1],):
        raise ValueError(f"add_layernorm takes x and delta of one 2-D shape and dtype and a weight of their width; "
                         f"got x {tuple(x.shape)} {x.dtype}, delta {tuple(delta.shape)} {delta.dtype}, "
                         f"weight {tuple(weight.shape)}")
    return x.shape[0], x.shape[1]


def _launch(n: int) -> dict:
    """One program per row holding the whole row; one warp per 256 elements (4 for the ViT's 1,024)."""
    block = triton.next_power_of_2(n)
    return {"BLOCK": block, "num_warps": min(16, max(1, block // 256))}


def add_layernorm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, LayerNorm(r) * weight + bias)`` with ``r = x + delta``, both in ``x``'s dtype, in one pass."""
    m, n = _checked(x, delta, weight)
    x, delta = x.contiguous(), delta.contiguous()
    r, y = torch.empty_like(x), torch.empty_like(x)
    if m:
        _add_layernorm_kernel[(m,)](x, delta, weight, bias if bias is not None else weight, r, y, n, eps,
                                    HAS_BIAS=bias is not None, **_launch(n))
    return r, y


def add_layernorm_quant(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(r, e4m3 rows, fp32 scales [M, 1])``: :func:`add_layernorm` with the normed rows quantized per
    row (the FP8 qkv / fc1 input), in one pass."""
    m, n = _checked(x, delta, weight)
    x, delta = x.contiguous(), delta.contiguous()
    r = torch.empty_like(x)
    q = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _add_layernorm_quant_kernel[(m,)](x, delta, weight, bias if bias is not None else weight, r, q, s, n, eps,
                                          HAS_BIAS=bias is not None, **_common_args(), **_launch(n))
    return r, q, s
