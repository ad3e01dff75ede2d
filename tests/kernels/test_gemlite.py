"""gemlite candidate: the arguments its pack receives reproduce our dequantized weight, a missing
package skips its candidates with the reason, and its copy is kept, counted and dispatched like tinygemm's."""

import logging

import pytest
import torch

from colquant.kernels import autotune, copies, gemlite_ops
from colquant.kernels.linear import DISPATCH, W4A16Linear
from colquant.kernels.packing import dequantize_kernel, gptq_to_kernel, rtn_quantize_gptq, unpack_kblocked
from missing_package import hide_package

GEMLITE_NAMES = {"gemlite-gemv-revsplitk", "gemlite-gemm-splitk", "gemlite-gemm"}


def _asym_layer(k=256, n=64, g=128, seed=0):
    """Kernel-layout tensors with random integers and zero points (asymmetric) and fp16 scales."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int8)
    z = torch.randint(1, 16, (k // g, n), generator=gen, dtype=torch.int8)
    s = (torch.rand(k // g, n, generator=gen) * 0.02 + 1e-3).to(torch.float16)
    from colquant.kernels.packing import intweight_to_gptq

    qw, qz = intweight_to_gptq(q, z)
    qk, zu = gptq_to_kernel(qw, qz)
    return qk, zu, s, q, z


def test_pack_arguments_hold_our_integers_zeros_and_scales():
    qk, zu, s, q, z = _asym_layer()
    args = gemlite_ops.pack_arguments(qk, zu, s, dtype=torch.bfloat16)
    assert args.w_q.dtype == torch.uint8 and args.w_q.shape == (64, 256)
    assert torch.equal(args.w_q.to(torch.int8), q.t())  # [N, K] integers, exact
    assert args.zeros.shape == (64, 2) and torch.equal(args.zeros.float(), z.t().float())  # integers exact in bf16
    assert torch.equal(args.scales, s.t().to(torch.bfloat16))


def test_fp16_arguments_dequantize_exactly_to_our_weight():
    qk, zu, s, _, _ = _asym_layer(seed=1)
    args = gemlite_ops.pack_arguments(qk, zu, s, dtype=torch.float16)
    ours = dequantize_kernel(qk, zu, s, 128).t()  # fp16 [N, K]
    assert torch.equal(gemlite_ops.dequantize_arguments(args, 128), ours)


def test_bf16_arguments_differ_from_our_weight_only_by_the_scale_rounding():
    qk, zu, s, _, _ = _asym_layer(seed=2)
    args = gemlite_ops.pack_arguments(qk, zu, s, dtype=torch.bfloat16)
    ours = dequantize_kernel(qk, zu, s, 128, dtype=torch.float32).t()
    got = gemlite_ops.dequantize_arguments(args, 128).float()
    assert ((got - ours).abs() <= ours.abs() * 2.0**-7 + 1e-30).all()  # bf16 scale + one bf16 rounding
    assert ((got - ours).norm() / ours.norm()).item() < autotune.CHECK_REL_ERR


def test_symmetric_layer_passes_the_integer_zero():
    qw, qz, sc = rtn_quantize_gptq(torch.randn(64, 256) * 0.02)
    qk, zu = gptq_to_kernel(qw, qz)
    args = gemlite_ops.pack_arguments(qk, zu, sc)
    assert args.zeros == 8 and torch.equal(args.w_q.t().to(torch.int8), unpack_kblocked(qk))
    assert gemlite_ops.nbytes(256, 64, 128, True) < gemlite_ops.nbytes(256, 64, 128, False)


def test_layer_checks_name_the_problem():
    assert "activation dtype" in gemlite_ops.layer_unsupported_reason(256, 128, torch.float32)
    assert "K % 32" in gemlite_ops.layer_unsupported_reason(272, 16, torch.bfloat16)
    assert gemlite_ops.layer_unsupported_reason(2560, 128, torch.bfloat16) is None


def test_missing_package_skips_the_gemlite_candidates_and_logs_why(monkeypatch, caplog):
    hide_package(monkeypatch, "gemlite")
    gemlite_ops.clear_cache()
    try:
        assert "gemlite is not installed (pip install 'colquant[gemlite]'" in gemlite_ops.import_error()
        if torch.cuda.is_available():  # on CPU the device itself is the (first) reason
            missing = autotune.unavailable_candidates(torch.device("cuda"))
            assert all("gemlite is not installed" in missing[c] for c in GEMLITE_NAMES)
        missing = autotune.unavailable_candidates(torch.device("cpu"))
        assert GEMLITE_NAMES <= set(missing)
        key = dict(gpu="NVIDIA H200", triton="3.6.0", humming="none", gemlite="none")
        monkeypatch.setattr(autotune, "REQUIREMENTS", dict(autotune.REQUIREMENTS, triton=lambda d: None,
                                                           gemlite=lambda d: gemlite_ops.import_error()))
        with caplog.at_level(logging.INFO, logger="colquant.kernels"):
            autotune._log_choice_once(torch.device("cuda"), key)
        assert "gemlite-gemv-revsplitk, gemlite-gemm-splitk, gemlite-gemm (gemlite is not installed" in caplog.text
    finally:
        gemlite_ops.clear_cache()


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("COLQUANT_DISABLE_GEMLITE", "1")
    gemlite_ops.clear_cache()
    try:
        assert "COLQUANT_DISABLE_GEMLITE" in gemlite_ops.import_error()
    finally:
        monkeypatch.delenv("COLQUANT_DISABLE_GEMLITE")
        gemlite_ops.clear_cache()


def test_gemlite_entry_without_a_copy_runs_its_fallback_and_no_copy_is_made_on_cpu(caplog):
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16))
    model = torch.nn.Sequential(lin)
    saved = dict(DISPATCH.table)
    try:
        DISPATCH.set(256, 64, 16, ("gemlite", {"matmul_type": "GEMM_SPLITK", "fallback": ["dequant+cublas", None]}))
        assert lin._resolve(16, torch.device("cpu")) == ("dequant+cublas", None)
        assert copies.wanted_copies(model, "gemlite") == {(256, 64): {"matmul_type": "GEMM_SPLITK",
                                                                       "fallback": ["dequant+cublas", None]}}
        with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
            info = copies.keep_copies(model, "gemlite")
        assert info["kept"] is False and "gemlite" in info["reason"] and lin._gemlite is None
        assert "runs gemlite for 1 layers" in caplog.text
    finally:
        DISPATCH.table = saved


needs_gemlite = pytest.mark.skipif(not torch.cuda.is_available() or gemlite_ops.unavailable_reason("cuda") is not None,
                                   reason="needs CUDA and gemlite")


@needs_gemlite
@pytest.mark.parametrize("kind,m,sym", [("GEMV_REVSPLITK", 1, True), ("GEMV", 2, False), ("GEMM_SPLITK", 16, False),
                                        ("GEMM", 64, True), (None, 8, False)])
def test_gemlite_matches_the_dequantized_reference(kind, m, sym):
    torch.manual_seed(m)
    k, n = 2560, 1024
    lin = W4A16Linear.from_linear(torch.nn.Linear(k, n, bias=False).to("cuda", torch.bfloat16))
    if not sym:
        lin.zeros_u8.random_(4, 12)
        lin._refresh_sym()
    lin.keep_gemlite_copy()
    assert lin.has_copy("gemlite", None)
    assert lin.weight_bytes == lin._kernel_bytes + lin._gemlite.nbytes
    assert abs(lin._gemlite.nbytes - gemlite_ops.nbytes(k, n, 128, sym)) <= 4  # + the scalar zero
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ lin.dequantize(torch.float32).t()
    got = lin._gemlite(x, matmul_type=kind).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@needs_gemlite
def test_tuned_gemlite_entry_dispatches_to_the_copy():
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(2560, 1024, bias=True).to("cuda", torch.bfloat16))
    lin.keep_gemlite_copy()
    saved = dict(DISPATCH.table)
    try:
        DISPATCH.set(2560, 1024, 4, ("gemlite", {"matmul_type": "GEMV_REVSPLITK", "fallback": ["dequant+cublas", None]}))
        x = torch.randn(3, 2560, device="cuda", dtype=torch.bfloat16)
        assert lin._resolve(3, x.device)[0] == "gemlite"
        want = x.float() @ lin.dequantize(torch.float32).t() + lin.bias.float()
        got = lin(x).float()
    finally:
        DISPATCH.table = saved
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def _fake_gemlite(monkeypatch, tmp_path, written: str):
    """gemlite's `cache_config` as the package does it (adds what it tuned to the file it is given);
    the config file in `tmp_path`."""
    import sys
    import types

    def cache_config(path):
        with open(path, "a") as handle:
            handle.write(written)

    monkeypatch.setitem(sys.modules, "gemlite", types.SimpleNamespace(cache_config=cache_config))
    path = tmp_path / "gemlite-gpu.json"
    monkeypatch.setattr(gemlite_ops, "config_path", lambda device, cache_dir=None: path)
    return path


def test_saved_configs_keep_the_earlier_ones(monkeypatch, tmp_path):
    path = _fake_gemlite(monkeypatch, tmp_path, "new")
    path.write_text("old ")
    assert gemlite_ops.save_configs("cuda") == path
    assert path.read_text() == "old new"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging file left


def test_an_unwritable_config_cache_is_logged_not_fatal(monkeypatch, tmp_path, caplog):
    path = _fake_gemlite(monkeypatch, tmp_path, "new")
    monkeypatch.setattr(gemlite_ops, "config_path", lambda device, cache_dir=None: path / "under-a-file.json")
    path.write_text("a file, not a directory")
    with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
        assert gemlite_ops.save_configs("cuda") is None
    assert "cannot write" in caplog.text and "autotunes gemlite again" in caplog.text
