import json

import pandas as pd
import pytest

from colquant.evaluate import metrics
from colquant.quantize.cards import model_card
from colquant.research import reporting, workspace
from colquant.research.params import load_profile
from colquant.retriever.checkpoint_files import METADATA_FILE, REPORTED_RESULTS_FILE, read_reported_results


@pytest.fixture
def profile(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["profile"] = "report-test"
    return profile


def fake_variant(profile, name: str, seqlen: int = 64) -> dict:
    """A variant directory with metadata as quantization writes it (weights are not needed here)."""
    directory = workspace.variants_dir(profile) / name
    directory.mkdir(parents=True)
    metadata = {
        "variant": name, "base_model": "embedded-tiny", "random_weights": True, "quantized_layers": 28,
        "settings": {"method": "autoround", "bits": 4, "group_size": 128, "sym": True, "iters": 2, "batch_size": 2, "seed": 0},
        "calibration": {"source": "pile-10k", "source_used": "embedded", "nsamples": 2, "seqlen": seqlen},
        "wall_time_s": 1.0, "peak_memory_bytes": 2**20, "memory_kind": "process_rss", "size_on_disk_bytes": 2**20,
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    (directory / "README.md").write_text(model_card(metadata))
    return metadata


def test_report_marks_missing_sections_and_random_weights(profile):
    report = reporting.write_report(profile).read_text()
    assert "random weights" in report
    assert "No mteb results yet" in report and "No sweep results yet" in report


def test_later_results_reach_the_model_card_and_the_metadata_is_never_rewritten(profile):
    profile["calibration"]["seqlens"] = [64]
    w4 = workspace.autoround_variant(profile, 64)
    fake_variant(profile, w4)
    metadata_before = (workspace.variants_dir(profile) / w4 / METADATA_FILE).read_bytes()
    results = workspace.results_dir(profile)
    workspace.write_csv(results / "fidelity_summary.csv", pd.DataFrame(
        [{"variant": w4, "query_token_cosine_mean": 0.98, "page_token_cosine_mean": 0.99, "top5_overlap": 0.9}]))
    workspace.write_csv(results / "ndcg.csv", pd.DataFrame(
        [{"task": "T", "variant": w4, "ndcg_at_5": 0.5}, {"task": "T", "variant": "bf16", "ndcg_at_5": 0.6}]))
    reporting.write_report(profile)
    card = (workspace.variants_dir(profile) / w4 / "README.md").read_text()
    assert "| top-5 page overlap with BF16 | 0.9 |" in card
    assert "| NDCG@5, mean of 1 tasks | 0.5 |" in card
    assert (workspace.variants_dir(profile) / w4 / METADATA_FILE).read_bytes() == metadata_before


def test_a_seqlen_removed_from_the_profile_leaves_the_report(profile):
    profile["calibration"]["seqlens"] = [64, 128]
    runs = {seqlen: fake_variant(profile, workspace.autoround_variant(profile, seqlen), seqlen) for seqlen in (64, 128)}
    for seqlen, run in runs.items():
        workspace.write_json(workspace.results_dir(profile) / f"quantization__seqlen{seqlen}.json", [run])
    assert workspace.autoround_variant(profile, 128) in reporting.write_report(profile).read_text()
    profile["calibration"]["seqlens"] = [64]
    report = reporting.write_report(profile).read_text()
    assert workspace.autoround_variant(profile, 64) in report and workspace.autoround_variant(profile, 128) not in report


def test_a_corrupt_metadata_file_is_reported_by_path_not_as_a_bare_json_error(profile):
    profile["calibration"]["seqlens"] = [64]
    fake_variant(profile, workspace.autoround_variant(profile, 64))
    (workspace.variants_dir(profile) / workspace.autoround_variant(profile, 64) / METADATA_FILE).write_text("")
    with pytest.raises(workspace.OutputError, match=rf"{workspace.autoround_variant(profile, 64)}/{METADATA_FILE} is empty; delete the folder"):
        reporting.write_report(profile)


W4_256, W4_1024, RTN = ("w4a16-g128-sym-pile10k-seqlen256-iters200", "w4a16-g128-sym-pile10k-seqlen1024-iters200",
                        "w4a16-g128-sym-rtn")


def recorded(tmp_path, ndcg, memory=None, speed=None):
    """A synthetic metrics set, written and read back as the notebooks and the report do."""
    metrics.record(tmp_path, metrics.NDCG_AT_5, ndcg)
    metrics.record(tmp_path, metrics.TASKS_EVALUATED, {name: 22 for name in ndcg})
    if memory is not None:
        metrics.record(tmp_path, metrics.REFERENCE_BATCH, {"page": 8})
        metrics.record(tmp_path, metrics.PEAK_MEMORY_MIB, {(name, "page"): value for name, value in memory.items()})
        metrics.record(tmp_path, metrics.ITEMS_PER_S, {(name, "page"): value for name, value in speed.items()})
    return metrics.read(tmp_path)


def test_the_headline_picks_the_best_variant_within_tolerance_and_states_its_costs(tmp_path):
    text = reporting.headline(recorded(
        tmp_path, {"bf16": 0.80, W4_256: 0.79, W4_1024: 0.792, RTN: 0.75},
        memory={"bf16": 9000, W4_256: 4000, W4_1024: 4000, RTN: 4000}, speed={"bf16": 10, W4_256: 5, W4_1024: 5, RTN: 6}))
    assert text.startswith(f"Use **`{W4_1024}`**: its mean NDCG@5 over 22 tasks is 0.7920 against BF16's 0.8000 (-1.00%)")
    assert "peaks at 4,000 MiB against BF16's 9,000 MiB (0.44×, 56% less)" in text
    assert "5 pages/s against BF16's 10 (0.50×, 50% slower)" in text
    assert text.count(". ") + text.endswith(".") == 3


def test_the_headline_names_the_device_and_a_w4a8_runs_cpu_reference(tmp_path):
    """A speed is quoted with the machine it was measured on; W4A8 on a CPU ran the kernel's reference."""
    w4a8 = "w4a8-g128-sym-pile10k-seqlen1024-iters200"
    cpu = "cpu (2 cores, 2 torch threads)"
    text = reporting.headline(recorded(tmp_path, {"bf16": 0.80, w4a8: 0.795, RTN: 0.75},
                                       memory={"bf16": 9000, w4a8: 4000, RTN: 4000}, speed={"bf16": 10, w4a8: 2, RTN: 6}),
                              devices={(w4a8, "page"): cpu, ("bf16", "page"): cpu})
    assert (f"Encoding pages at batch 8 on {cpu} (W4A8's dequantized reference on CPU: its arithmetic, not its "
            "kernel's speed or memory), it peaks") in text
    gpu = reporting.headline(recorded(tmp_path, {"bf16": 0.80, w4a8: 0.795}, memory={"bf16": 9000, w4a8: 4000},
                                      speed={"bf16": 10, w4a8: 16}), devices={(w4a8, "page"): "NVIDIA H200"})
    assert "on NVIDIA H200, it peaks" in gpu and "dequantized reference" not in gpu


def test_the_headline_keeps_bf16_when_every_variant_loses_too_much(tmp_path):
    text = reporting.headline(recorded(tmp_path, {"bf16": 0.80, W4_256: 0.70, RTN: 0.60}))
    assert text.startswith("Keep **BF16** where quality decides") and f"the closest, `{W4_256}`, scores 0.7000 (-12.50%)" in text
    assert "not measured yet: run `notebooks/06_memory_sweep.ipynb`" in text


def test_a_nan_score_is_never_a_pass_and_missing_scores_give_no_recommendation(tmp_path):
    text = reporting.headline(recorded(tmp_path, {"bf16": 0.80, W4_256: float("nan"), RTN: 0.70}))
    assert W4_256 not in text and "Keep **BF16**" in text
    assert reporting.headline(recorded(tmp_path, {"bf16": 0.8, W4_256: float("nan")})).startswith(
        "No recommendation yet: mean NDCG@5 is missing for every quantized variant")
    assert reporting.headline(recorded(tmp_path, {"bf16": float("nan"), W4_256: 0.8})).startswith(
        "No recommendation yet: mean NDCG@5 is missing for BF16")
    assert reporting.headline({}).startswith("No recommendation yet")


def test_the_report_opens_with_the_headline_and_orders_variants_bf16_seqlen_baselines(profile):
    results = workspace.results_dir(profile)
    recorded(results, {"bf16": 0.8, W4_256: 0.79, "fp8-lm": 0.8, RTN: 0.7, W4_1024: 0.78})
    pd.DataFrame([{"variant": name, "query_token_cosine_mean": 0.98, "page_token_cosine_mean": float("nan"),
                   "top5_overlap": 0.9, "passes": False} for name in ("fp8-lm", RTN, W4_1024, W4_256)]).to_csv(
        results / "fidelity_summary.csv", index=False)
    report = reporting.write_report(profile).read_text()
    assert report.index("## Headline") < report.index("## Model")
    assert "Use **`fp8-lm`**" in report
    fidelity = report[report.index("## Embedding fidelity"):]
    header = fidelity.splitlines()[2]
    assert [header.index(name) for name in (W4_256, W4_1024, RTN, "fp8-lm")] == sorted(
        header.index(name) for name in (W4_256, W4_1024, RTN, "fp8-lm"))
    assert "| page_token_cosine_mean  | –" in fidelity and "nan" not in fidelity.lower()


def test_table_cells_format_integers_and_never_show_nan():
    frame = pd.DataFrame({"params": [3633315840, 819520], "share": [0.8186, 4.4e-05], "GiB": [8.2676, float("nan")],
                          "passes": [True, False]})
    table = reporting._table(frame)
    assert "3,633,315,840" in table and "819,520" in table and "0.8186" in table and "–" in table
    assert "e+" not in table and "nan" not in table


def test_the_budget_table_collapses_to_one_row_per_budget_with_the_best_choice_per_precision():
    rows = []
    for budget, fits in ((8, {"bf16": None, W4_256: (8, 5.0), RTN: (16, 6.0)}), (80, {"bf16": (32, 9.0), W4_256: (64, 7.0), RTN: (64, 6.5)})):
        for name, fit in fits.items():
            rows.append({"budget_gb": budget, "variant": name, "kind": "page", "fit": "fits" if fit else "does not fit",
                         "batch_size": fit[0] if fit else pd.NA, "items_per_s": fit[1] if fit else float("nan")})
    collapsed = reporting.collapse_budgets(pd.DataFrame(rows))["page"]
    assert collapsed.columns.tolist() == ["budget (GB)", "BF16", "W4A16"]
    assert collapsed["BF16"].tolist() == ["does not fit", "`bf16` · batch 32 · 9/s"]
    assert collapsed["W4A16"].tolist() == [f"`{RTN}` · batch 16 · 6/s", f"`{W4_256}` · batch 64 · 7/s"]
    same = pd.DataFrame([{**row, "budget_gb": budget} for budget in (8, 12, 16) for row in rows if row["budget_gb"] == 80])
    assert reporting.collapse_budgets(same)["page"]["budget (GB)"].tolist() == ["8–16"]


def test_stale_results_leave_the_report_and_the_model_card(profile):
    """After a partial run re-quantized a variant (`--notebooks 02,03 --set calibration.nsamples=4`),
    the numbers of the weights it replaced are shown nowhere: not in REPORT.md, its headline or
    plots, nor in the variant's card or reported results."""
    profile["calibration"]["seqlens"] = [64]
    w4 = workspace.autoround_variant(profile, 64)
    fake_variant(profile, w4)
    results = workspace.results_dir(profile)
    recorded(results, {"bf16": 0.6125, w4: 0.5125})
    workspace.write_csv(results / "fidelity_summary.csv", pd.DataFrame(
        [{"variant": w4, "query_token_cosine_mean": 0.9875, "page_token_cosine_mean": 0.99, "top5_overlap": 0.9}]))
    workspace.write_csv(results / "ndcg.csv", pd.DataFrame(
        [{"task": "T", "variant": w4, "ndcg_at_5": 0.5125}, {"task": "T", "variant": "bf16", "ndcg_at_5": 0.6125}]))
    workspace.plots_dir(profile).joinpath("05_ndcg.png").write_bytes(b"png")
    card = workspace.variants_dir(profile) / w4 / "README.md"
    reporting.write_report(profile)
    assert "0.5125" in card.read_text()  # fresh: published
    report = reporting.write_report(profile, stale=frozenset({"04_embedding_fidelity", "05_vidore_eval"})).read_text()
    assert "0.5125" not in report and "0.9875" not in report and "05_ndcg" not in report
    assert "Stale: the results of `notebooks/05_vidore_eval.ipynb`" in report and "colquant run report-test" in report
    assert "0.5125" not in card.read_text() and "0.9875" not in card.read_text()
    assert read_reported_results(card.parent) == {}


def test_reported_results_name_the_weights_they_were_measured_on(profile, tmp_path):
    from colquant.quantize.cards import update_model_card

    profile["calibration"]["seqlens"] = [64]
    fake_variant(profile, workspace.autoround_variant(profile, 64))
    variant = workspace.variants_dir(profile) / workspace.autoround_variant(profile, 64)
    (variant / "model-00001-of-00001.safetensors").write_bytes(b"weights")
    update_model_card(variant, {"NDCG@5, mean of 1 tasks": 0.5})
    assert read_reported_results(variant) == {"NDCG@5, mean of 1 tasks": 0.5}
    (variant / "model-00001-of-00001.safetensors").write_bytes(b"other weights")  # re-quantized in place
    with pytest.raises(workspace.OutputError, match=r"results of other weights .* stale; recompute them with `colquant run"):
        read_reported_results(variant)
    (variant / REPORTED_RESULTS_FILE).write_text('{"NDCG@5, mean of 1 tasks": 0.5}')  # unbound
    with pytest.raises(workspace.OutputError, match="does not say which weights"):
        read_reported_results(variant)


def test_the_headline_names_the_frontiers_best_pair_per_budget_and_corpus_size(profile):
    """Notebook 08's picks become a budget x corpus-size table under the headline; a budget nothing fits says so."""
    results = workspace.results_dir(profile)
    picks = {(12.0, 10_000, W4_256, "pool3"): 0.81, (12.0, 1_000_000, "fp8-lm", "pool3+binary"): 0.74,
             (80.0, 10_000, "bf16", "none"): 0.83, (80.0, 1_000_000, W4_256, "int8"): 0.80}
    metrics.record(results, metrics.FRONTIER_PICK_NDCG, picks)
    metrics.record(results, metrics.FRONTIER_PICK_GIB, {key: 9.5 for key in picks})
    text = reporting.frontier_headline(metrics.read(results), {"memory_budgets_gb": [8.0, 12.0, 80.0],
                                                              "corpus_pages": [10_000, 1_000_000]})
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "GiB" in line}
    assert list(rows) == ["8 GiB", "12 GiB", "80 GiB"]
    assert rows["8 GiB"].count("nothing fits") == 2
    assert f"`{W4_256}` + `pool3` index: NDCG@5 0.8100, 9.5 GiB" in rows["12 GiB"]
    assert "`fp8-lm` + `pool3+binary` index: NDCG@5 0.7400" in rows["12 GiB"] and "`bf16` + `none`" in rows["80 GiB"]
    assert "10,000 pages" in text and "1,000,000 pages" in text
    assert reporting.frontier_headline({}, profile["frontier"]).startswith("The quality-memory frontier is not computed yet")
    report = reporting.write_report(profile).read_text()
    headline = report[report.index("## Headline"):report.index("## Model")]
    assert "NDCG@5 0.8100" in headline and "No frontier yet: run `notebooks/08_frontier.ipynb`" in report
