"""Int8 token embeddings (`colquant.kernels.embedding`): the rounding bound per row, the swap inside a
ColQwen3, `colquant.load(embeddings=...)`, the bench's memory-first precision, and the bad inputs."""

import pytest
import torch
from torch import nn

import colquant
from colquant.kernels.embedding import Int8Embedding, quantize_embeddings, quantize_rows_int8
from colquant.kernels.fast_text import find_text_model, offload_embeddings

QUERIES = ["what was the revenue in 2021?", "operating margin of the retail unit", "headcount"]


def bf16_table(rows: int = 300, hidden: int = 64) -> torch.Tensor:
    """Rows of very different magnitudes (per-row scales must follow them) and one all-zero row."""
    torch.manual_seed(0)
    table = torch.randn(rows, hidden) * torch.logspace(-3, 1, rows).unsqueeze(1)
    table[7] = 0
    return table.to(torch.bfloat16)


def test_round_trip_error_is_at_most_half_a_step_per_row():
    table = bf16_table()
    qweight, scales = quantize_rows_int8(table, rows_per_chunk=64)  # chunks that do not divide the rows
    exact = table.float()
    error = (qweight.float() * scales - exact).abs().amax(dim=1)
    bound = exact.abs().amax(dim=1) / 254
    # float32's own rounding of q * scale is at most 127 * 2**-24 of a row's absmax, ~2e-5 of the bound
    assert bool((error <= bound * (1 + 1e-4)).all()) and float((error / bound).nan_to_num().max()) > 0.9
    assert qweight.dtype == torch.int8 and int(qweight.abs().max()) == 127
    assert float(scales[7]) == 1.0 and not bool(qweight[7].any())  # the zero row: no division by zero


def test_forward_gathers_and_dequantizes_like_nn_embedding():
    embedding = nn.Embedding.from_pretrained(bf16_table(), freeze=True)
    quantized = Int8Embedding.from_embedding(embedding)
    ids = torch.tensor([[3, 7, 299], [0, 150, 3]])
    out = quantized(ids)
    reference = embedding(ids)
    assert out.shape == reference.shape and out.dtype == reference.dtype == torch.bfloat16
    assert torch.equal(out, quantized.dequantize()[ids].to(torch.bfloat16))
    step = embedding.weight.float().abs().amax(dim=1)[ids].unsqueeze(-1) / 254
    ulp = reference.float().abs() * 2**-8  # the bf16 output's own rounding
    assert bool(((out.float() - reference.float()).abs() <= step + ulp).all())
    assert quantized(torch.tensor(5)).shape == (64,)  # transformers embeds a scalar token id this way


def test_quantize_embeddings_swaps_the_table_and_frees_half_of_it(tiny_path):
    model, _ = colquant.load(tiny_path)
    table = find_text_model(model).embed_tokens.weight
    vocab, hidden = table.shape
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    freed = quantize_embeddings(model)
    assert isinstance(find_text_model(model).embed_tokens, Int8Embedding)
    assert freed == vocab * hidden * 2 - vocab * hidden - vocab * 4  # bf16 -> int8 codes + float32 scales
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == parameter_bytes - vocab * hidden * 2
    assert all(p.data_ptr() != table.data_ptr() for p in model.parameters())
    assert quantize_embeddings(model) == 0  # already int8


def test_query_embeddings_with_the_int8_table_match_the_bf16_table(tiny_path):
    """The error the int8 table adds where it matters: per-token cosine of the query embeddings."""
    bf16_model, processor = colquant.load(tiny_path)
    int8_model, _ = colquant.load(tiny_path, embeddings="int8")
    batch = processor.process_queries(QUERIES)
    with torch.inference_mode():
        reference = bf16_model(**batch).embeddings.float()
        quantized = int8_model(**batch).embeddings.float()
    mask = batch["attention_mask"].bool()
    cosine = nn.functional.cosine_similarity(reference[mask], quantized[mask], dim=-1)
    assert float(cosine.min()) > 0.995 and float(cosine.mean()) > 0.999
    assert not torch.equal(reference, quantized)  # the int8 table was really used


def test_load_rejects_an_unknown_embeddings_value_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"embeddings='fp4'.*'bf16', 'int8'"):
        colquant.load(tmp_path / "no-such-checkpoint", embeddings="fp4")


def test_a_model_with_no_text_embedding_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="quantize_embeddings: no Qwen3-VL text tower.*pass a ColQwen3"):
        quantize_embeddings(nn.Sequential(nn.Linear(4, 4)))


def test_a_text_tower_whose_embedding_is_not_a_float_table_is_refused(tiny_path):
    model, _ = colquant.load(tiny_path)
    find_text_model(model).embed_tokens = nn.Identity()
    with pytest.raises(ValueError, match="embed_tokens is Identity, not a floating-point nn.Embedding"):
        quantize_embeddings(model)


def test_offloaded_embeddings_are_refused_with_the_fix(tiny_path):
    model, _ = colquant.load(tiny_path)
    offload_embeddings(model)
    with pytest.raises(ValueError, match="offloaded to host memory.*restore_embeddings"):
        quantize_embeddings(model)


def test_the_bench_memory_first_precision_uses_int8_embeddings(tiny_path):
    from colquant.deploy import bench
    from colquant.kernels import W4A16Linear

    model, _ = colquant.load(tiny_path)
    info = bench.PREPARE["w4a16-memory"](model, {"quantization": {"group_size": 32}})
    assert isinstance(find_text_model(model).embed_tokens, Int8Embedding)
    assert info["int8_embeddings_freed_mib"] > 0 and info["rtn_linears"] > 0
    assert any(isinstance(m, W4A16Linear) for m in model.modules())
