"""The one "why can't this kernel family run here" check (`gpu_unavailable`) and the one optional
package probe (`package_import_error`) that Triton, humming, tinygemm, FP8 and the fast vision tower share."""

from __future__ import annotations

import sys

import pytest
import torch

from colquant.kernels import fp8_dispatch
from colquant.kernels import backend, fast_vision, tinygemm


def test_package_probe_says_disabled_missing_or_broken(monkeypatch, tmp_path):
    monkeypatch.setenv("COLQUANT_TEST_DISABLE", "1")
    assert backend.package_import_error("pkg", "COLQUANT_TEST_DISABLE", "pip install pkg", ("json",)) \
        == "pkg disabled by COLQUANT_TEST_DISABLE"
    monkeypatch.setenv("COLQUANT_TEST_DISABLE", "0")
    assert backend.package_import_error("pkg", "COLQUANT_TEST_DISABLE", "pip install pkg", ("json",)) is None
    assert backend.package_import_error("pkg", "COLQUANT_TEST_DISABLE", "pip install pkg",
                                        ("colquant_no_such_package",)) == "pkg is not installed (pip install pkg)"
    (tmp_path / "colquant_broken_pkg.py").write_text("raise RuntimeError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "colquant_broken_pkg", raising=False)
    reason = backend.package_import_error("pkg", "COLQUANT_TEST_DISABLE", "pip install pkg",
                                          ("json", "colquant_broken_pkg"))
    assert reason == "pkg failed to import (RuntimeError: half installed)"


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


def test_each_family_names_the_capability_it_needs(monkeypatch):
    for module in (backend, fast_vision, fp8_dispatch):  # as where Triton is installed
        monkeypatch.setattr(module, "triton_import_error", lambda: None)
    fake_gpu(monkeypatch, (8, 6))
    assert fp8_dispatch.fp8_unavailable_reason("cuda") == \
        "Fake GPU has compute capability 8.6; FP8 tensor cores need 8.9 or more"
    fake_gpu(monkeypatch, (7, 5))
    assert backend.gpu_unavailable("cuda", "x", lambda: None) == \
        "Fake GPU has compute capability 7.5; bf16 tensor cores need 8.0 or more"
    assert tinygemm.unavailable_reason("cuda") == \
        "Fake GPU has compute capability 7.5; bf16 tensor cores need 8.0 or more"
    assert fast_vision.unavailable_reason("cuda") == \
        "Fake GPU has compute capability 7.5; bf16 tensor cores need 8.0 or more"


def test_a_missing_dependency_is_named_before_the_capability(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    assert backend.gpu_unavailable("cuda", "x", lambda: "x is not installed") == "x is not installed"
    monkeypatch.setenv("COLQUANT_DISABLE_TRITON", "1")
    backend.clear_cache()
    try:
        assert fp8_dispatch.fp8_unavailable_reason("cuda") == "Triton disabled by COLQUANT_DISABLE_TRITON"
        assert fast_vision.unavailable_reason("cuda") == "Triton disabled by COLQUANT_DISABLE_TRITON"
    finally:
        monkeypatch.delenv("COLQUANT_DISABLE_TRITON")
        backend.clear_cache()


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_off_gpu_every_family_says_it_needs_cuda(device):
    assert backend.fast_path_unavailable(device) == "device is cpu, the fused W4A16 path needs a CUDA GPU"
    assert tinygemm.unavailable_reason(device) == "device is cpu, tinygemm needs a CUDA GPU"
    assert fp8_dispatch.fp8_unavailable_reason(device) == "device is cpu, the FP8 path needs a CUDA GPU"
    assert fast_vision.unavailable_reason(device) == "device is cpu, the fast vision tower needs a CUDA GPU"
