"""The per-GPU kernel tuning cache, the BF16-copy rule and the optional-package report (CPU), plus a
real tuning round on CUDA (skipped without it)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from colquant.kernels import W4A16Linear, autotune, backend, copies, humming_ops, tune_cache
from colquant.kernels.linear import DISPATCH
from missing_package import hide_package

CUDA = torch.cuda.is_available() and backend.triton_import_error() is None

KEY = dict(schema=tune_cache.SCHEMA, gpu="NVIDIA H200", colquant="0.1.0", torch="2.11.0+cu130", triton="3.6.0",
           humming="none", gemlite="none", kernels="abc123def456")
ENTRY = dict(K=256, N=128, G=128, M_bucket=4, kind="triton", cfg=dict(kernel="8dot", BM=16, BN=64, SPLIT_K=2),
             name="8dot16x64sa-w4", us=3.5, bf16_us=4.0)


def test_cache_round_trips_and_names_gpu_and_versions(tmp_path):
    path = tune_cache.cache_path(KEY, tmp_path)
    assert path.name == "nvidia-h200-0.1.0-2.11.0-cu130-3.6.0-none.json"
    tune_cache.write_table(path, KEY, [ENTRY])
    assert tune_cache.read_table(path, KEY) == [ENTRY]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("field, other, words", [
    ("gpu", "NVIDIA H100 80GB HBM3", "gpu 'NVIDIA H100 80GB HBM3'"),
    ("kernels", "000000000000", "kernels '000000000000'"),
    ("triton", "3.4.0", "triton '3.4.0'"),
])
def test_foreign_or_stale_cache_is_ignored_with_a_message(tmp_path, caplog, field, other, words):
    path = tune_cache.cache_path(KEY, tmp_path)
    tune_cache.write_table(path, dict(KEY, **{field: other}), [ENTRY])
    with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
        assert tune_cache.read_table(path, KEY) is None
    assert words in caplog.text and "re-tuning" in caplog.text


def test_unwritable_cache_is_not_fatal_and_says_how_to_fix_it(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
        assert tune_cache.save_table(tune_cache.cache_path(KEY, blocker), KEY, [ENTRY]) is False
    assert "could not write the kernel tuning cache" in caplog.text and "COLQUANT_CACHE_DIR" in caplog.text


def test_unreadable_cache_is_ignored_with_a_message(tmp_path, caplog):
    path = tune_cache.cache_path(KEY, tmp_path)
    path.write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
        assert tune_cache.read_table(path, KEY) is None
    assert "unreadable" in caplog.text


def test_missing_cache_is_silently_absent(tmp_path):
    assert tune_cache.read_table(tmp_path / "none.json", KEY) is None


def test_key_tracks_kernel_sources():
    key = tune_cache.cache_key("cpu")
    assert key["gpu"] == "cpu" and len(key["kernels"]) == 12 and key["torch"] == torch.__version__


def test_bf16_is_chosen_only_beyond_the_margin_with_the_4bit_winner_as_fallback():
    timed = {"a": (10.0, {"BM": 16}, "triton"), "dequant+cublas": (12.0, None, "dequant+cublas"),
             "bf16": (9.0, None, "bf16")}
    [e] = autotune._pick(256, 128, 128, 64, timed)
    assert e["kind"] == "bf16" and e["cfg"] == {"fallback": ["triton", {"BM": 16}]} and e["fallback_name"] == "a"
    assert e["timed_us"] == {"a": 10.0, "dequant+cublas": 12.0, "bf16": 9.0}
    [e] = autotune._pick(256, 128, 128, 64, dict(timed, bf16=(9.9, None, "bf16")))  # within 2%: keep 4-bit
    assert e["kind"] == "triton" and e["name"] == "a"
    assert autotune._pick(256, 128, 128, 64, {"bf16": (9.0, None, "bf16")}) == []


def test_a_winner_needing_its_own_copy_falls_back_to_the_best_on_the_layers_tensors():
    timed = {"a": (10.0, {"BM": 16}, "triton"), "tinygemm-k8": (6.0, {"inner_k_tiles": 8}, "tinygemm"),
             "dequant+cublas": (12.0, None, "dequant+cublas"), "bf16": (8.0, None, "bf16")}
    [e] = autotune._pick(256, 128, 128, 1, timed)
    assert e["kind"] == "tinygemm" and e["fallback_name"] == "a"
    assert e["cfg"] == {"inner_k_tiles": 8, "fallback": ["triton", {"BM": 16}]}
    [e] = autotune._pick(256, 128, 128, 1, dict(timed, bf16=(5.0, None, "bf16")))  # bf16 first, then the chain
    assert e["cfg"] == {"fallback": ["tinygemm", {"inner_k_tiles": 8, "fallback": ["triton", {"BM": 16}]}]}


def test_missing_optional_package_is_named_in_the_logged_choice(monkeypatch, caplog):
    hide_package(monkeypatch, "humming")
    humming_ops.clear_cache()
    try:
        missing = autotune.unavailable_candidates(torch.device("cuda"))
        assert "humming-kernels is not installed" in missing["humming"] and "colquant[humming]" in missing["humming"]
        with caplog.at_level(logging.INFO, logger="colquant.kernels"):
            autotune._log_choice_once(torch.device("cuda"), KEY)
        assert "not offered: " in caplog.text and "humming (humming-kernels is not installed" in caplog.text
    finally:
        humming_ops.clear_cache()


def test_ensure_tuned_on_cpu_does_nothing_and_says_why(tmp_path):
    info = autotune.ensure_tuned({(256, 128, 128)}, "cpu", cache_dir=tmp_path)
    assert info == dict(tuned=False, reason="device is cpu, the fused W4A16 path needs a CUDA GPU")
    assert list(tmp_path.iterdir()) == []


def test_tune_command_without_gpu_fails_with_the_reason(caplog):
    from colquant.__main__ import main

    with caplog.at_level(logging.ERROR, logger="colquant.kernels"):
        assert main(["tune", "--device", "cpu"]) == 1
    assert "nothing to tune: device is cpu" in caplog.text


def test_text_tower_shapes_of_the_4b():
    from colquant.retriever.model import ColQwen3Config

    shapes = autotune.text_tower_shapes(ColQwen3Config.colqwen3_4b().text_config)
    assert shapes == {(2560, 6144, 128), (4096, 2560, 128), (2560, 19456, 128), (9728, 2560, 128)}


def test_bf16_copy_kept_only_when_allowed_and_not_saved(caplog):
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16))
    model = torch.nn.Sequential(lin)
    saved = dict(DISPATCH.table)
    DISPATCH.set(256, 64, 64, ("bf16", {"fallback": ["dequant+cublas", None]}))
    try:
        with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
            info = copies.keep_copies(model, "bf16")  # CPU: no free GPU memory to spend
        assert info["kept"] is False and lin.bf16_weight is None and "not kept" in caplog.text
        before = lin.weight_bytes
        info = copies.keep_copies(model, "bf16", allow=True)
        assert info["kept"] is True and torch.equal(lin.bf16_weight, lin.dequantize())
        assert lin.weight_bytes == before + 256 * 64 * 2
        assert "bf16_weight" not in lin.state_dict()
    finally:
        DISPATCH.table = saved


def test_tinygemm_copy_is_wanted_only_for_token_counts_a_forward_reaches_and_no_held_copy_serves():
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16))
    model = torch.nn.Sequential(lin)
    tiny = {"inner_k_tiles": 8, "fallback": ["dequant+cublas", None]}
    saved = dict(DISPATCH.table)
    DISPATCH.set(256, 64, 4, ("tinygemm", tiny))
    try:
        assert copies.wanted_copies(model, "tinygemm") == {}  # 4 tokens: fewer than any ColQwen3 forward
        assert copies.wanted_copies(model, "tinygemm", min_tokens=1) == {(256, 64): tiny}
        DISPATCH.set(256, 64, 64, ("bf16", {"fallback": ["tinygemm", tiny]}))
        assert copies.wanted_copies(model, "tinygemm") == {(256, 64): tiny}  # no BF16 copy held
        lin.keep_bf16_copy()
        assert copies.wanted_copies(model, "tinygemm") == {}  # the BF16 copy serves that bucket
    finally:
        DISPATCH.table = saved


def test_dispatch_walks_fallbacks_to_what_the_layer_holds():
    torch.manual_seed(0)
    lin = W4A16Linear.from_linear(torch.nn.Linear(256, 64, bias=False).to(torch.bfloat16))
    tiny = {"inner_k_tiles": 8, "fallback": ["triton", {"BM": 16}]}
    saved = dict(DISPATCH.table)
    DISPATCH.set(256, 64, 1, ("bf16", {"fallback": ["tinygemm", tiny]}))
    try:
        assert lin._resolve(1, "cpu") == ("triton", {"BM": 16})
        lin.keep_tinygemm_copy(8)  # the CPU flavour of tinygemm's packing
        assert lin._resolve(1, "cpu") == ("tinygemm", tiny)
        lin.keep_bf16_copy()
        assert lin._resolve(1, "cpu")[0] == "bf16"
    finally:
        DISPATCH.table = saved


def test_tuning_table_prints_the_fallback():
    text = autotune.format_table([dict(ENTRY, kind="bf16", name="bf16", fallback_name="8dot16x64sa-w4",
                                       us=5.0, bf16_us=4.0)])
    assert "bf16 (else 8dot16x64sa-w4)" in text and "0.80" in text


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_first_use_tunes_then_reads_the_cache_on_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "TUNE_MS", (1, 64, 1024))
    saved = dict(DISPATCH.table)
    try:
        info = autotune.ensure_tuned({(512, 384, 128)}, "cuda", cache_dir=tmp_path)
        assert info["tuned"] and info["entries"] == 4
        cached = json.loads(next(tmp_path.iterdir()).read_text())
        assert {e["M_bucket"] for e in cached["entries"]} == {1, 64, 1024, 1 << 62}
        again = autotune.ensure_tuned({(512, 384, 128)}, "cuda", cache_dir=tmp_path)
        assert not again["tuned"] and again["entries"] == 4
        torch.manual_seed(1)
        q = W4A16Linear.from_linear(torch.nn.Linear(512, 384, bias=True).cuda().to(torch.bfloat16))
        q.keep_bf16_copy()
        for m in (1, 50, 700):
            x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ q.dequantize(torch.float32).t() + q.bias.float()
            assert ((q(x).float() - ref).norm() / ref.norm()).item() < 1e-2
    finally:
        DISPATCH.table = saved
