"""accelerate_model on the embedded tiny ColQwen3 (CPU: fused tower with reference ops)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from PIL import Image

from colquant.kernels import W4A16Linear, backend, accelerate_model, find_text_model, quantize_linears_rtn

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def batches(tiny_model):
    _, processor = tiny_model
    queries = processor.process_queries(["q", "what was the revenue in 2019 and why", "a third one"])
    pages = processor.process_images([Image.new("RGB", (256, 320), "white"),
                                      Image.effect_noise((448, 576), 64).convert("RGB")])
    return queries, pages


def _embed(model, batch):
    with torch.no_grad():
        return model(**batch).embeddings.float()


def _assert_close(a, b, mask, tol):
    mask = mask.bool()
    assert torch.equal(a[~mask], torch.zeros_like(a[~mask]))
    cos = torch.nn.functional.cosine_similarity(a[mask], b[mask], dim=-1)
    assert cos.min().item() > 1 - tol, cos.min().item()


def test_fused_float_tower_matches_transformers(tiny_model, batches, caplog, monkeypatch):
    monkeypatch.setattr(backend, "_WARNED", set())  # an earlier test may have logged the message once already
    model, _ = tiny_model
    m = copy.deepcopy(model).float()
    queries, pages = batches
    ref_q, ref_p = _embed(m, queries), _embed(m, pages)
    with caplog.at_level(logging.INFO, logger="colquant.kernels"):
        accelerate_model(m)
    tm = find_text_model(m)
    n_layers = len(tm.layers)
    assert m._colquant_acceleration["qkv"] == n_layers and m._colquant_acceleration["gate_up"] == n_layers
    assert m._colquant_acceleration["backend"] == "reference"
    assert not hasattr(tm.layers[0].self_attn, "q_proj")  # weights are not held twice
    assert any("reference ops" in r.getMessage() for r in caplog.records)
    _assert_close(_embed(m, queries), ref_q, queries["attention_mask"], 1e-5)
    _assert_close(_embed(m, pages), ref_p, pages["attention_mask"], 1e-5)  # deepstack + M-RoPE + padding
    assert tm._colquant_accel.calls["eager"] == 2


def test_fused_4bit_tower_matches_unfused_4bit(tiny_model, batches):
    model, _ = tiny_model
    m = copy.deepcopy(model).float()
    tm = find_text_model(m)
    assert quantize_linears_rtn(tm.layers, 128, names=PROJ) == 7 * len(tm.layers)
    queries, pages = batches
    ref_q, ref_p = _embed(m, queries), _embed(m, pages)
    accelerate_model(m)
    assert isinstance(tm.layers[0].self_attn.qkv_proj, W4A16Linear)
    assert isinstance(tm.layers[0].mlp.gate_up_proj, W4A16Linear)
    _assert_close(_embed(m, queries), ref_q, queries["attention_mask"], 1e-5)
    _assert_close(_embed(m, pages), ref_p, pages["attention_mask"], 1e-5)


def test_bf16_4bit_model_runs_accelerated_on_cpu(tiny_model, batches):
    model, _ = tiny_model
    m = copy.deepcopy(model).to(torch.bfloat16)
    tm = find_text_model(m)
    ref_q = _embed(m, batches[0])
    quantize_linears_rtn(tm.layers, 128, names=PROJ)
    accelerate_model(m)
    out = _embed(m, batches[0])
    assert torch.isfinite(out).all()
    _assert_close(out, ref_q, batches[0]["attention_mask"], 0.1)  # 4-bit vs bf16, random tiny weights


def test_host_offloaded_embeddings_give_the_same_embeddings(tiny_model, batches):
    from colquant.kernels import restore_embeddings
    from colquant.kernels.fast_text import OffloadedEmbedding

    model, _ = tiny_model
    m = copy.deepcopy(model).float()
    ref_q = _embed(m, batches[0])
    accelerate_model(m, offload_embeddings_to_host=True)
    tm = find_text_model(m)
    assert isinstance(tm.embed_tokens, OffloadedEmbedding)
    _assert_close(_embed(m, batches[0]), ref_q, batches[0]["attention_mask"], 1e-5)
    restore_embeddings(m)
    assert isinstance(tm.embed_tokens, torch.nn.Embedding)
    _assert_close(_embed(m, batches[0]), ref_q, batches[0]["attention_mask"], 1e-5)
