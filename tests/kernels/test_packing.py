"""Kernel-facing packing: exact round trips, and dequantization identical to auto-round's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from colquant.kernels import packing as pk


def _rand_words(*shape, gen):
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int64, generator=gen).to(torch.int32)


def test_rows_and_cols_round_trip_exactly_over_the_full_int32_range():
    gen = torch.Generator().manual_seed(0)
    words = _rand_words(16, 24, gen=gen)
    words[0, 0] = -1
    words[0, 1] = -(2**31)
    words[0, 2] = 2**31 - 1
    assert torch.equal(pk.pack_int4_rows(pk.unpack_int4_rows(words)), words)
    assert torch.equal(pk.pack_int4_cols(pk.unpack_int4_cols(words)), words)


def test_unpack_order_is_low_nibble_first():
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert pk.unpack_int4_rows(word).flatten().tolist() == list(range(8))
    assert pk.unpack_int4_cols(word).flatten().tolist() == list(range(8))
    word = torch.tensor([[0x87654321 - 2**32]], dtype=torch.int32)  # 0x87654321 as int32
    assert pk.unpack_int4_cols(word).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_gptq_and_kernel_layouts_round_trip_exactly():
    gen = torch.Generator().manual_seed(1)
    K, N, G = 256, 64, 128
    qweight = _rand_words(K // 8, N, gen=gen)
    stored = torch.randint(0, 15, (K // G, N), generator=gen)  # zero - 1 in [0, 14]
    qzeros = pk.pack_int4_cols(stored)
    qk, zu = pk.gptq_to_kernel(qweight, qzeros)
    assert qk.shape == (K // 8, N) and zu.shape == (K // G, N) and zu.dtype == torch.uint8
    assert torch.equal(zu.long(), stored + 1)
    qw2, qz2 = pk.kernel_to_gptq(qk, zu)
    assert torch.equal(qw2, qweight) and torch.equal(qz2, qzeros)
    # the integers themselves are untouched by the relayout
    assert torch.equal(pk.unpack_kblocked(qk), pk.unpack_int4_rows(qweight))


def test_kblocked_layout_puts_16_consecutive_features_in_each_nibble():
    K, N = 256, 8
    ints = (torch.arange(K)[:, None] % 16).expand(K, N).contiguous()  # feature k holds k % 16
    ints = ints ^ (torch.arange(K)[:, None] // 16 % 16)  # and depends on k // 16
    qk = pk.pack_kblocked(ints)
    assert torch.equal(pk.unpack_kblocked(qk), ints.to(torch.int8))
    for b in range(K // 128):
        words = qk[16 * b: 16 * b + 16]  # [16, N]
        for i in range(8):
            tile = (words >> (4 * i)) & 0xF  # [16, N]: features 128b + 16i .. +15
            assert torch.equal(tile, ints[128 * b + 16 * i: 128 * b + 16 * i + 16].to(torch.int32))
    with pytest.raises(ValueError):
        pk.pack_kblocked(torch.zeros(64, 8, dtype=torch.int8))


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError):
        pk.pack_int4_cols(torch.full((1, 8), 16))
    with pytest.raises(ValueError):
        pk.intweight_to_gptq(torch.zeros(8, 8, dtype=torch.int8), torch.zeros(1, 8, dtype=torch.int8))


def _auto_round_packed(K=256, N=96, G=128, seed=0):
    """A Linear packed by auto-round's own auto_gptq QuantLinear (qlinear_torch_zp) from RTN scales."""
    qlinear_zp = pytest.importorskip("auto_round_extension.torch.qlinear_torch_zp")
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=True)
    qw, qz, sc = pk.rtn_quantize_gptq(lin.weight.data, G)
    scales = sc.t().float()  # auto-round passes scales as [N, K/G]
    zeros = torch.full((N, K // G), 8.0)
    ql = qlinear_zp.QuantLinear(4, G, K, N, bias=True)
    ql.pack(lin, scales, zeros, device="cpu")
    return lin, ql, (qw, qz, sc)


def test_rtn_packing_matches_auto_round_pack_bit_for_bit():
    _, ql, (qw, qz, sc) = _auto_round_packed()
    assert torch.equal(ql.qweight, qw)
    assert torch.equal(ql.qzeros, qz)
    assert torch.equal(ql.scales, sc)


def test_dequantize_matches_auto_round_quantlinear_exactly():
    lin, ql, _ = _auto_round_packed(seed=3)
    K = lin.in_features
    ql.bias = None
    with torch.no_grad():
        ar_weight = ql(torch.eye(K))  # [K, N] = W.T, auto-round's own dequant, exact in fp32
    ours = pk.dequantize_gptq(ql.qweight, ql.qzeros, ql.scales, ql.group_size)
    assert ours.dtype == torch.float16
    assert torch.equal(ours.float(), ar_weight)
    qn, zn = pk.gptq_to_kernel(ql.qweight, ql.qzeros)
    assert torch.equal(pk.dequantize_kernel(qn, zn, ql.scales, ql.group_size).float(), ar_weight)
    # and in bf16, as the model runs: auto-round rounds fp16 -> bf16; so do we
    assert torch.equal(pk.dequantize_kernel(qn, zn, ql.scales, 128, dtype=torch.bfloat16),
                       ar_weight.half().to(torch.bfloat16))


def test_rtn_follows_auto_round_sym_rule():
    from auto_round.data_type.int import quant_tensor_rtn_sym

    torch.manual_seed(5)
    w = torch.randn(64, 256) * 0.05
    qdq, scale, _ = quant_tensor_rtn_sym(w, bits=4, group_size=128)
    qw, qz, sc = pk.rtn_quantize_gptq(w, 128)
    # auto-round's qdq multiplies in fp32, the packed dequant in fp16: compare the integers
    ours = pk.dequantize_gptq(qw, qz, sc, 128, dtype=torch.float32).t()
    assert torch.allclose(ours, qdq.float(), rtol=1e-3, atol=0)
    ints = pk.unpack_int4_rows(qw).t().float() - 8
    s_full = sc.t().float().repeat_interleave(128, dim=1)
    assert torch.equal(ints, torch.round(qdq.float() / s_full))
    assert torch.equal(sc.t().reshape(-1), scale.reshape(-1).to(torch.float16))
