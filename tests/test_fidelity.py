"""Fidelity metrics on the tiny model: exact agreement with itself, measurable drift under 4-bit RTN."""

import copy
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from colquant.evaluate import fidelity

QUERIES = ["revenue of Norbright Labs in 2019", "operating cost", "capex 2021", "headcount at year end"]


def fake_quantize_rtn(model: torch.nn.Module, bits: int = 4, group_size: int = 128) -> torch.nn.Module:
    """A copy whose text-tower Linear weights are round-to-nearest symmetric W4 g128: a stand-in for
    a quantized checkpoint, perturbed exactly where W4A16 perturbs the real one."""
    quantized = copy.deepcopy(model)
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in quantized.language_model.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight.float()
                groups = weight.reshape(weight.shape[0], -1, group_size)
                scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
                rounded = (groups / scale).round().clamp(-qmax - 1, qmax) * scale
                module.weight.copy_(rounded.reshape_as(weight))
    return quantized


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (128, 160, 3), dtype=np.uint8)) for _ in range(6)]


@pytest.fixture(scope="module")
def rtn_variant(tiny_model):
    model, processor = tiny_model
    return fake_quantize_rtn(model), processor


def test_encoders_drop_padding_and_return_float32(tiny_model, pages):
    model, processor = tiny_model
    queries = fidelity.encode_queries(model, processor, QUERIES, batch_size=3)
    assert [q.shape for q in queries] == [(len(text) + 10, 320) for text in QUERIES]  # byte tokenizer
    assert all(q.dtype == torch.float32 and q.device.type == "cpu" for q in queries)
    encoded = fidelity.encode_pages(model, processor, pages[:3], batch_size=2)
    assert len(encoded) == 3 and all(torch.allclose(p.norm(dim=-1), torch.ones(len(p)), atol=1e-2) for p in encoded)


def test_model_against_itself_is_perfect(tiny_model, pages):
    tables = fidelity.fidelity_report(tiny_model, {"same": tiny_model}, QUERIES, pages, batch_size=2)
    row = tables["summary"].iloc[0]
    for kind in ("query", "page"):
        assert row[f"{kind}_token_cosine_mean"] == pytest.approx(1.0, abs=1e-5)
        assert row[f"{kind}_token_cosine_min"] == pytest.approx(1.0, abs=1e-5)
        assert row[f"{kind}_mse"] == 0.0
    assert row["nan_count"] == 0 and row["inf_count"] == 0 and row["passes"]
    assert row["kendall_tau_mean"] == pytest.approx(1.0) and row["top1_agreement"] == 1.0
    assert row["top5_overlap"] == 1.0 and row["pearson"] == pytest.approx(1.0)
    assert (tables["layer_errors"]["relative_l2"] == 0).all()
    assert (tables["scores"]["bf16"] == tables["scores"]["same"]).all()
    assert len(tables["scores"]) == len(QUERIES) * len(pages)


def test_perturbed_copy_drifts_but_stays_finite(tiny_model, rtn_variant, pages):
    tables = fidelity.fidelity_report(tiny_model, {"rtn": rtn_variant}, QUERIES, pages, batch_size=4)
    summary, layers = tables["summary"], tables["layer_errors"]
    assert list(summary["variant"]) == ["rtn"]
    numeric = summary.drop(columns=["variant", "passes"]).to_numpy(dtype=float)
    assert np.isfinite(numeric).all()
    assert summary.loc[0, "query_token_cosine_mean"] < 1.0 and summary.loc[0, "page_mse"] > 0.0
    assert summary.loc[0, "nan_count"] == 0
    n_layers = len(tiny_model[0].language_model.layers)
    assert len(layers) == 2 * n_layers and (layers["relative_l2"] > 0).all()
    assert set(tables["embeddings"]["kind"]) == {"query", "page"}
    assert len(tables["token_cosine"]) == tables["embeddings"]["n_tokens"].sum()
    scores = tables["scores"]
    figures = [
        fidelity.plot_token_cosine(tables["token_cosine"]),
        fidelity.plot_layer_errors(layers),
        fidelity.plot_score_scatter(scores["bf16"], {"rtn": scores["rtn"]}),
    ]
    assert all(isinstance(figure, Figure) for figure in figures)
    for figure in figures:
        plt.close(figure)


def test_nan_and_inf_in_the_candidate_are_counted():
    reference = [torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(3)]
    candidate = [r.clone() for r in reference]
    candidate[1][2, 3] = float("nan")
    candidate[2][0, :2] = float("inf")
    result = fidelity.compare_embeddings(reference, candidate)
    assert result["nan_count"] == 1 and result["inf_count"] == 2
    assert math.isnan(result["token_cosine_mean"])  # not filtered away: the candidate is broken
    assert result["n_items"] == 3 and result["n_tokens"] == 15


def test_item_cosine_weighs_items_equally():
    reference = [torch.ones(1, 2), torch.ones(9, 2)]
    candidate = [torch.tensor([[1.0, -1.0]]), torch.ones(9, 2)]  # the one-token item is orthogonal
    result = fidelity.compare_embeddings(reference, candidate)
    assert result["item_cosine_mean"] == pytest.approx(0.5, abs=1e-6)
    assert result["token_cosine_mean"] == pytest.approx(0.9, abs=1e-6)
    assert result["item_cosine_min"] == pytest.approx(0.0, abs=1e-6)


def test_mismatched_token_sets_are_refused():
    with pytest.raises(ValueError, match="item 0"):
        fidelity.compare_embeddings([torch.ones(3, 4)], [torch.ones(4, 4)])
    with pytest.raises(ValueError, match="2 reference items"):
        fidelity.compare_embeddings([torch.ones(3, 4)] * 2, [torch.ones(3, 4)])


def test_compare_rankings_on_hand_made_scores():
    ref = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    same = fidelity.compare_rankings(ref, ref.copy(), k=2)
    assert same["kendall_tau_mean"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0 and same["top2_overlap"] == 1.0
    reversed_ = fidelity.compare_rankings(ref, -ref, k=2)
    assert reversed_["kendall_tau_mean"] == pytest.approx(-1.0) and reversed_["kendall_tau_min"] == pytest.approx(-1.0)
    assert reversed_["top1_agreement"] == 0.0 and reversed_["top2_overlap"] == 0.0
    assert reversed_["pearson"] == pytest.approx(-1.0) and reversed_["spearman"] == pytest.approx(-1.0)
    swapped = ref.copy()
    swapped[0, [1, 2]] = swapped[0, [2, 1]]  # query 0: pages 1 and 2 trade places
    partial = fidelity.compare_rankings(ref, swapped, k=2)
    assert partial["top1_agreement"] == 1.0 and partial["top2_overlap"] == 0.75
    assert partial["kendall_tau_min"] == pytest.approx(0.8)  # one discordant pair of ten
    with pytest.raises(ValueError, match="k=6"):
        fidelity.compare_rankings(ref, ref, k=6)


def test_layer_errors_has_one_row_per_decoder_layer(tiny_model, rtn_variant):
    model, processor = tiny_model
    batch = processor.process_queries(QUERIES[:2])
    same = fidelity.layer_errors(model, model, batch)
    assert list(same["layer"]) == list(range(len(model.language_model.layers)))
    assert (same["relative_l2"] == 0).all() and (same["token_relative_l2_median"] == 0).all()
    drift = fidelity.layer_errors(model, rtn_variant[0], batch)
    assert (drift["relative_l2"] > 0).all() and np.isfinite(drift.drop(columns="layer").to_numpy()).all()
