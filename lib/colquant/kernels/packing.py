"""Packing, unpacking and dequantization of 4-bit auto-round / auto_gptq tensors.

Checkpoint layout (auto-round ``save_quantized`` with packing_format ``auto_round:auto_gptq``,
the module ``auto_round_extension.torch.qlinear_torch_zp.QuantLinear``), for a Linear with
``K`` input and ``N`` output features and group size ``G``:

* ``qweight`` int32 ``[K/8, N]``: eight 4-bit values per word along K, low nibble first
  (row ``r`` nibble ``i`` holds input feature ``8r + i``).
* ``qzeros`` int32 ``[K/G, N/8]``: eight 4-bit zero points per word along N, low nibble first,
  stored as ``zero - 1`` (the classic GPTQ convention; auto-round's dequant adds the 1 back).
* ``scales`` fp16 ``[K/G, N]``.
* dequantized weight ``W[k, n] = scales[g, n] * (q[k, n] - (qzeros_nibble[g, n] + 1))`` with
  ``g = k // G``, computed by auto-round in fp16 and then cast to the activation dtype.

Kernel layout used by :mod:`colquant.kernels` (``"k-blocked"``): the same integers, packed along K
inside blocks of 128 input features so that one shift extracts 16 *consecutive* rows:

* ``qweight_k`` int32 ``[K/8, N]``: in block ``b`` (rows ``16b .. 16b+15``), word row ``r``
  nibble ``i`` holds input feature ``128 b + 16 i + r``;
* ``zeros_u8`` uint8 ``[K/G, N]``: the *true* zero points (not minus one);
* ``scales`` unchanged (fp16 ``[K/G, N]``).

A kernel loads a ``[16, BN]`` tile of words (rows of ``4 BN`` contiguous bytes) per 128 input
features, and ``(words >> 4i) & 15`` is the ``[16, BN]`` integer tile of features
``16i .. 16i+15``: eight K=16 tensor-core dots per block, with no register shuffles.

Everything here is plain torch and runs on any device; the round trips are exact.
"""

from __future__ import annotations

import torch

__all__ = [
    "BITS",
    "unpack_int4_rows",
    "pack_int4_rows",
    "unpack_int4_cols",
    "pack_int4_cols",
    "gptq_to_intweight",
    "intweight_to_gptq",
    "KBLOCK",
    "pack_kblocked",
    "unpack_kblocked",
    "gptq_to_kernel",
    "kernel_to_gptq",
    "dequantize_gptq",
    "dequantize_kernel",
    "rtn_quantize_gptq",
]

BITS = 4
_PER_WORD = 32 // BITS  # 8
_SHIFTS = tuple(range(0, 32, BITS))
KBLOCK = 128  # input features per block of the kernel layout
_ROWS = KBLOCK // _PER_WORD  # 16 word rows per block


def _as_u32_nibbles(words: torch.Tensor) -> torch.Tensor:
    """[..., W] int32 -> [..., W, 8] int (values 0..15), low nibble first."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device)
    return torch.bitwise_and(torch.bitwise_right_shift(words.to(torch.int32).unsqueeze(-1), shifts), 0xF)


def _pack_nibbles(vals: torch.Tensor) -> torch.Tensor:
    """[..., W, 8] ints in 0..15 -> [..., W] int32 (low nibble first), exact two's complement."""
    if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) > 15):
        raise ValueError("4-bit values must lie in [0, 15]")
    v = vals.to(torch.int64)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=vals.device)
    word = torch.sum(v << shifts, dim=-1)  # 0 .. 2**32-1
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """auto_gptq ``qweight`` [K/8, N] -> integers [K, N] (int8 0..15); packed along dim 0."""
    kw, n = qweight.shape
    nib = _as_u32_nibbles(qweight.t())  # [N, K/8, 8]
    return nib.reshape(n, kw * _PER_WORD).t().contiguous().to(torch.int8)


def pack_int4_rows(intweight: torch.Tensor) -> torch.Tensor:
    """Integers [K, N] (0..15) -> auto_gptq ``qweight`` [K/8, N]."""
    k, n = intweight.shape
    if k % _PER_WORD:
        raise ValueError(f"K={k} must be a multiple of {_PER_WORD}")
    v = intweight.t().reshape(n, k // _PER_WORD, _PER_WORD)
    return _pack_nibbles(v).t().contiguous()


def unpack_int4_cols(packed: torch.Tensor) -> torch.Tensor:
    """[R, N/8] int32 packed along dim 1 -> [R, N] int8 (0..15)."""
    r, nw = packed.shape
    return _as_u32_nibbles(packed).reshape(r, nw * _PER_WORD).to(torch.int8)


def pack_int4_cols(vals: torch.Tensor) -> torch.Tensor:
    """[R, N] ints (0..15) -> [R, N/8] int32 packed along dim 1, low nibble first."""
    r, n = vals.shape
    if n % _PER_WORD:
        raise ValueError(f"N={n} must be a multiple of {_PER_WORD}")
    return _pack_nibbles(vals.reshape(r, n // _PER_WORD, _PER_WORD))


def gptq_to_intweight(qweight, qzeros, *, zero_offset: int = 1):
    """Unpack auto_gptq tensors to (intweight [K, N], zeros [K/G, N]) as int8.

    ``zero_offset`` is what auto-round's ``qlinear_torch_zp`` adds to the stored zero (1);
    pass 0 for the ``auto_round`` (non-gptq) packing where zeros are stored as-is.
    """
    iw = unpack_int4_rows(qweight)
    z = unpack_int4_cols(qzeros).to(torch.int16) + zero_offset
    return iw, z.to(torch.int8)


def intweight_to_gptq(intweight, zeros, *, zero_offset: int = 1):
    """Inverse of :func:`gptq_to_intweight` (exact)."""
    stored = zeros.to(torch.int16) - zero_offset
    if stored.numel() and (int(stored.min()) < 0 or int(stored.max()) > 15):
        raise ValueError("zero points out of the representable range")
    return pack_int4_rows(intweight), pack_int4_cols(stored)


def pack_kblocked(intweight: torch.Tensor) -> torch.Tensor:
    """Integers [K, N] (0..15) -> kernel ``qweight_k`` [K/8, N] (k-blocked, see module doc)."""
    k, n = intweight.shape
    if k % KBLOCK:
        raise ValueError(f"K={k} must be a multiple of {KBLOCK} for the kernel layout")
    v = intweight.reshape(k // KBLOCK, _PER_WORD, _ROWS, n).permute(0, 2, 3, 1)  # [b, r, n, i]
    return _pack_nibbles(v).reshape(k // _PER_WORD, n)


def unpack_kblocked(qweight_k: torch.Tensor) -> torch.Tensor:
    """Kernel ``qweight_k`` [K/8, N] -> integers [K, N] (int8 0..15)."""
    kw, n = qweight_k.shape
    nib = _as_u32_nibbles(qweight_k).reshape(kw // _ROWS, _ROWS, n, _PER_WORD)  # [b, r, n, i]
    return nib.permute(0, 3, 1, 2).reshape(kw * _PER_WORD, n).to(torch.int8)


def gptq_to_kernel(qweight, qzeros, *, zero_offset: int = 1):
    """auto_gptq (qweight [K/8,N], qzeros [K/G,N/8]) -> kernel (qweight_k [K/8,N], zeros_u8 [K/G,N])."""
    iw, z = gptq_to_intweight(qweight, qzeros, zero_offset=zero_offset)
    if int(z.min()) < 0 or int(z.max()) > 15:
        raise ValueError("zero points outside [0, 15] cannot be stored in the kernel layout")
    return pack_kblocked(iw), z.to(torch.uint8)


def kernel_to_gptq(qweight_k, zeros_u8, *, zero_offset: int = 1):
    """Inverse of :func:`gptq_to_kernel` (exact)."""
    return intweight_to_gptq(unpack_kblocked(qweight_k), zeros_u8.to(torch.int16), zero_offset=zero_offset)


def _group_expand(t: torch.Tensor, k: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    if g_idx is not None:
        return t[g_idx.long()]
    return t.repeat_interleave(group_size, dim=0)[:k]


def dequantize_gptq(qweight, qzeros, scales, group_size: int, *, g_idx=None, dtype=None, zero_offset: int = 1):
    """Dequantize auto_gptq tensors to W [K, N] exactly as auto-round's torch QuantLinear does:
    ``(scales * (q - zeros))`` evaluated in the scales' dtype (fp16), then cast to ``dtype``."""
    iw, z = gptq_to_intweight(qweight, qzeros, zero_offset=zero_offset)
    k = iw.shape[0]
    diff = iw.to(torch.int16) - _group_expand(z.to(torch.int16), k, group_size, g_idx)
    w = _group_expand(scales, k, group_size, g_idx) * diff.to(torch.int8)
    return w if dtype is None else w.to(dtype)


def dequantize_kernel(qweight_k, zeros_u8, scales, group_size: int, *, dtype=None):
    """Dequantize the kernel layout to W [K, N] (same arithmetic as :func:`dequantize_gptq`)."""
    iw = unpack_kblocked(qweight_k)
    k = iw.shape[0]
    diff = iw.to(torch.int16) - _group_expand(zeros_u8.to(torch.int16), k, group_size, None)
    w = _group_expand(scales, k, group_size, None) * diff.to(torch.int8)
    return w if dtype is None else w.to(dtype)


@torch.no_grad()
def rtn_quantize_gptq(weight: torch.Tensor, group_size: int = 128, *, scale_dtype=torch.float16):
    """Round-to-nearest symmetric W4 quantization of a Linear weight [N, K], packed like auto-round.

    Same rule as auto-round's ``int_sym`` RTN: per group ``max_v`` = the larger of |min|, |max|
    with its sign, ``scale = max_v / 8`` (fp16), ``q = clamp(round(w / scale), -8, 7)``, zero 8.
    Returns ``(qweight [K/8, N], qzeros [K/G, N/8], scales [K/G, N])`` in auto_gptq layout.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} not a multiple of group_size {group_size}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    wmin = w.amin(-1).clamp(max=0)
    wmax = w.amax(-1).clamp(min=0)
    wmin_abs, wmax_abs = -wmin, wmax
    max_v = (2 * (wmax_abs < wmin_abs).int() - 1) * torch.maximum(wmax_abs, wmin_abs)
    scale = (max_v / 8).to(scale_dtype)
    scale = torch.where(scale < 0, scale.clamp(max=-1e-5), scale.clamp(min=1e-5))
    q = torch.round(w / scale.float().unsqueeze(-1)).clamp_(-8, 7) + 8  # [N, K/G, G] in 0..15
    intweight = q.reshape(n, k).t().to(torch.int8)  # [K, N]
    zeros = torch.full((k // group_size, n), 8, dtype=torch.int8, device=weight.device)
    qweight, qzeros = intweight_to_gptq(intweight, zeros)
    return qweight, qzeros, scale.t().contiguous()
