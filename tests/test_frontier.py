"""The quality-memory frontier: totals, Pareto front and budget picks on hand-made tables, measured model
bytes, and each projection's own error (notebook 08's sensitivity)."""

import copy

import pandas as pd
import pytest
import torch

import colquant
from colquant.evaluate import fidelity
from colquant.research import frontier, workspace
from colquant.research.frontier import GIB
from colquant.research.params import load_profile


def table(rows, pages=1000):
    """A frontier table by hand: (variant, setting, NDCG@5, total GiB)."""
    return pd.DataFrame([{"variant": v, "setting": s, "ndcg_at_5": n, "total_bytes": t * GIB, "pages": pages}
                         for v, s, n, t in rows])


def test_the_pareto_front_keeps_exactly_the_pairs_nothing_beats():
    grid = table([
        ("bf16", "none", 0.90, 10.0),    # best quality: on the front
        ("w4", "none", 0.89, 4.0),       # on the front
        ("w4", "int8", 0.89, 5.0),       # same NDCG as w4/none for more bytes: dominated
        ("w3", "binary", 0.70, 1.0),     # smallest: on the front
        ("w3", "pool3", 0.69, 2.0),      # worse and larger than w3/binary: dominated
        ("w2", "none", 0.80, 4.0),       # same bytes as w4/none, worse: dominated
        ("fp8", "pool2", 0.85, 3.0),     # between: on the front
    ])
    front = frontier.pareto_front(grid)
    assert list(zip(front["variant"], front["setting"])) == [("w3", "binary"), ("fp8", "pool2"), ("w4", "none"),
                                                             ("bf16", "none")]


def test_the_front_is_computed_per_corpus_size():
    grid = pd.concat([table([("a", "none", 0.9, 1.0), ("b", "none", 0.8, 2.0)], pages=10),
                      table([("a", "none", 0.9, 3.0), ("b", "none", 0.8, 2.0)], pages=1000)])
    front = frontier.pareto_front(grid)
    assert front[front["pages"] == 10]["variant"].tolist() == ["a"]
    assert front[front["pages"] == 1000]["variant"].tolist() == ["b", "a"]


def test_each_budget_gets_the_best_pair_that_fits_and_says_when_none_does():
    grid = table([
        ("bf16", "none", 0.90, 20.0),
        ("w4", "none", 0.88, 9.0),
        ("w4", "int8", 0.88, 7.5),    # ties w4/none on quality: the smaller one is picked
        ("w3", "binary", 0.70, 6.0),
    ])
    picks = frontier.recommendations(grid, [4, 8, 12, 24]).set_index("budget_gb")
    assert picks.loc[4, "fit"] == frontier.NOTHING_FITS and picks.loc[4, "smallest_total_gib"] == pytest.approx(6.0)
    assert pd.isna(picks.loc[4, "variant"])
    assert (picks.loc[8, "variant"], picks.loc[8, "setting"]) == ("w4", "int8")
    assert (picks.loc[12, "variant"], picks.loc[12, "setting"]) == ("w4", "int8")
    assert (picks.loc[24, "variant"], picks.loc[24, "ndcg_at_5"]) == ("bf16", 0.90)
    assert picks.loc[8, "total_bytes"] == 7.5 * GIB


def test_total_bytes_are_the_model_plus_the_index_of_each_corpus_size():
    compression = pd.DataFrame([{"variant": "w4", "setting": "binary", "ndcg_at_5": 0.5, "bytes_per_page": 1000.0},
                                {"variant": "bf16", "setting": "none", "ndcg_at_5": 0.6, "bytes_per_page": 8000.0}])
    grid = frontier.frontier_table(compression, {"w4": 2e9, "bf16": 8e9}, [10, 1_000_000])
    big = grid[grid["pages"] == 1_000_000].set_index("variant")
    assert big.loc["w4", "total_bytes"] == 2e9 + 1e9 and big.loc["bf16", "index_bytes"] == 8e9
    assert len(grid) == 4
    with pytest.raises(ValueError, match=r"no measured model bytes for \['bf16'\]"):
        frontier.frontier_table(compression, {"w4": 2e9}, [10])


def test_tensor_bytes_count_a_shared_storage_once():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied, as Qwen3-VL's head and embeddings
    model = torch.nn.ModuleList([embedding, head])
    model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    assert frontier.tensor_bytes(model) == 10 * 4 * 4 + 3 * 8


def test_model_bytes_are_measured_on_the_loaded_variant(tiny_path, tiny_w4a16_path, tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    bf16, w4 = (frontier.measure_model_bytes(profile, path) for path in (tiny_path, tiny_w4a16_path))
    loaded, _ = colquant.load(tiny_w4a16_path, accelerate=False)
    assert w4["model_bytes"] == frontier.tensor_bytes(loaded) and w4["device"] == "cpu" and w4["allocated_bytes"] is None
    packed = sum(module.qweight.numel() * 4 for module in loaded.modules() if hasattr(module, "qweight"))
    assert 0 < bf16["model_bytes"] - w4["model_bytes"] < 4 * packed  # the decoder Linears got ~4x smaller


@torch.no_grad()
def test_a_projections_own_error_is_zero_for_the_same_weights_and_named_per_layer(tiny_model, tiny_w4a16):
    model, processor = tiny_model
    batch = processor.process_queries(["what was the revenue?", "who signed the report?"])
    same = fidelity.projection_errors(model, copy.deepcopy(model), batch)
    layers = len(model.language_model.layers)
    assert len(same) == layers * 7 and set(same["projection"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"}
    assert (same["relative_l2"] == 0).all() and sorted(same["layer"].unique()) == list(range(layers))
    quantized = fidelity.projection_errors(model, tiny_w4a16[0], batch)
    assert (quantized["relative_l2"] > 0).all() and (quantized["relative_l2"] < 0.5).all()
