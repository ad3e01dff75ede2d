"""`colquant run --plan`: the steps a run would execute (its step list is what the run then executes),
the work each does, the caches it reuses and an estimated time; it runs and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_stand_in import ALL, executed_after, small_profile

from colquant.__main__ import main
from colquant.evaluate.task_sizes import task_sizes
from colquant.research import workspace
from colquant.research.params import load_profile
from colquant.research.run_plan import CONDITIONAL, DONE, RUNS, duration, make_plan


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")} if root.exists() else {}


def test_plan_runs_nothing_and_writes_nothing_yet_times_the_model(tmp_path, output_root, capsys):
    """A fresh output root stays empty: no lock, no base model, no corpus; the warm-up runs in memory."""
    profile_path = small_profile(tmp_path)
    assert main(["run", profile_path, "--plan"]) == 0
    printed = capsys.readouterr().out
    assert not output_root.parent.exists() or snapshot(output_root.parent) == {}
    assert "01_architecture" in printed and "07_index_compression" in printed
    assert "Estimated wall time:" in printed and "measured on cpu" in printed


def test_the_plans_step_list_is_what_the_run_executes(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    assert make_plan(profile_path).executed == executed_after(stand_in, profile_path) == ALL
    before = snapshot(output_root)
    nothing = make_plan(profile_path)
    assert snapshot(output_root) == before  # planning a finished run writes nothing either
    assert {step.status for step in nothing.steps} == {DONE} and executed_after(stand_in, profile_path) == []

    changed = small_profile(tmp_path, sweep={"repeats": 2})
    assert make_plan(changed).executed == executed_after(stand_in, changed) == ["06_memory_sweep"]
    forced = {"force": True, "notebooks": ("04", "05")}
    assert make_plan(changed, **forced).executed == executed_after(stand_in, changed, **forced) == [
        "04_embedding_fidelity", "05_vidore_eval"]
    overridden = {"overrides": ["sweep.repeats=3"]}
    assert make_plan(changed, **overridden).executed == executed_after(stand_in, changed, **overridden)


def test_a_new_variant_reruns_the_comparisons_and_a_rerun_03_may(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    variant = next(iter(workspace.quantized_variants(load_profile(profile_path)).values()))
    (variant / workspace.METADATA_FILE).unlink()  # 03 makes it again: 04-07 compare a new checkpoint
    planned = make_plan(profile_path)
    assert planned.executed == executed_after(stand_in, profile_path)
    assert planned.executed[-4:] == ALL[-4:] and "new variants" in planned.steps[2].why + planned.steps[4].why

    (output_root / "results" / "quantization__seqlen64.json").unlink()  # 03 runs, its variants exist
    planned = make_plan(profile_path)
    statuses = {step.key: step.status for step in planned.steps}
    assert statuses["03_quantization__seqlen64"] == RUNS and statuses["05_vidore_eval"] == CONDITIONAL
    executed = executed_after(stand_in, profile_path)  # stand-in 03 rewrites the variants: they change
    assert set(planned.executed) <= set(executed) <= {key for key, status in statuses.items() if status != DONE}


def test_a_quantization_costs_its_methods_measured_seconds_once_one_is_timed(tmp_path, stand_in):
    """One plan, one estimate: before any variant exists auto-round's text tokens time it; once this output
    directory holds finished variants of a method, their median wall time does (`grid_plan`)."""
    profile_path = small_profile(tmp_path)
    steps = {step.key: step for step in make_plan(profile_path, measure=False).steps}
    first = steps["03_quantization__seqlen64"]
    assert first.text_tokens > 0 and first.timed_s == 0.0
    # seqlen 128 makes its auto-round variant and its W4A8 run, which tunes nothing: one variant's tokens
    assert steps["03_quantization__seqlen128"].text_tokens == 2 * first.text_tokens  # twice the seqlen

    executed_after(stand_in, profile_path)  # every variant's metadata records 1 s (pipeline_stand_in)
    variants = workspace.quantized_variants(load_profile(profile_path))
    seqlen64 = next(path for name, path in variants.items() if "seqlen64" in name)
    (seqlen64 / workspace.METADATA_FILE).unlink()
    again = {step.key: step for step in make_plan(profile_path, measure=False).steps}["03_quantization__seqlen64"]
    assert again.status == RUNS and again.text_tokens == 0 and again.timed_s == 1.0
    assert "measured on this output directory's variants" in again.why


def test_the_evaluation_counts_pages_once_per_variant_and_07_reads_what_05_stores(tmp_path, stand_in):
    profile_path = small_profile(tmp_path)
    steps = {step.key: step for step in make_plan(profile_path, measure=False).steps}
    variants = 1 + len(workspace.expected_variants(load_profile(profile_path)))
    assert steps["05_vidore_eval"].pages == variants * 8 and steps["05_vidore_eval"].queries == variants * 16
    # BF16, the W4A16 variants and fp8-lm share one vision tower; fp8-all has its own
    assert steps["05_vidore_eval"].vision_pages == 2 * 8
    assert steps["07_index_compression"].pages == 0  # 05 stored every page earlier in the same run
    only_07 = {step.key: step for step in make_plan(profile_path, notebooks=("07",), measure=False).steps}
    assert only_07["07_index_compression"].pages == variants * 8


def test_the_real_studys_task_statistics_come_from_mteb_offline():
    """The README's count of the real study (22 English ViDoRe tasks), from mteb's task statistics."""
    profile = load_profile(workspace.REPO_ROOT / "params" / "colqwen3-4b.yaml", check_device=False)
    sizes = task_sizes(profile)
    assert len({size.task for size in sizes}) == 22
    assert (sum(size.pages for size in sizes), sum(size.queries for size in sizes)) == (30_525, 6_617)
    arxiv = next(size for size in sizes if size.task == "VidoreArxivQARetrieval")
    assert (arxiv.pages, arxiv.queries, arxiv.subset) == (500, 500, "default")


@pytest.mark.parametrize(("seconds", "shown"), [(42, "42 s"), (600, "10 min"), (5 * 3600 + 20 * 60, "5 h 20 min")])
def test_durations_read_as_a_person_would_say_them(seconds, shown):
    assert duration(seconds) == shown
