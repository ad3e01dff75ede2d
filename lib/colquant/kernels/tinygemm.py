"""tinygemm, torch core's 4-bit GEMM (``aten._weight_int4pack_mm``), as a kernel candidate.

Why: it ships with every CUDA build of torch (no optional package) and is written for the few-token
case (a GEMV-like tensor-core kernel over a weight layout pre-tiled for ``mma.m16n8k16``), the regime
where the project's Triton kernels are latency-bound.

Layout and arithmetic (torch 2.4+, unchanged through 2.11; CUDA sm80+, bf16 activations):

* weights: ``_convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)`` with the even input
  feature in the *high* nibble of each byte; the result is int32 ``[N/8, K/(16 inner_k_tiles), 32,
  inner_k_tiles/2]`` (CPU: ``_convert_weight_to_int4pack_for_cpu`` takes the int32 ``[N, K]`` values);
* scales and zeros: one ``[K/G, N, 2]`` tensor in the activation dtype, ``[..., 0]`` the scale,
  ``[..., 1]`` a *float* zero: ``w = (q - 8) * s + z_f``. An integer zero point ``z`` (ours:
  ``w = (q - z) * s``) is therefore ``z_f = (8 - z) * s`` (0 for symmetric layers);
* group sizes 32, 64, 128, 256; ``K`` a multiple of ``16 * inner_k_tiles``; ``N`` of 8.

The scales are held in bf16 (ours are fp16): relative error <= 2^-9 per group, inside the tuner's
check against the dequantized reference like every candidate.
"""

from __future__ import annotations

import torch

from colquant.kernels.backend import gpu_unavailable
from colquant.kernels.packing import unpack_kblocked
from colquant.kernels.reference import with_bias_into

GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = (2, 4, 8)
OPS = ("_weight_int4pack_mm", "_convert_weight_to_int4pack")


def op_missing() -> str | None:
    """None when this torch has the tinygemm ops, else why not."""
    missing = [op for op in OPS if not hasattr(torch.ops.aten, op)]
    if missing:
        return f"torch {torch.__version__} has no aten.{', aten.'.join(missing)} (tinygemm; torch >= 2.4 has it)"
    return None


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when tinygemm can run on ``device`` (a CUDA GPU of compute capability >= 8.0)."""
    return gpu_unavailable(device, "tinygemm", op_missing)


def layer_unsupported_reason(k: int, n: int, group_size: int, dtype: torch.dtype,
                             inner_k_tiles: int = 8) -> str | None:
    """None when a (K, N, group size, activation dtype) layer fits tinygemm, else why not."""
    if dtype != torch.bfloat16:
        return f"activation dtype {dtype} (tinygemm takes bf16)"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (tinygemm takes {GROUP_SIZES})"
    if inner_k_tiles not in INNER_K_TILES or k % (16 * inner_k_tiles):
        return f"K={k} is not a multiple of {16 * inner_k_tiles} (inner_k_tiles {inner_k_tiles})"
    if n % 8:
        return f"N={n} is not a multiple of 8"
    return None


def int4_values(qweight_k: torch.Tensor) -> torch.Tensor:
    """The kernel layout's integers as tinygemm's int32 ``[N, K]`` (values 0..15)."""
    return unpack_kblocked(qweight_k).t().to(torch.int32).contiguous()


def scales_and_zeros(zeros_u8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[K/G, N, 2]``: our fp16 scale ``s`` and integer zero ``z`` as tinygemm's (``s``, ``(8 - z) * s``)."""
    s = scales.float()
    z_f = (8.0 - zeros_u8.float()) * s
    return torch.stack([s, z_f], dim=-1).to(dtype).contiguous()


def pack(qweight_k: torch.Tensor, zeros_u8: torch.Tensor, scales: torch.Tensor, *, inner_k_tiles: int = 8,
         dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales-and-zeros) for tinygemm, on the device of ``qweight_k``."""
    q = int4_values(qweight_k)
    if q.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
    else:
        q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        del q
        packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, inner_k_tiles)
    return packed, scales_and_zeros(zeros_u8, scales, dtype)


def unpack_cuda(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of the CUDA :func:`pack`: int32 ``[N, K]`` values from the ``[N/8, K/(16 t), 32, t/2]``
    words of ``_convert_weight_to_int4pack`` (layout of torch's ``matrix_to_m16n8k16_Bint4_layout``:
    lane ``l`` of an n8 x k16 tile pair holds row ``l // 4``, columns ``2 (l % 4) + {0, 1, 8, 9}`` of
    both k-tiles; nibble ``e`` of a word is (odd column, second k-tile, +8) = bits (2, 1, 0) of ``e``)."""
    n_tiles, k_outer, lanes, pairs = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF  # [nT, kO, 32, J, 8]
    nib = nib.view(n_tiles, k_outer, 8, 4, pairs, 2, 2, 2)  # [nT, kO, row, col pair, J, odd, sub, hi8]
    q = nib.permute(0, 2, 1, 4, 6, 7, 3, 5)  # [nT, row, kO, J, sub, hi8, col pair, odd]
    return q.reshape(n_tiles * 8, k_outer * pairs * 32).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, *,
           bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W`` with ``W`` as :func:`pack` made it; ``out``, when given, receives the result."""
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)
    else:
        y = torch.ops.aten._weight_int4pack_mm(x, packed, group_size, sz)
    return with_bias_into(y, bias, out)


def nbytes(packed: torch.Tensor, sz: torch.Tensor) -> int:
    """GPU bytes of one layer's tinygemm copy."""
    return packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
