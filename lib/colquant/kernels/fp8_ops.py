"""Triton kernels that produce FP8 (e4m3) activations with per-token scales in one pass, the
`torch._scaled_mm` call that consumes them, and the GEMM comparison the bench reports.

Why fused: quantizing an activation with plain PyTorch ops (absmax, divide, clamp, cast) reads and
writes the tensor several times and launches several kernels; measured on the H200 that costs more
than the FP8 GEMM saves over bf16 (issue 14). Each kernel here reads its input once and writes the
FP8 rows plus one fp32 scale per row:

* :func:`quantize_rows`: any bf16/fp16 activation (the standalone fused absmax + scale + cast);
* :func:`add_rmsnorm_quant`: residual add + RMSNorm + quantization (the producer of the q/k/v and
  gate/up inputs in the text tower);
* :func:`silu_mul_quant`: silu(gate) * up + quantization (the producer of the down projection's input);
* :func:`gelu_tanh_quant`: tanh-GELU + quantization (the vision MLP's fc2 input).

The fused towers call them through :func:`.fp8_dispatch.producers` where the next layer is an
:class:`colquant.retriever.fp8.FP8Linear` (:func:`colquant.kernels.fast_text.layer_producers`, and the vision
blocks of :mod:`colquant.kernels.fast_vision`) and pass the ``(q, scale)`` pair on;
`FP8Linear.forward` takes such pairs as they are. Other FP8 inputs (attention outputs) are quantized
inside the layer with :func:`quantize_rows` (:mod:`.fp8_dispatch` attaches it and :func:`scaled_mm`).

Imported only where Triton is (like :mod:`.triton_ops`); their torch twins live in
:mod:`colquant.retriever.fp8` and are what CPU runs. On CPU the kernels can be checked with
``TRITON_INTERPRET=1`` on tiny shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from colquant.kernels.backend import graph_time_us
from colquant.retriever.fp8 import FP8_MAX, SCALE_FLOOR, quantize_rows_reference

__all__ = ["quantize_rows", "add_rmsnorm_quant", "silu_mul_quant", "gelu_tanh_quant", "scaled_mm",
           "gemm_comparison", "lm_shapes", "vision_shapes"]


@triton.jit
def _round_to_e4m3_grid(x):
    """Round fp32 ``x`` (|x| <= 448) to the nearest e4m3 value, ties to even, in fp32.

    The following cast is then exact. Only Triton's CPU interpreter needs it (``EMULATE_ROUNDING``):
    Triton 3.6's interpreter drops the carry when rounding bumps the exponent (7.99 -> 4.0 instead of
    8.0), while the GPU's cast (``cvt.rn.satfinite.e4m3x2.f32``) already rounds to nearest-even, so
    there it would only cost integer ops per element (tests/test_fp8_ops.py checks both paths agree on
    the GPU). Normal range (|x| >= 2^-6): round the fp32 mantissa to 3 bits; subnormals: round to a
    multiple of 2^-9 (adding and subtracting 1.5 * 2^14 does it in fp32)."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # clear 20 low bits
    magic = 24576.0
    sub = (x + magic) - magic
    return tl.where(tl.abs(x) >= 0.015625, normal, sub)


@triton.jit
def _row_scale(amax, FP8_MAX_C: tl.constexpr, FLOOR: tl.constexpr):
    """(scale, 1 / scale) of a row from its absmax, once per row. ``amax / 448`` as main's kernels wrote
    it: on the H200 those scales equal the twin's bit for bit (torch divides by a Python scalar as a
    multiply by its fp32 reciprocal), while an IEEE-rounded ``div_rn`` differed in half the rows
    (benchmarks/results/producers-h200.json). The reciprocal, for :func:`_store_segment`, is IEEE-rounded."""
    scale = tl.maximum(amax / FP8_MAX_C, FLOOR)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def _store_segment(values, q_row_ptr, offs, mask, scale, inv_scale, FP8_MAX_C: tl.constexpr,
                   EMULATE_ROUNDING: tl.constexpr):
    """Store ``values / scale`` as e4m3. The quotient is ``values * (1 / scale)`` corrected by one
    fused multiply-add (Markstein), i.e. the correctly rounded fp32 division that the torch twin
    makes, without a reciprocal (a special-function-unit op, the scarce resource here) per element.
    |quotient| <= 448 up to the scale's rounding; the GPU's cast saturates that to 448 (satfinite), as
    the twin's clamp does, so only the interpreter's emulated rounding clamps first."""
    x = values.to(tl.float32)
    q0 = x * inv_scale
    q = tl.fma(tl.fma(-q0, scale, x), inv_scale, q0)
    if EMULATE_ROUNDING:
        q = _round_to_e4m3_grid(tl.clamp(q, -FP8_MAX_C, FP8_MAX_C))
    tl.store(q_row_ptr + offs, q.to(q_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_quantized(row_values, q_ptr, s_ptr, row, offs, mask, N, FP8_MAX_C: tl.constexpr,
                     FLOOR: tl.constexpr, EMULATE_ROUNDING: tl.constexpr):
    """One whole-row block: absmax, scale, quantized store (the vision producers' layout)."""
    amax = tl.max(tl.where(mask, tl.abs(row_values), 0.0), axis=0)
    scale, inv_scale = _row_scale(amax, FP8_MAX_C, FLOOR)
    _store_segment(row_values, q_ptr + row * N, offs, mask, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    tl.store(s_ptr + row, scale)


@triton.jit
def _segment_offsets(START: tl.constexpr, SIZE: tl.constexpr, N):
    offs = START + tl.arange(0, SIZE)
    return offs, offs < N


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, N, stride_x, S0: tl.constexpr, S1: tl.constexpr,
                          S2: tl.constexpr, FP8_MAX_C: tl.constexpr, FLOOR: tl.constexpr,
                          EMULATE_ROUNDING: tl.constexpr):
    """One row per program, held in registers as up to three power-of-two segments S0 + S1 + S2 >= N
    (:func:`_row_segments`): no lanes are wasted on a power-of-two block's masked tail."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    o0, m0 = _segment_offsets(0, S0, N)
    x0 = tl.load(x_row + o0, mask=m0, other=0.0)
    amax = tl.max(tl.abs(x0.to(tl.float32)), axis=0)
    if S1 > 0:
        o1, m1 = _segment_offsets(S0, S1, N)
        x1 = tl.load(x_row + o1, mask=m1, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x1.to(tl.float32)), axis=0))
    if S2 > 0:
        o2, m2 = _segment_offsets(S0 + S1, S2, N)
        x2 = tl.load(x_row + o2, mask=m2, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x2.to(tl.float32)), axis=0))
    scale, inv_scale = _row_scale(amax, FP8_MAX_C, FLOOR)
    q_row = q_ptr + row * N
    _store_segment(x0, q_row, o0, m0, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    if S1 > 0:
        _store_segment(x1, q_row, o1, m1, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    if S2 > 0:
        _store_segment(x2, q_row, o2, m2, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    tl.store(s_ptr + row, scale)


@triton.jit
def _add_residual(res_ptr, delta_ptr, res_out_ptr, row_offset, offs, mask, HAS_DELTA: tl.constexpr):
    """One segment of ``h = residual + delta``, rounded to and stored in the activation dtype (the
    residual stream's dtype); returned in fp32."""
    h = tl.load(res_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        h = h + tl.load(delta_ptr + row_offset + offs, mask=mask, other=0.0).to(tl.float32)
        h = h.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row_offset + offs, h, mask=mask)
        h = h.to(tl.float32)
    return h


@triton.jit
def _rmsnorm_segment(h, rstd, w_ptr, offs, mask, act_dtype: tl.constexpr):
    """transformers' Qwen3 RMSNorm of one segment: normalise in fp32, cast to the activation dtype,
    then scale by w, rounded to the activation dtype again."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return ((h * rstd).to(act_dtype).to(tl.float32) * w).to(act_dtype)


@triton.jit
def _add_rmsnorm_quant_kernel(res_ptr, delta_ptr, w_ptr, res_out_ptr, q_ptr, s_ptr, N, eps,
                              HAS_DELTA: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                              FP8_MAX_C: tl.constexpr, FLOOR: tl.constexpr, EMULATE_ROUNDING: tl.constexpr):
    """Residual add, RMSNorm and quantization of one row held in registers as up to three
    power-of-two segments (N = 2,560 = 2,048 + 512: no masked lanes)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    act_dtype: tl.constexpr = res_out_ptr.dtype.element_ty
    o0, m0 = _segment_offsets(0, S0, N)
    h0 = _add_residual(res_ptr, delta_ptr, res_out_ptr, base, o0, m0, HAS_DELTA)
    sq = tl.sum(h0 * h0, axis=0)
    if S1 > 0:
        o1, m1 = _segment_offsets(S0, S1, N)
        h1 = _add_residual(res_ptr, delta_ptr, res_out_ptr, base, o1, m1, HAS_DELTA)
        sq += tl.sum(h1 * h1, axis=0)
    if S2 > 0:
        o2, m2 = _segment_offsets(S0 + S1, S2, N)
        h2 = _add_residual(res_ptr, delta_ptr, res_out_ptr, base, o2, m2, HAS_DELTA)
        sq += tl.sum(h2 * h2, axis=0)
    rstd = tl.rsqrt(sq / N + eps)
    y0 = _rmsnorm_segment(h0, rstd, w_ptr, o0, m0, act_dtype)
    amax = tl.max(tl.abs(y0.to(tl.float32)), axis=0)
    if S1 > 0:
        y1 = _rmsnorm_segment(h1, rstd, w_ptr, o1, m1, act_dtype)
        amax = tl.maximum(amax, tl.max(tl.abs(y1.to(tl.float32)), axis=0))
    if S2 > 0:
        y2 = _rmsnorm_segment(h2, rstd, w_ptr, o2, m2, act_dtype)
        amax = tl.maximum(amax, tl.max(tl.abs(y2.to(tl.float32)), axis=0))
    scale, inv_scale = _row_scale(amax, FP8_MAX_C, FLOOR)
    q_row = q_ptr + base
    _store_segment(y0, q_row, o0, m0, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    if S1 > 0:
        _store_segment(y1, q_row, o1, m1, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    if S2 > 0:
        _store_segment(y2, q_row, o2, m2, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    tl.store(s_ptr + row, scale)


@triton.jit
def _silu_mul_segment(gu_row_ptr, offs, mask, N):
    """silu(gate) * up of one segment as transformers computes it in bf16: silu(gate) rounded to the
    activation dtype, times up, rounded again; returned in the activation dtype (half the registers)."""
    act_dtype: tl.constexpr = gu_row_ptr.dtype.element_ty
    g = tl.load(gu_row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_row_ptr + N + offs, mask=mask, other=0.0).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(act_dtype).to(tl.float32)
    return (a * u).to(act_dtype)


@triton.jit
def _silu_mul_quant_kernel(gu_ptr, q_ptr, s_ptr, N, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                           FP8_MAX_C: tl.constexpr, FLOOR: tl.constexpr, EMULATE_ROUNDING: tl.constexpr):
    """One pass: silu·mul of the whole row into registers (in the activation dtype, as up to three
    power-of-two segments: 9,728 = 8,192 + 1,024 + 512), its absmax, then the quantized store.

    The earlier kernel made two passes over 2,048-wide chunks, computing silu·mul twice (its sigmoid
    and divisions are special-function-unit ops, the bound here) and dividing per element; a
    single 16,384-wide power-of-two block wasted 40% of its lanes on the masked tail."""
    row = tl.program_id(0).to(tl.int64)
    gu_row = gu_ptr + row * 2 * N
    o0, m0 = _segment_offsets(0, S0, N)
    v0 = _silu_mul_segment(gu_row, o0, m0, N)
    amax = tl.max(tl.abs(v0.to(tl.float32)), axis=0)
    if S1 > 0:
        o1, m1 = _segment_offsets(S0, S1, N)
        v1 = _silu_mul_segment(gu_row, o1, m1, N)
        amax = tl.maximum(amax, tl.max(tl.abs(v1.to(tl.float32)), axis=0))
    if S2 > 0:
        o2, m2 = _segment_offsets(S0 + S1, S2, N)
        v2 = _silu_mul_segment(gu_row, o2, m2, N)
        amax = tl.maximum(amax, tl.max(tl.abs(v2.to(tl.float32)), axis=0))
    scale, inv_scale = _row_scale(amax, FP8_MAX_C, FLOOR)
    q_row = q_ptr + row * N
    _store_segment(v0, q_row, o0, m0, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    if S1 > 0:
        _store_segment(v1, q_row, o1, m1, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    if S2 > 0:
        _store_segment(v2, q_row, o2, m2, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
    tl.store(s_ptr + row, scale)


@triton.jit
def _gelu_tanh_quant_kernel(x_ptr, q_ptr, s_ptr, N, BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr,
                            FLOOR: tl.constexpr, EMULATE_ROUNDING: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    # 0.5 * (1 + tanh(z)) == sigmoid(2z), z = sqrt(2/pi) * (x + 0.044715 x^3): no libdevice tanh needed
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    y = (x * tl.sigmoid(2.0 * z)).to(x_ptr.dtype.element_ty).to(tl.float32)  # GELU's output dtype
    _store_quantized(y, q_ptr, s_ptr, row, offs, mask, N, FP8_MAX_C, FLOOR, EMULATE_ROUNDING)


# Triton's CPU interpreter (TRITON_INTERPRET=1, read when the kernels above were decorated) casts fp32 to
# e4m3 without the exponent carry; there the kernels round to the e4m3 grid themselves first.
INTERPRETED = isinstance(_quantize_rows_kernel, InterpretedFunction)


def _common_args() -> dict[str, Any]:
    return dict(FP8_MAX_C=FP8_MAX, FLOOR=SCALE_FLOOR, EMULATE_ROUNDING=INTERPRETED)


def _launch_args(n: int, num_warps: int | None) -> dict[str, Any]:
    """One program per row holding the whole row (BLOCK = next power of two of its width); by default
    one warp per 512 elements, at most 16 (`num_warps` overrides it: the bench sweeps it)."""
    block = triton.next_power_of_2(n)
    return dict(BLOCK=block, num_warps=num_warps or min(16, max(1, block // 512)), **_common_args())


def _row_segments(n: int) -> tuple[int, int, int]:
    """Widths (S0, S1, S2) of up to three power-of-two segments covering a row of ``n`` elements: the
    two largest powers of two that fit, then the remainder's power-of-two cover (0 where unused).
    Exact for the 4B's widths (2,560 = 2,048 + 512; 4,096; 9,728 = 8,192 + 1,024 + 512), where a
    single power-of-two block masks up to 40% of its lanes."""
    s0 = 1 << (n.bit_length() - 1)
    rest = n - s0
    s1 = 1 << (rest.bit_length() - 1) if rest else 0
    rest -= s1
    return s0, s1, triton.next_power_of_2(rest) if rest else 0


# Measured on the H200 at M = 43,008 (benchmarks/results/producers-h200.md, num_warps 4/8/16/32): 4 warps
# were fastest for add_rmsnorm_quant (N 2,560) and silu_mul_quant (N 9,728), within 1% of 8 for
# quantize_rows (N 4,096); more warps per row cost up to 2-3x.
SEGMENT_WARPS = 4


def _segment_args(n: int, num_warps: int | None) -> dict[str, Any]:
    s0, s1, s2 = _row_segments(n)
    return dict(S0=s0, S1=s1, S2=s2, num_warps=num_warps or SEGMENT_WARPS, **_common_args())


def _outputs(rows: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def quantize_rows(x: torch.Tensor, *, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scale per row) of a 2-D activation: ``x ≈ q.float() * scale``."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"quantize_rows takes a 2-D tensor with contiguous rows, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    m, n = x.shape
    q, s = _outputs(m, n, x.device)
    if m:
        _quantize_rows_kernel[(m,)](x, q, s, n, x.stride(0), **_segment_args(n, num_warps))
    return q, s


def add_rmsnorm_quant(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                      num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = residual + delta`` (when given), then RMSNorm(h) * weight quantized per row.
    Returns (h, e4m3 rows, fp32 scales); h is ``residual`` itself when ``delta`` is None."""
    m, n = residual.shape
    residual = residual.contiguous()
    res_out = torch.empty_like(residual) if delta is not None else residual
    q, s = _outputs(m, n, residual.device)
    if m:
        _add_rmsnorm_quant_kernel[(m,)](residual, delta.contiguous() if delta is not None else residual, weight,
                                        res_out, q, s, n, eps, HAS_DELTA=delta is not None,
                                        **_segment_args(n, num_warps))
    return res_out, q, s


def silu_mul_quant(gate_up: torch.Tensor, *, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up for ``gate_up = [M, 2N]`` (gate first), quantized per row: (e4m3 [M, N], scales)."""
    gate_up = gate_up.contiguous()
    m, n2 = gate_up.shape
    n = n2 // 2
    q, s = _outputs(m, n, gate_up.device)
    if m:
        _silu_mul_quant_kernel[(m,)](gate_up, q, s, n, **_segment_args(n, num_warps))
    return q, s


def gelu_tanh_quant(x: torch.Tensor, *, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh-approximated GELU (Qwen3-VL's `gelu_pytorch_tanh`), rounded to the activation dtype,
    quantized per row (the vision MLP's producer of its fc2 input): (e4m3 rows, fp32 scales)."""
    x = x.contiguous()
    m, n = x.shape
    q, s = _outputs(m, n, x.device)
    if m:
        _gelu_tanh_quant_kernel[(m,)](x, q, s, n, **_launch_args(n, num_warps))
    return q, s


def scaled_mm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16, *, fast_accum: bool = False
              ) -> torch.Tensor:
    """``(q * scale) @ (weight * weight_scale).T + bias`` on FP8 tensor cores, rowwise scales.

    ``weight`` is [N, K] row-major (so ``weight.t()`` is the column-major operand cuBLASLt wants),
    ``weight_scale`` [N, 1] fp32; the output is bf16 (rowwise scaling's only output type). The bias
    goes to the GEMM's epilogue: a separate broadcast add cost the vision tower (whose Linears all
    have one) more than its FP8 GEMMs saved (H200 profile, benchmarks/results/fp8-bench-h200-run3.log).
    ``fast_accum``: Hopper's faster FP8 accumulation (fewer fp32 promotions); off by default, the
    GEMM comparison times both."""
    return torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, -1), bias=bias,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


# --------------------------------------------------------------------------------------------
# GEMM comparison (the bench calls it beside its model timings)
# --------------------------------------------------------------------------------------------

LM_TOKENS = (42, 2688, 1408, 5120, 43008)  # 42-token queries at batch 1 and 64; pages; 1,024 queries
VISION_TOKENS = (5120, 1408, 43008)


def lm_shapes(text_config: Any, tokens: Iterable[int] = LM_TOKENS) -> list[dict[str, Any]]:
    """The text tower's fused GEMMs (qkv, o, gate_up, down) at each token count, from its config."""
    h, heads, kv, d, inter = (text_config.hidden_size, text_config.num_attention_heads,
                              text_config.num_key_value_heads, text_config.head_dim, text_config.intermediate_size)
    layers = {"qkv": (h, (heads + 2 * kv) * d), "o": (heads * d, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
    return [dict(tower="lm", layer=name, M=m, K=k, N=n, producer=_LM_PRODUCER[name])
            for m in tokens for name, (k, n) in layers.items()]


_LM_PRODUCER = {"qkv": "rmsnorm", "o": "plain", "gate_up": "rmsnorm", "down": "silu_mul"}


def vision_shapes(vision_config: Any, tokens: Iterable[int] = VISION_TOKENS) -> list[dict[str, Any]]:
    """The vision blocks' GEMMs (qkv, proj, fc1, fc2) at each patch count, from its config."""
    h, inter = vision_config.hidden_size, vision_config.intermediate_size
    layers = {"qkv": (h, 3 * h), "proj": (h, h), "fc1": (h, inter), "fc2": (inter, h)}
    return [dict(tower="vision", layer=name, M=m, K=k, N=n, producer="plain")
            for m in tokens for name, (k, n) in layers.items()]


def _median_us(fn: Callable[[], Any], device: torch.device, reps: int = 20) -> float:
    """Median µs of ``fn`` replayed as a CUDA graph (warm-up on a side stream, then captured)."""
    return graph_time_us(fn, 1, device, reps=reps)


def gemm_comparison(shapes: list[dict[str, Any]], device: str | torch.device = "cuda",
                    reps: int = 20) -> list[dict[str, Any]]:
    """bf16 cuBLAS vs FP8 ``_scaled_mm`` (rowwise) per shape, CUDA-graphed, in µs and TFLOP/s.

    Columns: ``bf16_us``; ``fp8_gemm_us`` (GEMM only, activations already FP8; ``_fast_accum_us``
    with Hopper's fast accumulation);
    ``fp8_torch_quant_us`` (plain PyTorch per-token quantization, then the GEMM);
    ``fp8_fused_us`` (the fused Triton quantization of the layer's producer, then the GEMM);
    ``bf16_e2e_us`` is the same producer in bf16 (the bf16 fused tower's Triton RMSNorm / silu·mul
    kernels) before the bf16 GEMM, so the end-to-end columns compare like with like."""
    device = torch.device(device)
    return [_compare_one(shape, device, reps) for shape in shapes]


def _compare_one(shape: dict[str, Any], device: torch.device, reps: int) -> dict[str, Any]:
    from colquant.kernels import triton_ops
    from colquant.retriever.fp8 import quantize_weight

    m, k, n, producer = shape["M"], shape["K"], shape["N"], shape.get("producer", "plain")
    gen = torch.Generator(device=device).manual_seed(m * 7 + k * 3 + n)
    x = torch.randn((m, k), device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn((n, k), device=device, dtype=torch.bfloat16, generator=gen) * k ** -0.5
    wq, ws = quantize_weight(w)
    norm_w = torch.rand(k, device=device, dtype=torch.bfloat16, generator=gen) + 0.5
    gate_up = torch.randn((m, 2 * k), device=device, dtype=torch.bfloat16, generator=gen)
    xq, xs = quantize_rows(x)

    def bf16_producer() -> torch.Tensor:  # the bf16 fused tower's own Triton kernels
        if producer == "rmsnorm":
            return triton_ops.add_rmsnorm(x, None, norm_w, 1e-6)[1]
        if producer == "silu_mul":
            return triton_ops.silu_mul(gate_up)
        return x

    def fused_producer() -> tuple[torch.Tensor, torch.Tensor]:
        if producer == "rmsnorm":
            return add_rmsnorm_quant(x, None, norm_w, 1e-6)[1:]
        if producer == "silu_mul":
            return silu_mul_quant(gate_up)
        return quantize_rows(x)

    timings = {
        "bf16_us": _median_us(lambda: x @ w.t(), device, reps),
        "bf16_e2e_us": _median_us(lambda: bf16_producer() @ w.t(), device, reps),
        "fp8_gemm_us": _median_us(lambda: scaled_mm(xq, xs, wq, ws, None), device, reps),
        "fp8_gemm_fast_accum_us": _median_us(lambda: scaled_mm(xq, xs, wq, ws, None, fast_accum=True), device, reps),
        "fp8_torch_quant_us": _median_us(lambda: scaled_mm(*quantize_rows_reference(bf16_producer()), wq, ws, None),
                                         device, reps),
        "fp8_fused_us": _median_us(lambda: scaled_mm(*fused_producer(), wq, ws, None), device, reps),
    }
    flop = 2.0 * m * k * n
    row = dict(shape, **{key: round(value, 2) for key, value in timings.items()})
    row["bf16_tflops"] = round(flop / timings["bf16_us"] / 1e6, 1)
    row["fp8_gemm_tflops"] = round(flop / timings["fp8_gemm_us"] / 1e6, 1)
    row["speedup_gemm"] = round(timings["bf16_us"] / timings["fp8_gemm_us"], 3)
    row["speedup_gemm_fast_accum"] = round(timings["bf16_us"] / timings["fp8_gemm_fast_accum_us"], 3)
    row["speedup_torch_quant"] = round(timings["bf16_e2e_us"] / timings["fp8_torch_quant_us"], 3)
    row["speedup_fused"] = round(timings["bf16_e2e_us"] / timings["fp8_fused_us"], 3)
    return row


def producer_sweep(device: str | torch.device = "cuda", m: int = 43008, reps: int = 20,
                   warps: Iterable[int] = (4, 8, 16, 32)) -> list[dict[str, Any]]:
    """µs and achieved GB/s of each fused producer (and its bf16 Triton twin) at the LM widths, per
    ``num_warps``: the data behind `_launch_args`' default."""
    from colquant.kernels import triton_ops
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, n in (("quantize_rows", 4096), ("add_rmsnorm_quant", 2560), ("silu_mul_quant", 9728)):
        width = 2 * n if name == "silu_mul_quant" else n
        x = torch.randn((m, width), device=device, dtype=torch.bfloat16, generator=gen)
        delta = torch.randn((m, n), device=device, dtype=torch.bfloat16, generator=gen)
        w = torch.rand(n, device=device, dtype=torch.bfloat16, generator=gen) + 0.5
        runs = {
            "quantize_rows": (lambda nw: quantize_rows(x, num_warps=nw), None, 2 * m * n + m * n),
            "add_rmsnorm_quant": (lambda nw: add_rmsnorm_quant(x, delta, w, 1e-6, num_warps=nw),
                                  lambda: triton_ops.add_rmsnorm(x, delta, w, 1e-6), 3 * 2 * m * n + m * n),
            "silu_mul_quant": (lambda nw: silu_mul_quant(x, num_warps=nw), lambda: triton_ops.silu_mul(x),
                               2 * 2 * m * n + m * n),
        }
        fused, bf16_twin, nbytes = runs[name]
        for nw in warps:
            us = graph_time_us(lambda: fused(nw), 1, device, reps=reps)
            rows.append(dict(kernel=name, M=m, N=n, num_warps=nw, us=round(us, 1), gb_per_s=round(nbytes / us / 1e3, 0)))
        if bf16_twin is not None:
            us = graph_time_us(bf16_twin, 1, device, reps=reps)
            rows.append(dict(kernel=f"bf16 {name.removesuffix('_quant')} (triton_ops)", M=m, N=n, num_warps=None,
                             us=round(us, 1), gb_per_s=None))
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (one line per shape)."""
    head = ("| tower | layer | M | K→N | bf16 µs | fp8 GEMM µs (×) | fast accum µs (×) | + torch quant µs (×) "
            "| + fused quant µs (×) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tower']} | {r['layer']} | {r['M']} | {r['K']}→{r['N']} | {r['bf16_us']} | "
                     f"{r['fp8_gemm_us']} ({r['speedup_gemm']}) | {r['fp8_gemm_fast_accum_us']} ({r['speedup_gemm_fast_accum']}) | "
                     f"{r['fp8_torch_quant_us']} ({r['speedup_torch_quant']}) | "
                     f"{r['fp8_fused_us']} ({r['speedup_fused']}) |")
    return "\n".join(lines)
