"""W4A16Linear and its dispatcher on CPU (reference path), plus CUDA-only kernel checks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from colquant.kernels import W4A16Linear, backend, backend_report, packing
from colquant.kernels.linear import DISPATCH, linear_forward, m_bucket, quantize_linears_rtn

CUDA = torch.cuda.is_available() and backend.triton_import_error() is None


def _ql(K=256, N=128, G=128, seed=0):
    qlinear_zp = pytest.importorskip("auto_round_extension.torch.qlinear_torch_zp")
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=True)
    qw, qz, sc = packing.rtn_quantize_gptq(lin.weight.data, G)
    ql = qlinear_zp.QuantLinear(4, G, K, N, bias=True)
    ql.pack(lin, sc.t().float(), torch.full((N, K // G), 8.0), device="cpu")
    return lin, ql


def test_w4a16_linear_equals_auto_round_quantlinear_forward():
    _, ql = _ql()
    ours = W4A16Linear.from_quantlinear(ql, dtype=torch.float32)
    x = torch.randn(5, 3, 256)
    with torch.no_grad():
        assert torch.allclose(ours(x), ql(x).float(), rtol=1e-5, atol=1e-5)


def test_w4a16_linear_equals_its_dequantized_reference():
    torch.manual_seed(1)
    lin = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    q = W4A16Linear.from_linear(lin)
    x = torch.randn(7, 256, dtype=torch.bfloat16)
    w = q.dequantize()
    assert w.shape == (64, 256) and w.dtype == torch.bfloat16
    assert torch.equal(q(x), x @ w.t())
    # RTN error: half a step, or one step where auto-round's sym rule clips +8 to +7
    step = q.scales.float().abs().repeat_interleave(128, dim=0).t()
    err = (w.float() - lin.weight.float()).abs()
    assert (err <= step * 1.01 + 1e-4).all()
    assert (err <= step / 2 * 1.01 + 1e-4).float().mean() > 0.95


def test_gptq_round_trip_through_the_module():
    _, ql = _ql(seed=2)
    q = W4A16Linear.from_quantlinear(ql)
    qw, qz, sc = q.to_gptq()
    assert torch.equal(qw, ql.qweight) and torch.equal(qz, ql.qzeros) and torch.equal(sc, ql.scales)


def test_fused_concat_equals_separate_projections():
    torch.manual_seed(3)
    parts = [W4A16Linear.from_linear(nn.Linear(256, n, bias=b)) for n, b in ((128, True), (64, False), (64, True))]
    fused = W4A16Linear.concat(parts)
    assert fused.out_features == 256
    x = torch.randn(4, 256)
    with torch.no_grad():
        sep = torch.cat([p(x) for p in parts], dim=-1)
        assert torch.allclose(fused(x), sep, atol=1e-6)


def test_forward_act_fuses_silu_mul():
    torch.manual_seed(4)
    q = W4A16Linear.from_linear(nn.Linear(128, 32, bias=False))
    gu = torch.randn(3, 256)
    expect = q(nn.functional.silu(gu[:, :128]) * gu[:, 128:])
    assert torch.allclose(q.forward_act(gu), expect, atol=1e-6)


def test_act_order_checkpoints_are_refused_clearly():
    _, ql = _ql(seed=5)
    g_idx = torch.randperm(256) // 128
    with pytest.raises(NotImplementedError, match="act-order"):
        W4A16Linear.from_gptq(ql.qweight, ql.qzeros, ql.scales, 128, g_idx=g_idx)
    trivial = torch.arange(256) // 128
    W4A16Linear.from_gptq(ql.qweight, ql.qzeros, ql.scales, 128, g_idx=trivial)


def test_dispatcher_picks_reference_on_cpu_and_says_why(caplog):
    backend._WARNED.clear()
    backend.clear_cache()
    q = W4A16Linear.from_linear(nn.Linear(128, 16).to(torch.bfloat16))
    with caplog.at_level(logging.INFO, logger="colquant.kernels"):
        q(torch.randn(2, 128, dtype=torch.bfloat16))
    msgs = [r.getMessage() for r in caplog.records]
    assert any("reference path" in m and "device is cpu" in m for m in msgs), msgs
    assert not backend.use_fast_path("cpu")


def test_missing_triton_or_cuda_is_named(monkeypatch, caplog):
    backend._WARNED.clear()
    backend.clear_cache()
    monkeypatch.setenv("COLQUANT_DISABLE_TRITON", "1")
    try:
        reason = backend.fast_path_unavailable("cuda")
        assert reason is not None
        assert ("CUDA" in reason) or ("Triton" in reason)
        with caplog.at_level(logging.INFO, logger="colquant.kernels"):
            assert not backend.use_fast_path("cuda")
        assert any(reason in r.getMessage() for r in caplog.records)
        if torch.cuda.is_available():
            assert "Triton" in reason
        report = backend_report("cuda")
        assert report["backend"] == "reference" and report["reason"] == reason
    finally:
        backend.clear_cache()


def test_dispatch_table_keys_by_token_bucket():
    assert [m_bucket(m) for m in (1, 3, 42, 168, 5376)] == [1, 4, 64, 256, 8192]
    DISPATCH.set(256, 64, 64, ("dequant+cublas", None))
    try:
        assert DISPATCH.choose(42, 256, 64)[0] == "dequant+cublas"
        dumped = DISPATCH.to_json()
        assert dumped[0]["kind"] == "dequant+cublas"
        DISPATCH.table.clear()
        assert DISPATCH.load_json(dumped) == 1 and DISPATCH.choose(42, 256, 64)[0] == "dequant+cublas"
    finally:
        DISPATCH.table.clear()


def test_quantize_linears_rtn_replaces_in_place():
    torch.manual_seed(6)
    block = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.Linear(100, 8))
    n = quantize_linears_rtn(block)
    assert n == 2
    assert isinstance(block[0], W4A16Linear) and isinstance(block[2], W4A16Linear)
    assert isinstance(block[3], nn.Linear)  # 100 is not a multiple of the group size
    assert linear_forward(block[0], torch.randn(2, 128)).shape == (2, 256)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("m", [1, 42, 300, 3000])
def test_triton_kernel_matches_dequantized_reference_on_gpu(m):
    torch.manual_seed(m)
    q = W4A16Linear.from_linear(nn.Linear(512, 384, bias=True).cuda().to(torch.bfloat16))
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    y = q(x)
    ref = (x.float() @ q.dequantize(torch.float32).t()) + q.bias.float()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_plain_auto_round_packing_stores_raw_zeros_and_is_read_as_such():
    qlinear_raw = pytest.importorskip("auto_round_extension.torch.qlinear_torch")
    torch.manual_seed(7)
    lin = nn.Linear(256, 64, bias=False)
    _, _, sc = packing.rtn_quantize_gptq(lin.weight.data, 128)
    zeros = torch.randint(4, 12, (64, 2)).float()  # asymmetric zero points, stored as-is
    ql = qlinear_raw.QuantLinear(4, 128, 256, 64, bias=False)
    ql.device = "cpu"  # auto-round's exporter sets this before packing
    ql.pack(lin, sc.t().float(), zeros, device="cpu")
    ours = W4A16Linear.from_quantlinear(ql, dtype=torch.float32)
    assert ours.sym_zero == 0
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.allclose(ours(x), ql(x).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("kernel, m, split", [("8dot", 1, 4), ("8dot", 5, 8), ("bc", 3, 2), ("bc", 42, 2), ("8dot", 16, 1)])
def test_single_launch_split_k_matches_reference_and_leaves_counters_at_zero_on_gpu(kernel, m, split):
    from colquant.kernels import triton_gemm as tg

    torch.manual_seed(m)
    q = W4A16Linear.from_linear(nn.Linear(1024, 384, bias=True).cuda().to(torch.bfloat16))
    q.zeros_u8.random_(4, 12)
    q._refresh_sym()
    cfg = dict(kernel=kernel, BM=16 if kernel == "8dot" else 64, BN=64, SPLIT_K=split, SCALE_ACC=True, FIXUP=True)
    ref = None
    for rep in range(3):  # the arrival counters must be back at zero for the next call
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        y = tg.w4a16_matmul(x, q.qweight_k, q.zeros_u8, q.scales, 128, bias=q.bias, cfg=cfg, sym_zero=q.sym_zero)
        ref = (x.float() @ q.dequantize(torch.float32).t()) + q.bias.float()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2, rep
    torch.cuda.synchronize()
    assert int(tg._LOCKS["cuda:0"].abs().sum()) == 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_layer_dispatches_to_its_tinygemm_copy_and_falls_back_without_it_on_gpu():
    torch.manual_seed(3)
    q = W4A16Linear.from_linear(nn.Linear(512, 384, bias=False).cuda().to(torch.bfloat16))
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ q.dequantize(torch.float32).t()
    saved = dict(DISPATCH.table)
    DISPATCH.set(512, 384, 2, ("tinygemm", {"inner_k_tiles": 8, "fallback": ["dequant+cublas", None]}))
    try:
        assert q._resolve(2, x.device)[0] == "dequant+cublas"
        without = q(x)
        q.keep_tinygemm_copy(8)
        assert q._resolve(2, x.device)[0] == "tinygemm"
        with_copy = q(x)
        for y in (without, with_copy):
            assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    finally:
        DISPATCH.table = saved
