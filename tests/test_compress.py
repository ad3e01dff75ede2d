import pytest
import torch
import yaml

from colquant.inference.compress import (
    BinaryPages,
    CompressionSetting,
    FloatPages,
    Int8Pages,
    compress_pages,
    pack_signs,
    parse_setting,
    pool_tokens,
    profile_settings,
    score_compressed,
    unpack_signs,
)
from colquant.retriever.scoring import score


def brute_force_maxsim(queries: list[torch.Tensor], pages: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(len(queries), len(pages), dtype=torch.float64)
    for qi, q in enumerate(queries):
        for pi, p in enumerate(pages):
            out[qi, pi] = sum(max(float(q_tok.double() @ p_tok.double()) for p_tok in p) for q_tok in q) if len(p) else 0.0
    return out.float()


def ragged(generator: torch.Generator, count: int, low: int, high: int, dim: int) -> list[torch.Tensor]:
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1) for n in lengths]


def stored_pages(pages) -> list[torch.Tensor]:
    """Each page's vectors as the scorer sees them (dequantised), read back from the format."""
    return [pages.dequantize(torch.arange(int(a), int(b)), torch.float32) for a, b in zip(pages.offsets[:-1], pages.offsets[1:])]


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("none", CompressionSetting(None, "float")),
    ("int8", CompressionSetting(None, "int8")),
    ("binary", CompressionSetting(None, "binary")),
    ("pool2", CompressionSetting(2, "float")),
    ("pool9+int8", CompressionSetting(9, "int8")),
    ("pool3+binary", CompressionSetting(3, "binary")),
])
def test_settings_parse_and_round_trip(text, expected):
    assert parse_setting(text) == expected
    assert parse_setting(text).name == text


@pytest.mark.parametrize("text", ["pool1", "pool10", "pool", "float", "binary+pool3", "pool3+none", "POOL3", " none", "", None, 3])
def test_bad_settings_name_the_allowed_forms(text):
    with pytest.raises(ValueError, match="allowed forms: none, int8, binary, poolN"):
        parse_setting(text)


@pytest.mark.parametrize("pool_factor, quantization, refusal", [
    (None, "int4", "quantization 'int4' is not a number format"),
    (3, "fp8", "quantization 'fp8' is not a number format"),
    (1, "float", "pool_factor 1 is not a pool factor"),
    (10, "int8", "pool_factor 10 is not a pool factor"),
    (2.5, "float", "pool_factor 2.5 is not a pool factor"),
    (True, "binary", "pool_factor True is not a pool factor"),
])
def test_a_setting_that_cannot_be_stored_is_refused_not_stored_as_float(pool_factor, quantization, refusal):
    """An unknown format was stored as float under its own name (and filed as that format's results)."""
    with pytest.raises(ValueError, match=refusal):
        CompressionSetting(pool_factor, quantization)


def test_profile_settings_are_the_validated_profiles_parsed():
    """The default grid and the refusals live in the profile schema (tests/test_params.py)."""
    from colquant.research.params import validate_profile
    from colquant.research.workspace import REPO_ROOT

    profile = yaml.safe_load((REPO_ROOT / "params" / "tiny.yaml").read_text())
    profile.pop("compression", None)
    default = validate_profile(profile, check_device=False)
    assert [s.name for s in profile_settings(default)] == ["none", "pool2", "pool3", "int8", "binary", "pool3+binary"]
    profile["compression"] = {"settings": ["binary", "pool4+int8"]}
    assert profile_settings(validate_profile(profile, check_device=False)) == [
        CompressionSetting(None, "binary"), CompressionSetting(4, "int8")]


# --- formats ----------------------------------------------------------------------------------


def test_sign_bits_round_trip_for_dims_not_multiple_of_eight():
    vectors = torch.randn(7, 13, generator=torch.Generator().manual_seed(0))
    bits = pack_signs(vectors)
    assert bits.shape == (7, 2) and bits.dtype == torch.uint8
    assert torch.equal(unpack_signs(bits, 13), torch.where(vectors > 0, 1.0, -1.0))


def test_int8_dequantisation_error_is_within_half_a_step():
    pages = ragged(torch.Generator().manual_seed(1), 4, 2, 9, dim=16)
    compressed = compress_pages(pages, "int8")
    for page, stored in zip(pages, stored_pages(compressed)):
        step = page.abs().amax(-1, keepdim=True) / 127
        assert ((page - stored).abs() <= step / 2 + 1e-7).all()


def test_storage_bytes_are_those_of_the_stored_tensors():
    pages = ragged(torch.Generator().manual_seed(2), 5, 3, 11, dim=16)
    rows = sum(len(p) for p in pages)
    offsets = 6 * 8
    bf16 = [p.to(torch.bfloat16) for p in pages]
    assert compress_pages(bf16, "none").nbytes == rows * 16 * 2 + offsets
    assert compress_pages(pages, "int8").nbytes == rows * (16 + 4) + offsets
    binary = compress_pages(pages, "binary")
    assert binary.nbytes == rows * 2 + offsets
    assert binary.bytes_per_page == pytest.approx(binary.nbytes / 5)
    pooled = compress_pages(pages, "pool3+binary")
    assert pooled.nbytes == int(pooled.lengths.sum()) * 2 + offsets < binary.nbytes


def test_padding_rows_are_not_stored():
    pages = ragged(torch.Generator().manual_seed(3), 3, 2, 8, dim=8)
    padded = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)
    compressed = compress_pages(padded, "none")
    assert compressed.lengths.tolist() == [len(p) for p in pages]
    assert isinstance(compressed, FloatPages)
    assert isinstance(compress_pages(padded, "int8"), Int8Pages)
    assert isinstance(compress_pages(padded, "binary"), BinaryPages)


# --- pooling --------------------------------------------------------------------------------


def test_pooling_groups_near_duplicates_into_normalised_means():
    generator = torch.Generator().manual_seed(4)
    centres = torch.nn.functional.normalize(torch.randn(4, 32, generator=generator), dim=-1)
    tokens = torch.cat([centres[i] + 0.01 * torch.randn(3, 32, generator=generator) for i in range(4)])
    pooled = pool_tokens(tokens, pool_factor=3)
    assert pooled.shape == (4, 32)
    expected = torch.nn.functional.normalize(
        torch.stack([torch.nn.functional.normalize(tokens[3 * i : 3 * i + 3], dim=-1).sum(0) for i in range(4)]), dim=-1)
    order = (pooled @ expected.T).argmax(-1)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(pooled, expected[order], atol=1e-6)


def test_pooling_keeps_protected_tokens_and_counts_clusters():
    tokens = ragged(torch.Generator().manual_seed(5), 1, 20, 21, dim=8)[0]
    pooled = pool_tokens(tokens, pool_factor=2, protected_tokens=3)
    assert torch.equal(pooled[:3], tokens[:3])
    assert pooled.shape[0] == 3 + (20 - 3) // 2
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(pooled.shape[0]), atol=1e-6)
    with pytest.raises(ValueError, match="pool_factor must be at least 2"):
        pool_tokens(tokens, pool_factor=1)


# --- scoring --------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["none", "int8", "binary", "pool2", "pool3+int8", "pool3+binary"])
@pytest.mark.parametrize("seed", [0, 1])
def test_maxsim_over_compressed_pages_equals_brute_force(setting, seed):
    generator = torch.Generator().manual_seed(seed)
    queries, pages = ragged(generator, 5, 1, 7, dim=24), ragged(generator, 9, 1, 14, dim=24)
    compressed = compress_pages(pages, setting)
    expected = brute_force_maxsim(queries, stored_pages(compressed))
    # a small budget forces many page blocks
    got = score_compressed(queries, compressed, similarity_elements=300)
    assert torch.allclose(got, expected, atol=1e-4)


def test_uncompressed_scores_equal_colquant_score():
    generator = torch.Generator().manual_seed(6)
    queries, pages = ragged(generator, 4, 2, 6, dim=16), ragged(generator, 7, 1, 10, dim=16)
    padded_queries = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True)
    got = score_compressed(padded_queries, compress_pages(pages, "none"))
    assert torch.allclose(got, score(queries, pages), atol=1e-5)


def test_binary_pages_score_float_queries_against_their_signs():
    generator = torch.Generator().manual_seed(7)
    queries, pages = ragged(generator, 3, 2, 5, dim=20), ragged(generator, 5, 2, 6, dim=20)
    signs = [torch.where(p > 0, 1.0, -1.0) for p in pages]
    assert torch.allclose(score_compressed(queries, compress_pages(pages, "binary")),
                          brute_force_maxsim(queries, signs), atol=1e-4)


def test_hamming_scoring_of_binary_queries_equals_sign_dot_products():
    generator = torch.Generator().manual_seed(8)
    queries, pages = ragged(generator, 4, 1, 6, dim=20), ragged(generator, 6, 1, 9, dim=20)
    signs = lambda items: [torch.where(x > 0, 1.0, -1.0) for x in items]  # noqa: E731
    got = score_compressed(queries, compress_pages(pages, "binary"), binary_queries=True, similarity_elements=50)
    assert torch.equal(got, brute_force_maxsim(signs(queries), signs(pages)))


def test_negative_best_matches_are_not_clamped_by_padding():
    query = [torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])]
    short = torch.zeros(2, 8)
    short[0, 0] = -1.0  # one real token, opposite to the query; the second row is padding
    long = torch.nn.functional.normalize(torch.ones(3, 8), dim=-1)
    pages = torch.nn.utils.rnn.pad_sequence([short, long], batch_first=True)
    for setting in ("none", "int8"):
        got = score_compressed(query, compress_pages(pages, setting))
        assert got[0, 0].item() == pytest.approx(-1.0, abs=1e-6)


def test_padded_query_rows_add_nothing():
    generator = torch.Generator().manual_seed(9)
    queries, pages = ragged(generator, 3, 1, 5, dim=16), ragged(generator, 4, 2, 6, dim=16)
    compressed = compress_pages(pages, "binary")
    padded = torch.nn.functional.pad(torch.nn.utils.rnn.pad_sequence(queries, batch_first=True), (0, 0, 0, 3))
    for binary_queries in (False, True):
        assert torch.allclose(score_compressed(padded, compressed, binary_queries=binary_queries),
                              score_compressed(queries, compressed, binary_queries=binary_queries), atol=1e-6)


def test_scorer_refusals_name_the_problem():
    pages = compress_pages([torch.ones(2, 8)], "int8")
    with pytest.raises(ValueError, match="embedding dims differ"):
        score_compressed([torch.ones(1, 4)], pages)
    with pytest.raises(ValueError, match="binary_queries=True scores binary pages"):
        score_compressed([torch.ones(1, 8)], pages, binary_queries=True)
    with pytest.raises(ValueError, match="no page embeddings"):
        compress_pages([], "none")


@pytest.mark.parametrize("setting", ["none", "int8", "binary", "pool2", "pool2+binary"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_page_is_refused_naming_it_as_colquant_score_does(setting, bad_value):
    """A NaN row was dropped as padding (NaN > 0 is false) and the page scored as a finite number;
    an Inf one became NaN or a finite sign. Compression refuses them as `colquant.score` does."""
    generator = torch.Generator().manual_seed(11)
    queries, pages = ragged(generator, 2, 1, 4, dim=8), ragged(generator, 3, 4, 6, dim=8)
    pages[1][2, 0] = bad_value
    with pytest.raises(ValueError, match="page item 1 contains NaN or Inf") as scored:
        score(queries, pages)
    with pytest.raises(ValueError, match="page item 1 contains NaN or Inf") as compressed:
        compress_pages(pages, setting)
    assert str(compressed.value) == str(scored.value)
    pages[1][:] = bad_value  # a whole page of them
    with pytest.raises(ValueError, match="page item 1 contains NaN or Inf"):
        compress_pages(torch.nn.utils.rnn.pad_sequence(pages, batch_first=True), setting)


def test_a_non_finite_query_is_refused_not_scored_as_padding():
    generator = torch.Generator().manual_seed(12)
    queries, pages = ragged(generator, 2, 2, 4, dim=8), compress_pages(ragged(generator, 3, 2, 5, dim=8), "int8")
    queries[1][0, 3] = float("nan")
    for binary_queries in (False, True):
        with pytest.raises(ValueError, match="query item 1 contains NaN or Inf"):
            score_compressed(queries, compress_pages(stored_pages(pages), "binary") if binary_queries else pages,
                             binary_queries=binary_queries)


@pytest.mark.parametrize("pages, refusal", [
    ([torch.ones(8)], r"page item 0 has shape \(8,\); expected \(tokens, dim\)"),
    ([torch.ones(2, 8), torch.ones(2, 4)], "page embeddings mix dimensions"),
    ([torch.ones(2, 8, dtype=torch.int64)], "page item 0 has dtype torch.int64"),
])
def test_pages_colquant_score_refuses_are_refused_by_compression_too(pages, refusal):
    """A 1-D page was stored as one token, integer pages were quantized as if embeddings."""
    with pytest.raises(ValueError, match=refusal):
        compress_pages(pages, "int8")
    with pytest.raises(ValueError, match=refusal.replace("page", "query")):
        score_compressed(pages, compress_pages([torch.ones(2, 8)], "none"))


def test_options_of_the_wrong_type_are_refused(monkeypatch):
    """`binary_queries="no"` was read as True, `protected_tokens=-1` protected all but the last vector,
    a setting that is neither a name nor a CompressionSetting failed with AttributeError."""
    pages = [torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(13)), dim=-1)]
    binary = compress_pages(pages, "binary")
    with pytest.raises(TypeError, match="binary_queries='no' is not a boolean"):
        score_compressed(pages, binary, binary_queries="no")
    with pytest.raises(ValueError, match="protected_tokens must be >= 0, got -1"):
        compress_pages(pages, "pool2", protected_tokens=-1)
    with pytest.raises(TypeError, match="setting 3 is neither a CompressionSetting nor its name"):
        compress_pages(pages, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda': this machine has no CUDA device"):
        score_compressed(pages, binary, device="cuda")


def test_a_page_with_no_real_tokens_scores_zero_in_an_index():
    """colquant.score refuses an all-padding page as bad input; an index may hold one (a blank page)
    and scores it 0, while the real pages score exactly as colquant.score does."""
    generator = torch.Generator().manual_seed(10)
    queries = ragged(generator, 2, 1, 4, dim=8)
    pages = torch.nn.utils.rnn.pad_sequence([torch.zeros(3, 8), *ragged(generator, 2, 2, 5, dim=8)], batch_first=True)
    for setting in ("none", "int8", "binary"):
        compressed = compress_pages(pages, setting)
        assert compressed.lengths[0] == 0
        assert torch.equal(score_compressed(queries, compressed)[:, 0], torch.zeros(2))
    assert torch.allclose(score_compressed(queries, compress_pages(pages, "none"))[:, 1:], score(queries, pages[1:]), atol=1e-5)


def test_an_index_of_empty_pages_scores_zero():
    pages = compress_pages(torch.zeros(3, 4, 8), "binary")
    assert pages.lengths.tolist() == [0, 0, 0]
    assert torch.equal(score_compressed([torch.ones(2, 8)], pages), torch.zeros(1, 3))
