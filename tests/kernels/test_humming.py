"""humming-kernels candidate: offered only where it can run, reported otherwise, exact dispatch fallback."""

import pytest
import torch

from colquant.kernels import backend_report, humming_ops
from colquant.kernels.linear import DISPATCH, Dispatcher, W4A16Linear


def test_report_lists_humming_with_reason_on_cpu():
    info = backend_report("cpu")
    h = info["candidates"]["humming"]
    assert h["available"] is False
    assert isinstance(h["reason"], str) and h["reason"]


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("COLQUANT_DISABLE_HUMMING", "1")
    humming_ops.clear_cache()
    try:
        assert "COLQUANT_DISABLE_HUMMING" in (humming_ops._import_error() or "")
    finally:
        monkeypatch.delenv("COLQUANT_DISABLE_HUMMING")
        humming_ops.clear_cache()


def test_supported_needs_symmetric_zero_points():
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16))
    assert lin.sym_zero == 8 and humming_ops.supported(lin) is None
    lin.zeros_u8[0, 0] = 7
    lin._refresh_sym()
    assert humming_ops.supported(lin) is not None


def test_humming_entry_roundtrips_and_has_default():
    d = Dispatcher()
    d.set(2560, 9728, 64, ("humming", None))
    d2 = Dispatcher()
    d2.load_json(d.to_json())
    assert d2.choose(44, 2560, 9728) == ("humming", None)
    assert d2.default(200, 2560, 9728) == ("dequant+cublas", None)


def test_prepare_model_without_package_or_gpu_is_a_noop():
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False))
    info = humming_ops.prepare_model(torch.nn.Sequential(lin), only_dispatched=False)
    assert info["prepared"] == 0 and info["reason"]
    assert lin.weight_bytes == lin.qweight_k.numel() * 4 + lin.zeros_u8.numel() + lin.scales.numel() * 2


def test_cpu_forward_with_humming_entry_uses_reference():
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    want = x.float() @ lin.dequantize(torch.float32).t()
    saved = dict(DISPATCH.table)
    try:
        DISPATCH.set(256, 64, 4, ("humming", None))
        got = lin(x).float()
    finally:
        DISPATCH.table = saved
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or humming_ops.unavailable_reason("cuda") is not None,
                    reason="needs CUDA and humming-kernels")
@pytest.mark.parametrize("m", [1, 44, 352])
@pytest.mark.parametrize("act", [False, True])
def test_humming_matches_dequantized_reference(m, act):
    torch.manual_seed(m)
    k, n = 2560, 1024
    lin = W4A16Linear.from_linear(torch.nn.Linear(k, n, bias=False).to("cuda", torch.bfloat16))
    humming_ops.prepare(lin)
    assert lin.weight_bytes > lin.qweight_k.numel() * 4
    assert lin._humming.cfgs is not None  # the direct launch path (not HummingLayer.forward)
    x = torch.randn(m, 2 * k if act else k, device="cuda", dtype=torch.bfloat16)
    a = (torch.nn.functional.silu(x[:, :k].float()) * x[:, k:].float()) if act else x.float()
    want = a @ lin.dequantize(torch.float32).t()
    got = humming_ops.matmul(x, lin, act=act).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
