import json

import pandas as pd
import pytest

from colquant import reporting, workspace
from colquant.params import load_profile
from colquant.quantization import METADATA_FILE, model_card


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
