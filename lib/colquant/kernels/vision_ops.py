"""Triton kernels of the fast vision tower: the residual add fused into the next LayerNorm, and the FP8
attention's q/k/v producer.

Why: a ViT block adds its attention output and its MLP output to the residual stream, and each add is
followed by a LayerNorm of the sum. Run as torch ops that is two passes over the (patches, hidden)
activation per add: the add (read two, write one) and the LayerNorm (read one, write one); on the
H200 a 16-page batch spent 11.2 ms in 52 LayerNorms and 6.0 ms in 55 adds
(benchmarks/results/kernel-breakdown-h200.log). One kernel reads ``x`` and ``delta`` once and writes
both the new residual ``x + delta`` and LayerNorm of it:

* :func:`add_layernorm`: ``(x + delta, LayerNorm(x + delta))`` for a 16-bit consumer;
* :func:`add_layernorm_quant`: the same with the normed rows quantized to e4m3 per row (one fp32 scale
  a row) for an FP8 consumer (fp8-all), replacing the separate residual add and LayerNorm.

FlashAttention-3's FP8 forward (``fa3-fp8``, :mod:`.vision_attention`) takes e4m3 q, k, v with one scale
per (frame, head): :func:`rope_quant_qkv` makes them from the qkv GEMM's rows in two passes, the rotary
embedding computed in both (the bf16 tower's rounding: float32 math, rotated values rounded to bf16):
the first writes each (frame, block of tokens)'s absmax per part and head, the second, given the frames'
scales, writes q, k, v quantized, in place of the bf16 rotary kernel's q and k.

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

from colquant.kernels.fp8_ops import _common_args, _store_quantized, _store_segment
from colquant.retriever.fp8 import FP8_DTYPE, FP8_MAX, SCALE_FLOOR

__all__ = ["add_layernorm", "add_layernorm_quant", "rope_quant_qkv"]


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


# --------------------------------------------------------------------------------------------
# FP8 attention's producer: rotary embedding + per-(frame, head) quantization of q, k, v
# --------------------------------------------------------------------------------------------


@triton.jit
def _qkv_part_halves(qkv_ptr, cos_ptr, sin_ptr, rows, heads, cols, in_frame, H, HALF, PART: tl.constexpr):
    """Both halves of part PART (0 q, 1 k, 2 v) of a tile of rows x heads x HALF columns, as the bf16
    tower hands them to attention, in float32: q and k rotated (float32 math, rounded to the qkv dtype),
    v as it is; 0 outside the tile. Returns (first halves, second halves, their offsets within one part
    of a row, the tile's mask)."""
    dim = 2 * HALF
    mask = in_frame & (heads < H) & (cols < HALF)
    offs = heads * dim + cols  # within one part (H * dim values) of one row
    src = qkv_ptr + rows * (3 * H * dim) + PART * H * dim + offs
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if PART < 2:  # one cos/sin row per token, shared by its heads
        trig, trig_mask = rows * dim + cols, in_frame & (cols < HALF)
        c1 = tl.load(cos_ptr + trig, mask=trig_mask, other=0.0)
        c2 = tl.load(cos_ptr + trig + HALF, mask=trig_mask, other=0.0)
        s1 = tl.load(sin_ptr + trig, mask=trig_mask, other=0.0)
        s2 = tl.load(sin_ptr + trig + HALF, mask=trig_mask, other=0.0)
        act = qkv_ptr.dtype.element_ty
        x1, x2 = (x1 * c1 - x2 * s1).to(act).to(tl.float32), (x2 * c2 + x1 * s2).to(act).to(tl.float32)
    return x1, x2, offs, mask


@triton.jit
def _tile(cu_ptr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """This program's (frame, token block) tile: its frame, row indices, heads and columns (3-D,
    broadcastable) and which rows lie inside the frame."""
    frame = tl.program_id(0)
    start = tl.load(cu_ptr + frame)
    end = tl.load(cu_ptr + frame + 1)
    rows = (start + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None, None]
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    return frame, rows, heads, cols, rows < end


@triton.jit
def _rope_amax_kernel(qkv_ptr, cos_ptr, sin_ptr, cu_ptr, part_ptr, H, HALF, BLOCKS, BLOCK_T: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """partial[frame, block, part, head] = max |value| over the block's tokens and the head's columns."""
    frame, rows, heads, cols, in_frame = _tile(cu_ptr, BLOCK_T, BLOCK_H, BLOCK_HALF)
    head = tl.arange(0, BLOCK_H)
    out = part_ptr + ((frame * BLOCKS + tl.program_id(1)) * 3) * H + head
    for part in tl.static_range(3):
        y1, y2, _, _ = _qkv_part_halves(qkv_ptr, cos_ptr, sin_ptr, rows, heads, cols, in_frame, H, HALF, part)
        amax = tl.max(tl.max(tl.maximum(tl.abs(y1), tl.abs(y2)), axis=2), axis=0)
        tl.store(out + part * H, amax, mask=head < H)


@triton.jit
def _rope_quant_kernel(qkv_ptr, cos_ptr, sin_ptr, cu_ptr, scale_ptr, q_ptr, H, HALF, BLOCK_T: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, FP8_MAX_C: tl.constexpr,
                       EMULATE_ROUNDING: tl.constexpr):
    """out[row, part, head, :] = value / scale[frame, part, head] in e4m3 (the producers' correctly
    rounded division and saturating cast)."""
    frame, rows, heads, cols, in_frame = _tile(cu_ptr, BLOCK_T, BLOCK_H, BLOCK_HALF)
    for part in tl.static_range(3):
        y1, y2, offs, mask = _qkv_part_halves(qkv_ptr, cos_ptr, sin_ptr, rows, heads, cols, in_frame, H, HALF,
                                              part)
        scale = tl.load(scale_ptr + (frame * 3 + part) * H + heads, mask=heads < H, other=1.0)
        inv_scale = tl.math.div_rn(1.0, scale)
        dst = q_ptr + rows * (3 * H * 2 * HALF) + part * H * 2 * HALF
        _store_segment(y1, dst, offs, mask, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)
        _store_segment(y2, dst, offs + HALF, mask, scale, inv_scale, FP8_MAX_C, EMULATE_ROUNDING)


def _qkv_launch(heads: int, half: int) -> dict:
    """Tiles of about 4,096 values per half (8 tokens of the ViT's 16 heads x 32 columns), 4 warps."""
    block_h, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    return dict(BLOCK_T=max(1, 4096 // (block_h * block_half)), BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)


def rope_quant_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, cu_seqlens: torch.Tensor,
                   max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q, k and v of packed qkv rows (patches, 3 * heads * head_dim) quantized for FP8 attention:
    (e4m3 (patches, 3, heads, head_dim), fp32 descales (frames, 3, heads)), each (frame, part, head)
    scaled by its absmax / 448. ``cos``/``sin``: float32 (patches, head_dim); ``cu_seqlens``: int32 frame
    offsets; ``max_seqlen``: the longest frame."""
    n, width = qkv.shape
    dim = width // (3 * heads)
    if not qkv.is_contiguous() or dim % 2 or width != 3 * heads * dim or cos.shape != (n, dim) or sin.shape != (n, dim):
        raise ValueError(f"rope_quant_qkv needs contiguous qkv (patches, 3*heads*head_dim) and cos/sin (patches, "
                         f"head_dim); got qkv {tuple(qkv.shape)} for {heads} heads, cos {tuple(cos.shape)}")
    frames, launch = cu_seqlens.numel() - 1, _qkv_launch(heads, dim // 2)
    blocks = triton.cdiv(max_seqlen, launch["BLOCK_T"])
    partial = torch.empty((frames, blocks, 3, heads), dtype=torch.float32, device=qkv.device)
    out = torch.empty((n, 3, heads, dim), dtype=FP8_DTYPE, device=qkv.device)
    if n == 0:
        return out, partial.new_full((frames, 3, heads), SCALE_FLOOR)
    _rope_amax_kernel[(frames, blocks)](qkv, cos, sin, cu_seqlens, partial, heads, dim // 2, blocks, **launch)
    descale = (partial.amax(dim=1) / FP8_MAX).clamp_min(SCALE_FLOOR)  # the twin's arithmetic, in torch
    args = _common_args()
    _rope_quant_kernel[(frames, blocks)](qkv, cos, sin, cu_seqlens, descale, out, heads, dim // 2,
                                         FP8_MAX_C=args["FP8_MAX_C"], EMULATE_ROUNDING=args["EMULATE_ROUNDING"],
                                         **launch)
    return out, descale
