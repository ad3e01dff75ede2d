"""What a profile's variants cost before they run: counts by stage, and the time estimate's sources."""

import json

import pytest

from colquant.research import grid_plan, workspace
from colquant.research.params import load_profile


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    return load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")


def test_the_plan_counts_every_run_the_grid_implies(tiny):
    plan = grid_plan.grid_plan(tiny, reference=({}, "")).set_index("stage")
    # auto-round: 3 seqlens + the grid's W3 (its W4 g128 is the seqlen-512 one); RTN: the seeds' W4 (the tiny grid
    # has none); 1 AutoScheme; 2 FP8
    assert plan["runs"].tolist()[:4] == [4, 1, 1, 2] and plan["on disk"].sum() == 0
    tasks, settings = len(tiny["evaluation"]["tasks"]), len(tiny["compression"]["settings"])
    # 05: the seeds' 7 variants (3 auto-round, RTN, 2 FP8, the W4A8 run, which quantizes nothing), BF16 twice (also
    # scored the other way); 07: those 7, the grid's 2 points and BF16
    assert plan.loc["evaluate: 05 (variant x task)", "runs"] == (7 + 1 + 1) * tasks
    assert plan.loc["evaluate: 07 (variant x index setting x task)", "runs"] == (9 + 1) * settings * tasks
    assert plan["estimated s"].isna().all() and set(plan["seconds from"]) == {"not measured yet"}
    text = grid_plan.describe_plan(plan.reset_index())
    evaluations = 9 * tasks + 60 * tasks
    assert text.startswith(f"The profile implies 8 quantizations (0 already on disk) and {evaluations} evaluations")
    assert "no estimate yet" in text


def test_the_estimate_uses_the_profiles_reference_run(tiny, tmp_path):
    """benchmarks/frontier_grid.py's JSON, as the device run writes it, times the stages it measured."""
    rows = [{"stage": grid_plan.STAGES[0], "quantize_s": 10.0}, {"stage": grid_plan.STAGES[0], "quantize_s": 14.0},
            {"stage": grid_plan.STAGES[1], "quantize_s": 2.0}]
    (tmp_path / "frontier-grid-tiny.json").write_text(json.dumps(
        {"device": "a 2-core CPU", "quantization": {"iters": 20}, "rows": rows}))
    reference = grid_plan.reference_seconds(tiny, tmp_path)
    assert reference == ({grid_plan.STAGES[0]: 12.0, grid_plan.STAGES[1]: 2.0}, "a 2-core CPU, tiny, iters 20")
    plan = grid_plan.grid_plan(tiny, reference=reference).set_index("stage")
    assert plan.loc[grid_plan.STAGES[0], "estimated s"] == 48.0 and plan.loc[grid_plan.STAGES[1], "estimated s"] == 2.0
    assert plan.loc[grid_plan.STAGES[0], "seconds from"] == "reference: a 2-core CPU, tiny, iters 20"
    text = grid_plan.describe_plan(plan.reset_index())
    assert "estimated 0.8 min for what is left (not counting quantize: AutoScheme" in text
    assert grid_plan.reference_seconds(tiny, tmp_path / "absent") == ({}, "")
    real = {"profile": "colqwen3-4b"}  # timed by its synthetic twin's runs, here in two parts
    for part, part_rows in (("rtn-autoscheme", rows[2:]), ("autoround", rows[:1])):
        (tmp_path / f"frontier-grid-synthetic-4b-{part}.json").write_text(json.dumps(
            {"device": "NVIDIA H200", "quantization": {"iters": 200}, "rows": part_rows}))
    assert grid_plan.reference_seconds(real, tmp_path) == (
        {grid_plan.STAGES[0]: 10.0, grid_plan.STAGES[1]: 2.0}, "NVIDIA H200, synthetic-4b, iters 200")
    (tmp_path / "frontier-grid-synthetic-4bx.json").write_text("not this profile's")  # another profile's name
    assert grid_plan.reference_seconds(real, tmp_path)[0] == {grid_plan.STAGES[0]: 10.0, grid_plan.STAGES[1]: 2.0}


def test_quantizations_on_disk_are_counted_and_time_the_estimate(tiny):
    name = workspace.expected_variants(tiny)[0]
    metadata = workspace.variants_dir(tiny) / name / workspace.METADATA_FILE
    metadata.parent.mkdir(parents=True)
    metadata.write_text(json.dumps({"settings": {"method": "autoround"}, "wall_time_s": 30.0}))
    plan = grid_plan.grid_plan(tiny, reference=({grid_plan.STAGES[0]: 1.0}, "elsewhere")).set_index("stage")
    row = plan.loc[grid_plan.STAGES[0]]
    assert (row["on disk"], row["to run"], row["s per run"], row["estimated s"], row["seconds from"]) == \
        (1, 3, 30.0, 90.0, "measured here")
