"""Which attention the fast vision tower runs (kernels/vision_attention.py): each branch of the choice
forced on CPU (FA3's library present or absent, Hopper or not, FP8 or BF16 tower, head dim), the reasons
logged once, an explicit choice that cannot run refused, and what `accelerate_vision` records."""

import copy
import logging

import pytest
import torch

from colquant.kernels import backend, fa3_ops, fast_vision, vision_attention
from colquant.retriever.fp8 import FP8Linear

NOT_INSTALLED = "vLLM 0.26.0's FlashAttention-3 library is not installed (pip install ...)"


def tower(hidden: int = 128, fp8: bool = True, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A one-block Qwen3-VL vision tower of two heads (head dim hidden / 2), FP8 Linears as in fp8-all.
    transformers' Qwen3-VL module is imported here, not at collection: it imports Triton, which must
    first see TRITON_INTERPRET where the Triton kernel tests set it (tests/kernels/triton_setup.py)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from colquant.retriever.model import ColQwen3Config

    config = copy.deepcopy(ColQwen3Config.tiny().vision_config)
    config.hidden_size, config.depth, config.deepstack_visual_indexes = hidden, 1, []
    visual = Qwen3VLVisionModel._from_config(config, dtype=dtype)
    if fp8:
        for name in [n for n, m in visual.named_modules() if type(m) is torch.nn.Linear]:
            visual.set_submodule(name, FP8Linear.from_linear(visual.get_submodule(name)))
    return visual


@pytest.fixture(autouse=True)
def fresh_logs():
    backend._WARNED.clear()
    yield
    backend._WARNED.clear()


def fa3_runs(monkeypatch):
    monkeypatch.setattr(fa3_ops, "unavailable_reason", lambda device: None)


def test_fp8_tower_gets_fa3_where_it_runs(monkeypatch):
    fa3_runs(monkeypatch)
    assert vision_attention.choose_attention(tower(), "cuda") == ("fa3-fp8", {})


def test_bf16_tower_keeps_sdpa_even_where_fa3_runs(monkeypatch):
    fa3_runs(monkeypatch)
    assert vision_attention.choose_attention(tower(fp8=False), "cuda") == ("sdpa", {})


def test_without_the_library_fp8_tower_runs_sdpa_and_says_why_once(monkeypatch, caplog):
    monkeypatch.setattr(fa3_ops, "load_error", lambda: NOT_INSTALLED)
    visual = tower()
    with caplog.at_level(logging.INFO, logger="colquant.kernels"):
        for _ in range(2):
            assert vision_attention.choose_attention(visual, "cuda:0") == ("sdpa", {"fa3-fp8": NOT_INSTALLED})
    said = [r for r in caplog.records if "fa3-fp8" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "runs sdpa, not fa3-fp8, because " + NOT_INSTALLED in said[0].getMessage()


def test_not_hopper_runs_sdpa_naming_the_gpu(monkeypatch):
    monkeypatch.setattr(fa3_ops, "load_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    name, passed_over = vision_attention.choose_attention(tower(), "cuda:0")
    assert name == "sdpa" and "NVIDIA L40S has compute capability 8.9" in passed_over["fa3-fp8"]


@pytest.mark.parametrize("hidden, dtype, why", [(64, torch.bfloat16, "this one is 32"),
                                                (128, torch.float16, "this tower computes in torch.float16")])
def test_head_dim_and_dtype_fa3_lacks_run_sdpa(monkeypatch, hidden, dtype, why):
    fa3_runs(monkeypatch)
    name, passed_over = vision_attention.choose_attention(tower(hidden, dtype=dtype), "cuda")
    assert name == "sdpa" and why in passed_over["fa3-fp8"]


def test_asking_for_fa3_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(fa3_ops, "load_error", lambda: NOT_INSTALLED)
    with pytest.raises(ValueError, match=r"vision attention 'fa3-fp8' cannot run here: vLLM 0.26.0's FlashAttention-3 "
                                         r"library is not installed .*unset to get 'sdpa' instead"):
        vision_attention.check_attention("fa3-fp8", tower(), "cuda")
    with pytest.raises(ValueError, match="unknown vision attention 'flash'"):
        vision_attention.check_attention("flash", tower(), "cuda")


@pytest.mark.parametrize("fa3_reason, attention", [(None, "fa3-fp8"), (NOT_INSTALLED, "sdpa")])
def test_accelerate_vision_records_the_choice_and_what_it_passed_over(monkeypatch, fa3_reason, attention):
    monkeypatch.setattr(fast_vision, "unavailable_reason", lambda device: None)  # as on a GPU with Triton
    monkeypatch.setattr(fa3_ops, "unavailable_reason", lambda device: fa3_reason)
    model = tower()  # accelerate_vision takes a model or the tower itself
    info = fast_vision.accelerate_vision(model)
    assert info["installed"] and info["attention"] == attention
    assert info["attention_passed_over"] == ({} if fa3_reason is None else {"fa3-fp8": fa3_reason})
    again = fast_vision.accelerate_vision(model)  # the bench installs twice: the record stays
    assert again["attention"] == attention and again["attention_passed_over"] == info["attention_passed_over"]


def test_accelerate_vision_refuses_an_explicit_attention_that_cannot_run(monkeypatch):
    monkeypatch.setattr(fast_vision, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(fa3_ops, "unavailable_reason", lambda device: NOT_INSTALLED)
    with pytest.raises(ValueError, match="'fa3-fp8' cannot run here"):
        fast_vision.accelerate_vision(tower(), fast_vision.VisionSettings(attention="fa3-fp8"))
