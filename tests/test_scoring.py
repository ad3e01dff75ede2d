import pytest
import torch

from colquant.scoring import score


def brute_force_maxsim(queries: list[torch.Tensor], pages: list[torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(len(queries), len(pages))
    for qi, q in enumerate(queries):
        for pi, p in enumerate(pages):
            out[qi, pi] = sum(max(float(q_tok @ p_tok) for p_tok in p) for q_tok in q)
    return out


def ragged(generator: torch.Generator, count: int, low: int, high: int, dim: int = 8) -> list[torch.Tensor]:
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1) for n in lengths]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maxsim_equals_brute_force_on_ragged_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    queries, pages = ragged(generator, 5, 1, 7), ragged(generator, 9, 1, 12)
    expected = brute_force_maxsim(queries, pages)
    assert torch.allclose(score(queries, pages, page_batch_size=4, query_batch_size=2), expected, atol=1e-5)


def test_zero_padding_does_not_clamp_negative_best_matches():
    query = [torch.tensor([[1.0, 0.0]])]
    page = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]])  # one real token (opposite), one padding row
    assert score(query, page).item() == pytest.approx(-1.0)


def test_padded_tensor_and_list_inputs_agree():
    generator = torch.Generator().manual_seed(3)
    queries, pages = ragged(generator, 4, 2, 6), ragged(generator, 6, 3, 9)
    padded_pages = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)
    assert torch.allclose(score(queries, pages), score(queries, padded_pages), atol=1e-6)


def test_dimension_mismatch_is_reported():
    with pytest.raises(ValueError, match="embedding dims differ"):
        score([torch.ones(2, 4)], [torch.ones(3, 5)])
