"""tinygemm (torch core's aten._weight_int4pack_mm) as a 4-bit candidate: the scale/zero conversion
and packing checked through torch's CPU flavour of the op, the CUDA kernel on a GPU (skipped here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from colquant.kernels import W4A16Linear, backend, tinygemm

CUDA = torch.cuda.is_available() and backend.triton_import_error() is None


def _layer(k: int, n: int, group_size: int, *, asym: bool, device="cpu", seed: int = 0) -> W4A16Linear:
    torch.manual_seed(seed)
    lin = W4A16Linear.from_linear(nn.Linear(k, n, bias=False).to(device=device, dtype=torch.bfloat16), group_size)
    if asym:
        lin.zeros_u8.random_(2, 14)
        lin._refresh_sym()
    return lin


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def test_scales_and_zeros_follow_tinygemm_float_zero_convention():
    scales = torch.tensor([[0.5, 0.25], [2.0, 1.0]], dtype=torch.float16)
    zeros = torch.tensor([[8, 3], [0, 15]], dtype=torch.uint8)
    sz = tinygemm.scales_and_zeros(zeros, scales, torch.float32)
    assert sz.shape == (2, 2, 2)
    assert torch.equal(sz[..., 0], scales.float())
    assert torch.equal(sz[..., 1], torch.tensor([[0.0, 1.25], [16.0, -7.0]]))  # (8 - z) * s
    # w = (q - 8) * s + z_f equals our (q - z) * s for every q
    q = torch.arange(16, dtype=torch.float32)
    for g in range(2):
        for j in range(2):
            ours = (q - zeros[g, j].float()) * scales[g, j].float()
            theirs = (q - 8) * sz[g, j, 0] + sz[g, j, 1]
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_packed_weights_match_the_dequantized_reference_through_torch_cpu_op(group_size, asym):
    lin = _layer(256, 64, group_size, asym=asym)
    packed, sz = tinygemm.pack(lin.qweight_k, lin.zeros_u8, lin.scales)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    ref = x.float() @ lin.dequantize(torch.float32).t()
    assert _rel_err(tinygemm.matmul(x, packed, sz, group_size), ref) < 1e-2


def test_int4_values_are_the_layers_integers_as_n_by_k():
    lin = _layer(256, 64, 128, asym=False)
    q = tinygemm.int4_values(lin.qweight_k)
    assert q.shape == (64, 256) and q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    w = (q.float() - 8) * lin.scales.float().repeat_interleave(128, 0).t()
    assert torch.equal(w.to(torch.float16), lin.dequantize(torch.float16))


def test_layer_copy_is_counted_not_saved_and_runs_on_cpu():
    lin = _layer(256, 64, 128, asym=True)
    before = lin.weight_bytes
    lin.keep_tinygemm_copy(8)
    assert lin.weight_bytes == before + tinygemm.nbytes(lin.tinygemm_weight, lin.tinygemm_sz)
    assert not {"tinygemm_weight", "tinygemm_sz"} & set(lin.state_dict())
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = x.float() @ lin.dequantize(torch.float32).t()
    assert _rel_err(tinygemm.matmul(x, lin.tinygemm_weight, lin.tinygemm_sz, 128), ref) < 1e-2


@pytest.mark.parametrize("k, n, group_size, dtype, words", [
    (256, 64, 128, torch.float16, "activation dtype"),
    (256, 64, 16, torch.bfloat16, "group size 16"),
    (384, 64, 128, torch.bfloat16, "K=384"),
])
def test_layers_tinygemm_cannot_run_say_why(k, n, group_size, dtype, words):
    assert words in tinygemm.layer_unsupported_reason(k, n, group_size, dtype, inner_k_tiles=16 if k == 384 else 8) \
        or words in (tinygemm.layer_unsupported_reason(k, n, group_size, dtype) or "")
    lin = W4A16Linear(256, 64, 16) if group_size == 16 else None
    if lin is not None:
        with pytest.raises(ValueError, match="tinygemm cannot run this layer: group size 16"):
            lin.keep_tinygemm_copy()


def test_unavailable_off_gpu_or_without_the_op(monkeypatch):
    assert "needs a CUDA GPU" in tinygemm.unavailable_reason("cpu")
    monkeypatch.setattr(tinygemm, "OPS", ("_weight_int4pack_mm", "_no_such_int4_op"))
    assert "has no aten._no_such_int4_op" in tinygemm.op_missing()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_tinygemm_matches_dequantized_reference_on_gpu(m, inner_k_tiles):
    lin = _layer(512, 384, 128, asym=True, device="cuda", seed=m)
    packed, sz = tinygemm.pack(lin.qweight_k, lin.zeros_u8, lin.scales, inner_k_tiles=inner_k_tiles)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ lin.dequantize(torch.float32).t()
    assert _rel_err(tinygemm.matmul(x, packed, sz, 128), ref) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_cuda_layout_unpacks_to_the_layers_integers_on_gpu(inner_k_tiles):
    lin = _layer(512, 384, 128, asym=False, device="cuda")
    packed, _ = tinygemm.pack(lin.qweight_k, lin.zeros_u8, lin.scales, inner_k_tiles=inner_k_tiles)
    assert torch.equal(tinygemm.unpack_cuda(packed), tinygemm.int4_values(lin.qweight_k))


def _pack_like_torch_cuda(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """torch's CUDA ``matrix_to_m16n8k16_Bint4_layout`` written out as loops (int4mm.cu), on CPU."""
    n, k = q.shape
    out = torch.zeros((n // 8, k // (16 * inner_k_tiles), 32, inner_k_tiles // 2), dtype=torch.int64)
    for nt in range(out.shape[0]):
        for ko in range(out.shape[1]):
            for t in range(32):
                for kt in range(0, inner_k_tiles, 2):
                    k0 = (ko * inner_k_tiles + kt) * 16 + (t % 4) * 2
                    ks = [k0, k0 + 1, k0 + 8, k0 + 9, k0 + 16, k0 + 17, k0 + 24, k0 + 25]
                    v = [int(q[nt * 8 + t // 4, kk]) for kk in ks]
                    out[nt, ko, t, kt // 2] = ((v[7] << 28) | (v[5] << 24) | (v[3] << 20) | (v[1] << 16)
                                               | (v[6] << 12) | (v[4] << 8) | (v[2] << 4) | v[0])
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("inner_k_tiles", [2, 8])
def test_cuda_layout_reader_inverts_torch_documented_packing(inner_k_tiles):
    q = torch.randint(0, 16, (16, 256), generator=torch.Generator().manual_seed(inner_k_tiles), dtype=torch.int32)
    assert torch.equal(tinygemm.unpack_cuda(_pack_like_torch_cuda(q, inner_k_tiles)), q)


def test_table_naming_tinygemm_on_a_torch_without_it_keeps_no_copy_and_says_why(monkeypatch, caplog):
    import logging

    from colquant.kernels import copies
    from colquant.kernels.linear import DISPATCH

    lin = _layer(256, 64, 128, asym=False)
    saved = dict(DISPATCH.table)
    DISPATCH.set(256, 64, 64, ("tinygemm", {"inner_k_tiles": 8, "fallback": ["dequant+cublas", None]}))
    monkeypatch.setattr(tinygemm, "OPS", ("_no_such_int4_op",))
    try:
        with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
            info = copies.keep_copies(nn.Sequential(lin), "tinygemm", allow=True)
        assert info["kept"] is False and lin.tinygemm_weight is None
        assert "has no aten._no_such_int4_op" in caplog.text and "next-best kernel" in caplog.text
        assert lin._resolve(64, "cpu")[0] == "dequant+cublas"
    finally:
        DISPATCH.table = saved
