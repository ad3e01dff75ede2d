import pytest
import torch

import colquant
from colquant.retriever.scoring import score


def brute_force_maxsim(queries: list[torch.Tensor], pages: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(len(queries), len(pages))
    for qi, q in enumerate(queries):
        for pi, p in enumerate(pages):
            out[qi, pi] = sum(max(float(q_tok @ p_tok) for p_tok in p) for q_tok in q)
    return out


def colpali_reference(queries: list[torch.Tensor], pages: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """colpali-engine's score_multi_vector rule, written from its description: queries and pages
    zero-padded per group of `batch_size`, similarity over all rows, plain max, sum."""
    rows = []
    for i in range(0, len(queries), batch_size):
        q = torch.nn.utils.rnn.pad_sequence(queries[i : i + batch_size], batch_first=True)
        blocks = []
        for j in range(0, len(pages), batch_size):
            p = torch.nn.utils.rnn.pad_sequence(pages[j : j + batch_size], batch_first=True)
            blocks.append(torch.stack([torch.stack([(qq @ pp.T).max(dim=1).values.sum() for pp in p]) for qq in q]))
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows, dim=0)


def ragged(generator: torch.Generator, count: int, low: int, high: int, dim: int = 8) -> list[torch.Tensor]:
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1) for n in lengths]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_elements", [1, 50, 1 << 24])
def test_exact_maxsim_equals_brute_force_on_ragged_inputs(seed, block_elements):
    generator = torch.Generator().manual_seed(seed)
    queries, pages = ragged(generator, 5, 1, 7), ragged(generator, 9, 1, 12)
    expected = brute_force_maxsim(queries, pages)
    assert torch.allclose(score(queries, pages, block_elements=block_elements), expected, atol=1e-5)


def test_exact_is_the_default_and_zero_padding_does_not_clamp_negative_best_matches():
    query = [torch.tensor([[1.0, 0.0]])]
    page = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])  # one real token (opposite), one padding row
    assert score(query, page).item() == pytest.approx(-1.0)
    assert colquant.score is score


def test_colpali_mode_floors_a_padded_pages_best_match_at_zero():
    query = [torch.tensor([[1.0, 0.0]])]
    page = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])
    assert score(query, page, mode="colpali").item() == pytest.approx(0.0)
    unpadded = torch.tensor([[[-1.0, 0.0], [-0.5, 0.5]]])  # no padding row: nothing to floor
    assert score(query, unpadded, mode="colpali").item() == pytest.approx(-0.5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch_size", [1, 3, 128])
def test_colpali_mode_matches_colpali_engine_on_lists(seed, batch_size):
    generator = torch.Generator().manual_seed(seed)
    queries, pages = ragged(generator, 6, 1, 7), ragged(generator, 11, 1, 12)
    expected = colpali_reference(queries, pages, batch_size)
    got = score(queries, pages, mode="colpali", colpali_batch_size=batch_size, block_elements=40)
    assert torch.allclose(got, expected, atol=1e-5)
    # groups of one page carry no padding, so only there the two modes agree
    assert torch.allclose(got, score(queries, pages), atol=1e-3) == (batch_size == 1)


def test_colpali_mode_pads_a_list_of_more_than_128_pages_in_groups_of_128_by_default():
    generator = torch.Generator().manual_seed(6)
    queries = [q.abs() for q in ragged(generator, 2, 4, 8)]
    # a second group narrower than the first, whose tokens oppose every query token (best matches < 0)
    pages = ragged(generator, 128, 10, 13) + [-page.abs() for page in (ragged(generator, 1, 3, 4) + ragged(generator, 1, 4, 5))]
    got = score(queries, pages, mode="colpali")
    assert torch.allclose(got, colpali_reference(queries, pages, batch_size=128), atol=1e-5)
    assert (got[:, 128] == 0).all() and (got[:, 129] < 0).all()  # floored only below its own group's width


def test_colpali_mode_on_a_padded_tensor_maxes_over_its_zero_rows_like_mteb():
    generator = torch.Generator().manual_seed(4)
    queries, pages = ragged(generator, 4, 2, 6), ragged(generator, 7, 3, 9)
    padded_pages = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)
    expected = colpali_reference(queries, [page for page in padded_pages], batch_size=128)
    assert torch.allclose(score(queries, padded_pages, mode="colpali"), expected, atol=1e-5)


def test_padded_tensor_numpy_and_list_inputs_agree_in_exact_mode():
    generator = torch.Generator().manual_seed(3)
    queries, pages = ragged(generator, 4, 2, 6), ragged(generator, 6, 3, 9)
    padded_pages = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)
    expected = score(queries, pages)
    assert torch.allclose(expected, score(queries, padded_pages), atol=1e-6)
    assert torch.allclose(expected, score([q.numpy() for q in queries], padded_pages.numpy()), atol=1e-6)


def test_bfloat16_inputs_are_scored_in_float32():
    generator = torch.Generator().manual_seed(5)
    queries, pages = ragged(generator, 3, 2, 5), ragged(generator, 4, 2, 6)
    got = score([q.bfloat16() for q in queries], [p.bfloat16() for p in pages])
    assert got.dtype == torch.float32
    assert torch.allclose(got, brute_force_maxsim(queries, pages), atol=5e-2)


def test_dimension_mismatch_is_reported_with_both_dims():
    with pytest.raises(ValueError, match="queries have dim 4, pages have dim 5"):
        score([torch.ones(2, 4)], [torch.ones(3, 5)])


def test_mixed_dimensions_within_one_side_are_named():
    with pytest.raises(ValueError, match=r"page embeddings mix dimensions: dim 4 \(first at item 0\), dim 6 \(first at item 1\)"):
        score([torch.ones(2, 4)], [torch.ones(3, 4), torch.ones(3, 6)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["query", "page"])
def test_non_finite_embeddings_raise(bad, side):
    queries, pages = [torch.ones(2, 4)], [torch.ones(3, 4), torch.ones(2, 4)]
    (queries if side == "query" else pages)[-1][0, 1] = bad
    index = 0 if side == "query" else 1
    with pytest.raises(ValueError, match=f"{side} item {index} contains NaN or Inf"):
        score(queries, pages)


@pytest.mark.parametrize(
    "queries, pages, message",
    [
        ([], [torch.ones(2, 4)], "no query embeddings to score"),
        ([torch.ones(2, 4)], [], "no page embeddings to score"),
        (torch.ones(0, 3, 4), [torch.ones(2, 4)], "no query embeddings to score"),
        (None, [torch.ones(2, 4)], "no query embeddings to score"),
        ([torch.ones(2, 4)], [torch.zeros(3, 4)], "page item 0 has no non-zero token vectors"),
        ([torch.ones(0, 4)], [torch.ones(3, 4)], "query item 0 has no non-zero token vectors"),
        ([torch.ones(4)], [torch.ones(3, 4)], r"query item 0 has shape \(4,\)"),
        (torch.ones(2, 4), [torch.ones(3, 4)], r"query embeddings must be \(items, tokens, dim\)"),
        ([torch.ones(2, 4, dtype=torch.long)], [torch.ones(3, 4)], "must be floating point"),
    ],
    ids=["no-queries", "no-pages", "empty-tensor", "none", "all-zero-page", "zero-token-query", "1d-item",
         "2d-tensor", "integer"],
)
def test_bad_inputs_raise_clear_errors(queries, pages, message):
    with pytest.raises(ValueError, match=message):
        score(queries, pages)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode='maxsim'.*'exact'.*'colpali'"):
        score([torch.ones(2, 4)], [torch.ones(3, 4)], mode="maxsim")


def test_progress_bar_is_shown_on_request_and_hidden_for_small_inputs(capsys):
    generator = torch.Generator().manual_seed(6)
    queries, pages = ragged(generator, 3, 2, 5), ragged(generator, 20, 2, 6)
    score(queries, pages)
    assert "MaxSim" not in capsys.readouterr().err
    score(queries, pages, block_elements=30, show_progress_bar=True)
    assert "MaxSim over page blocks" in capsys.readouterr().err


def test_model_outputs_that_require_grad_are_scored_without_gradient():
    generator = torch.Generator().manual_seed(7)
    queries, pages = ragged(generator, 2, 2, 5), ragged(generator, 3, 2, 6)
    got = score([q.clone().requires_grad_() for q in queries], pages)
    assert not got.requires_grad
    assert torch.allclose(got, brute_force_maxsim(queries, pages), atol=1e-5)


@pytest.mark.parametrize("option, value, error, message", [
    ("show_progress_bar", "no", TypeError, "show_progress_bar='no' is not a boolean: pass True or False, or None"),
    ("colpali_batch_size", True, TypeError, r"colpali_batch_size must be an int >= 1, got True \(bool\)"),
    ("colpali_batch_size", 2.5, TypeError, "colpali_batch_size must be an int >= 1, got 2.5"),
    ("block_elements", 100.5, TypeError, "block_elements must be an int >= 1, got 100.5"),
    ("block_elements", 0, ValueError, "block_elements must be >= 1, got 0"),
])
def test_options_of_the_wrong_type_are_refused(option, value, error, message):
    """`show_progress_bar="no"` showed a bar, `block_elements=100.5` and `colpali_batch_size=True` were used as given."""
    items = [torch.ones(2, 4)]
    with pytest.raises(error, match=message):
        score(items, items, **{option: value})


def test_a_cuda_device_without_a_gpu_is_refused_naming_the_fix(monkeypatch):
    """It raised torch's AssertionError "Torch not compiled with CUDA enabled"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda': this machine has no CUDA device"):
        score([torch.ones(2, 4)], [torch.ones(2, 4)], device="cuda")
