"""The Triton W4A16 GEMMs (both kernels, split-K, scale-on-accumulator, fused silu*up, bias) and the
whole-weight dequantization against the torch reference: on a GPU as compiled, on CPU through
Triton's interpreter with tiny shapes (`triton_setup` says when it skips)."""

from __future__ import annotations

import pytest
import torch
from triton_setup import device_or_skip

DEVICE = device_or_skip()

from colquant.kernels import reference, triton_gemm  # noqa: E402
from colquant.kernels.packing import pack_kblocked  # noqa: E402

K, N = 256, 32


def layer(group_size: int, sym: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight_k, zeros_u8, scales) of a random 4-bit [K, N] weight."""
    gen = torch.Generator().manual_seed(seed)
    intweight = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.full((K // group_size, N), 8) if sym else torch.randint(0, 16, (K // group_size, N), generator=gen)
    scales = (torch.rand(K // group_size, N, generator=gen) * 0.02 + 0.001).half()
    return pack_kblocked(intweight).to(DEVICE), zeros.to(torch.uint8).to(DEVICE), scales.to(DEVICE)


@pytest.mark.parametrize(("kernel", "group_size", "split_k", "scale_acc", "act", "sym"), [
    ("8dot", 64, 1, False, False, False),
    ("8dot", 128, 2, True, True, True),
    ("bc", 128, 1, False, True, False),
    ("bc", 128, 2, True, False, False),
])
def test_gemm_matches_the_reference(kernel, group_size, split_k, scale_acc, act, sym):
    qweight_k, zeros_u8, scales = layer(group_size, sym)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2 * K if act else K, generator=gen).half().to(DEVICE)
    bias = torch.randn(N, generator=gen).half().to(DEVICE)
    cfg = dict(kernel=kernel, BM=16, BN=16, SPLIT_K=split_k, GROUP_M=8, SCALE_ACC=scale_acc)
    got = triton_gemm.w4a16_matmul(x, qweight_k, zeros_u8, scales, group_size, bias=bias, act=act, cfg=cfg,
                                   sym_zero=8 if sym else 0)
    want = reference.w4a16_matmul(x.float(), qweight_k, zeros_u8, scales, group_size, bias=bias, act=act)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("group_size", [32, 128])
def test_dequantization_matches_the_reference(group_size):
    qweight_k, zeros_u8, scales = layer(group_size, sym=False, seed=group_size)
    got = triton_gemm.dequant_w4(qweight_k, zeros_u8, scales, group_size, dtype=torch.float16)
    want = reference.dequant_w4(qweight_k, zeros_u8, scales, group_size, dtype=torch.float16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
