from colquant.retriever.architecture import (
    PackedCost,
    linear_inventory,
    meta_model,
    parameter_table,
    predicted_sizes,
    w4a16_coverage,
)
from colquant.retriever.model import ColQwen3Config


def test_4b_inventory_matches_the_published_split():
    model = meta_model(ColQwen3Config.colqwen3_4b())
    table = parameter_table(model).set_index("component")["params"]
    assert table["language model (decoder Linear)"] == 36 * (2 * 2560 * 4096 + 2 * 2560 * 1024 + 3 * 2560 * 9728)
    assert table["token embeddings"] == 151936 * 2560
    inventory = linear_inventory(model)
    assert inventory["w4a16_lm_only"].sum() == 36 * 7
    assert 0.81 < w4a16_coverage(model) < 0.83


def test_packed_cost_and_predicted_sizes_are_consistent():
    assert PackedCost().bytes_per_weight() == 0.5 + 2.5 / 128
    sizes = predicted_sizes(meta_model(ColQwen3Config.colqwen3_4b())).set_index("scheme")
    assert sizes.loc["BF16", "vs_bf16"] == 1.0
    assert sizes.loc["W4A16 (+ vision tower)", "GiB"] < sizes.loc["W4A16 (language model)", "GiB"] < sizes.loc["BF16", "GiB"]
