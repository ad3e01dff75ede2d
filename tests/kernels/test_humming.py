"""humming-kernels candidate: offered only where it can run, reported otherwise, exact dispatch fallback."""

import pytest
import torch

from colquant.kernels import backend_report, humming_ops
from colquant.kernels.copies import prepare_humming
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
        assert "COLQUANT_DISABLE_HUMMING" in (humming_ops.import_error() or "")
    finally:
        monkeypatch.delenv("COLQUANT_DISABLE_HUMMING")
        humming_ops.clear_cache()


def test_supported_needs_symmetric_zero_points():
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16))
    assert lin.sym_zero == 8 and humming_ops.unsupported_reason(lin) is None
    lin.zeros_u8[0, 0] = 7
    lin._refresh_sym()
    assert humming_ops.unsupported_reason(lin) is not None


def test_humming_entry_roundtrips_and_has_default():
    d = Dispatcher()
    d.set(2560, 9728, 64, ("humming", None))
    d2 = Dispatcher()
    d2.load_json(d.to_json())
    assert d2.choose(44, 2560, 9728) == ("humming", None)
    assert d2.default(200, 2560, 9728) == ("dequant+cublas", None)


def test_prepare_model_without_package_or_gpu_is_a_noop():
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False))
    info = prepare_humming(torch.nn.Sequential(lin), only_dispatched=False)
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
    assert lin.spilled and lin.qweight_k.device.type == "cpu"  # one 4-bit copy on the GPU: humming's
    assert lin.weight_bytes == lin._humming_bytes and lin.host_bytes > lin.qweight_k.numel() * 4
    assert lin._humming.cfgs is not None  # the direct launch path (not HummingLayer.forward)
    x = torch.randn(m, 2 * k if act else k, device="cuda", dtype=torch.bfloat16)
    a = (torch.nn.functional.silu(x[:, :k].float()) * x[:, k:].float()) if act else x.float()
    want = a @ lin.dequantize(torch.float32).t()
    got = humming_ops.matmul(x, lin, act=act).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


class _FakeHandle:
    """Stands in for a humming Handle on the CPU: holds its own (dense) copy, counts calls."""

    def __init__(self, lin):
        self.w = lin.dequantize(torch.float32).t().contiguous()  # [K, N]
        self.nbytes = lin.qweight_k.numel() * 4 + 1234
        self.calls = []

    def __call__(self, x, outputs=None):
        self.calls.append(x.shape[0])
        return (x.float() @ self.w).to(x.dtype)


def _lin(bias=False):
    torch.manual_seed(0)
    return W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=bias).to(torch.bfloat16))


def test_single_copy_moves_kernel_tensors_to_host_and_counts_truthfully():
    lin = _lin(bias=True)
    kernel_bytes = lin.qweight_k.numel() * 4 + lin.zeros_u8.numel() + lin.scales.numel() * 2
    bias_bytes = lin.bias.numel() * lin.bias.element_size()
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    want = lin(x)
    w_before = lin.dequantize(torch.float32)
    gptq_before = lin.to_gptq()
    h = _FakeHandle(lin)
    humming_ops.attach(lin, h, single_copy=True)
    assert lin.spilled and lin.compute_device == torch.device("cpu")
    assert lin.weight_bytes == h.nbytes + bias_bytes  # only humming's copy (+ bias) on the device
    assert lin.host_bytes == kernel_bytes
    assert "qweight_k" in dict(lin.named_buffers())  # state_dict still carries the exact weights
    # the reference path, dequantize and to_gptq still read the (host) kernel-layout copy, exactly
    assert torch.equal(lin(x), want) and not h.calls
    assert torch.equal(lin.dequantize(torch.float32), w_before)
    assert all(torch.equal(a, b) for a, b in zip(lin.to_gptq(), gptq_before))
    humming_ops.release(lin)
    assert not lin.spilled and getattr(lin, "_humming", None) is None
    assert lin.weight_bytes == kernel_bytes + bias_bytes and lin.host_bytes == 0
    assert torch.equal(lin(x), want)


def test_keep_kernel_copy_counts_both(monkeypatch):
    lin = _lin()
    kernel_bytes = lin.weight_bytes
    h = _FakeHandle(lin)
    monkeypatch.setenv("COLQUANT_HUMMING_KEEP_KERNEL_COPY", "1")
    humming_ops.attach(lin, h)
    assert not lin.spilled and lin.host_bytes == 0
    assert lin.weight_bytes == kernel_bytes + h.nbytes


def test_spilled_layer_sends_every_m_to_humming(monkeypatch):
    import colquant.kernels.linear as lm

    lin = _lin()
    h = _FakeHandle(lin)
    humming_ops.attach(lin, h, single_copy=True)
    monkeypatch.setattr(lm, "fast", lambda device: True)  # as on a GPU with the fast path
    saved = dict(DISPATCH.table)
    DISPATCH.record_stats = True
    DISPATCH.stats.clear()
    try:
        # the table prefers other kernels at these sizes; with one copy humming must serve them
        DISPATCH.set(256, 64, 8, ("dequant+cublas", None))
        DISPATCH.set(256, 64, 1 << 62, ("dequant+cublas", None))
        for m in (3, 20000):
            x = torch.randn(m, 256, dtype=torch.bfloat16)
            got = lin(x).float()
            want = x.float() @ lin.dequantize(torch.float32).t()
            assert ((got - want).norm() / want.norm()).item() < 1e-2
        assert h.calls == [3, 20000]
        assert {kind for (_, _, _, kind) in DISPATCH.stats} == {"humming"}
    finally:
        DISPATCH.table = saved
        DISPATCH.record_stats = False
        DISPATCH.stats.clear()


def test_concat_of_spilled_parts_builds_on_compute_device():
    a, b = _lin(), _lin()
    humming_ops.attach(a, _FakeHandle(a), single_copy=True)
    c = W4A16Linear.concat([a, b])
    assert c.qweight_k.shape == (256 // 8, 128) and not c.spilled
    assert torch.equal(c.dequantize(torch.float32)[:64], a.dequantize(torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available() or humming_ops.unavailable_reason("cuda") is not None,
                    reason="needs CUDA and humming-kernels")
def test_single_copy_module_forward_every_m_and_reference_on_gpu():
    from colquant.kernels.linear import force_reference

    torch.manual_seed(0)
    k, n = 2560, 2048
    lin = W4A16Linear.from_linear(torch.nn.Linear(k, n, bias=False).to("cuda", torch.bfloat16))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    kernel_bytes = lin.weight_bytes
    humming_ops.prepare(lin)
    torch.cuda.synchronize()
    # the GPU now holds humming's copy instead of ours (within its scales/lock overhead)
    delta = torch.cuda.memory_allocated() - before
    assert abs(delta - (lin._humming_bytes - kernel_bytes)) < 2**20, (delta, lin._humming_bytes, kernel_bytes)
    saved = dict(DISPATCH.table)
    try:
        DISPATCH.table = {}  # the built-in table would pick Triton / dequant+cuBLAS: humming must serve
        for m in (1, 300, 12000):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ lin.dequantize(torch.float32).t()
            got = lin(x).float()
            assert ((got - want).norm() / want.norm()).item() < 1e-2
            with force_reference():
                r = lin(x).float()
            assert ((r - want).norm() / want.norm()).item() < 1e-2
    finally:
        DISPATCH.table = saved
    humming_ops.release(lin)
    assert lin.qweight_k.device.type == "cuda" and not lin.spilled
