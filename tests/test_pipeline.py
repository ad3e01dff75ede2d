"""The papermill pipeline: end to end on a shrunken tiny profile (minutes on 2 shared cores), and its
scheduling (what runs, what is skipped, what survives a kill) with each notebook replaced by a
stand-in that writes the notebook's declared results, so those tests take seconds."""

import json

import nbformat
import pytest
import yaml
from pipeline_stand_in import ALL, executed_after, small_profile, stand_in_metadata, write_partial

from colquant.basics.files import discard
from colquant.research import pipeline, workspace
from colquant.research.params import ProfileError, load_profile
from colquant.research.pipeline import PipelineError, plan, run
from colquant.retriever.checkpoint_files import METADATA_FILE, REPORTED_RESULTS_FILE


@pytest.mark.end_to_end
def test_pipeline_runs_from_clean_outputs_then_skips_everything(tmp_path, output_root):
    profile_path = small_profile(tmp_path)
    first = run(profile_path)
    executed = [row["step"] for row in first if row["status"] == "executed"]
    assert executed == [step.key for step in plan(workspace.resolve(profile_path), load_profile(profile_path))]
    assert (output_root / "01_architecture.ipynb").exists()  # once: the model does not depend on the seqlen
    for seqlen in (64, 128):
        for name in ("02_calibration", "03_quantization"):
            assert (output_root / f"{name}__seqlen{seqlen}.ipynb").exists()
    variants = sorted(p.name for p in (output_root / "variants").iterdir())
    assert variants == [
        "fp8-all",  # W8A8 FP8 (quantization.fp8: [lm, all]), made once: no calibration
        "fp8-lm",
        "w4a16-g128-sym-embedded-seqlen128-iters2",  # offline, the profile's embedded fallback was used
        "w4a16-g128-sym-embedded-seqlen64-iters2",
        "w4a16-g128-sym-rtn",
        "w4a8-g128-sym-embedded-seqlen128-iters2",  # the seqlen-128 checkpoint run as W4A8 (quantization.w4a8)
    ]
    report = (output_root / "REPORT.md").read_text()
    assert "random weights" in report and "No " not in report.split("## Plots")[0]
    second = run(profile_path)
    assert {row["status"] for row in second[:-1]} == {"skipped (unchanged)"}


def test_changed_parameter_reruns_that_step(tmp_path, output_root):
    run(small_profile(tmp_path), notebooks=("01",))
    state_before = json.loads((output_root / "pipeline_state.json").read_text())
    again = run(small_profile(tmp_path, model={"max_num_visual_tokens": 32}), notebooks=("01",))
    assert [row["status"] for row in again if row["step"].startswith("01_")] == ["executed"]
    assert json.loads((output_root / "pipeline_state.json").read_text()) != state_before


def test_failing_notebook_names_itself_and_its_executed_copy(tmp_path, output_root):
    profile_path = small_profile(tmp_path, model={"id": "nobody/no-such-model"})
    with pytest.raises(PipelineError, match=r"(?s)01_architecture failed \(CheckpointError: .*hf download nobody/no-such-model.*01_architecture\.ipynb"):
        run(profile_path)


# --------------------------------------------------------------------------------------------
# Scheduling, with stand-in notebooks (tests/pipeline_stand_in.py; fixtures in conftest.py)


def test_sweep_repeats_reruns_only_the_sweep_and_recomputes_its_rows(tmp_path, stand_in, output_root):
    assert executed_after(stand_in, small_profile(tmp_path)) == ALL
    assert executed_after(stand_in, small_profile(tmp_path)) == []
    assert executed_after(stand_in, small_profile(tmp_path, sweep={"repeats": 2})) == ["06_memory_sweep"]


def test_deleting_a_result_file_reruns_its_step(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    (output_root / "results" / "ndcg_table.csv").unlink()
    assert executed_after(stand_in, profile_path) == ["05_vidore_eval"]


def test_a_step_killed_during_a_forced_rerun_is_not_later_skipped(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    stand_in.kill_at = "04_embedding_fidelity"
    with pytest.raises(KeyboardInterrupt):
        executed_after(stand_in, profile_path, force=True)
    stand_in.kill_at = None
    assert executed_after(stand_in, profile_path) == ["04_embedding_fidelity"]  # 05, 06 finished before


def test_a_notebook_that_did_not_write_its_results_is_not_recorded_as_done(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    stand_in.write_results = False
    with pytest.raises(PipelineError, match="did not write"):
        run(profile_path)
    stand_in.write_results = True
    assert executed_after(stand_in, profile_path) == ALL


def test_force_recomputes_cached_results(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    mteb_result = output_root / "mteb" / "results" / "old.json"
    mteb_result.parent.mkdir(parents=True)
    mteb_result.write_text("{}")
    (output_root / "results" / "sweep.jsonl").write_text('{"old": "row"}\n')
    assert executed_after(stand_in, profile_path, force=True, notebooks=("05", "06")) == ["05_vidore_eval", "06_memory_sweep"]
    assert not mteb_result.exists() and (output_root / "results" / "sweep.jsonl").read_text() != '{"old": "row"}\n'


def test_removing_a_seqlen_reruns_the_comparisons_without_its_variant(tmp_path, stand_in, output_root):
    executed_after(stand_in, small_profile(tmp_path))
    profile_path = small_profile(tmp_path, calibration={"seqlens": [64]})
    # 64 is now the largest seqlen: its step runs again to make the W4A8 run (quantization.w4a8) of its checkpoint
    assert executed_after(stand_in, profile_path) == ["03_quantization__seqlen64", "04_embedding_fidelity",
                                                   "05_vidore_eval", "06_memory_sweep", "07_index_compression",
                                                   "08_frontier"]
    profile = load_profile(profile_path)
    assert workspace.autoround_variant(profile, 128) not in workspace.quantized_variants(profile)
    assert workspace.w4a8_variant(profile, 128) not in workspace.quantized_variants(profile)
    assert workspace.w4a8_variant(profile, 64) in workspace.quantized_variants(profile)


def test_a_second_run_on_the_same_outputs_is_refused_naming_the_holder(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    output_root.mkdir(parents=True)
    with workspace.output_lock(output_root):
        with pytest.raises(workspace.OutputLockedError, match=r"in use by another run \(pid \d+ on .*started"):
            run(profile_path)
    assert stand_in.executed == []


def test_staging_folders_of_an_interrupted_save_are_removed_on_the_next_run(tmp_path, stand_in, output_root):
    staging = output_root / "variants" / ".w4a16-g128-sym-rtn.ab12cd34"
    staging.mkdir(parents=True)
    run(small_profile(tmp_path), notebooks=("01",))
    assert not staging.exists()


def test_a_profile_named_like_a_path_writes_nothing_outside_the_output_root(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    profile = yaml.safe_load(open(profile_path))
    profile["profile"] = "../../etc"
    (tmp_path / "escape.yaml").write_text(yaml.safe_dump(profile))
    before = sorted(p.name for p in tmp_path.iterdir())
    # The profile check refuses it first; workspace.output_dir refuses it again for callers that
    # build a profile dict by hand (tests/test_workspace.py).
    with pytest.raises(ProfileError, match="a profile name is a plain name"):
        run(tmp_path / "escape.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and stand_in.executed == []


def test_notebooks_run_without_kernel_noise_and_name_themselves_in_the_progress(tmp_path, monkeypatch, capfd):
    """A real papermill run of a two-cell notebook: IPC transport, no interrupt at shutdown."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell("seqlen = 0", metadata={"tags": ["parameters"]}),
                      nbformat.v4.new_code_cell("import time\ntime.sleep(0.5)\nprint(seqlen)")]
    nbformat.write(notebook, tmp_path / "02_calibration.ipynb")
    monkeypatch.setattr(pipeline, "NOTEBOOKS_DIR", tmp_path)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    step = pipeline.Step("02_calibration", {"seqlen": 7}, tmp_path / "out.ipynb", (), (), ())
    pipeline._execute(step, "2/9 02_calibration__seqlen7")
    captured = capfd.readouterr()
    assert "without encryption" not in captured.err and "KeyboardInterrupt" not in captured.err
    assert "2/9 02_calibration__seqlen7: 100%" in captured.err
    assert "7" in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0]["text"]


def test_the_command_line_reports_a_held_output_dir_in_one_line_after_waiting(tmp_path, stand_in, output_root, capsys):
    from colquant.__main__ import main

    profile_path = small_profile(tmp_path)
    output_root.mkdir(parents=True)
    with workspace.output_lock(output_root):
        assert main(["run", profile_path, "--wait", "0.3"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("colquant run: ") and "is in use by another run" in error and error.count("\n") == 1


def test_the_w4a8_run_is_made_by_its_seqlens_quantization_step(tmp_path, stand_in, output_root):
    steps = {step.key: step for step in plan(workspace.resolve(small_profile(tmp_path)), load_profile(small_profile(tmp_path)))}
    w4a8 = output_root / "variants" / "w4a8-g128-sym-pile10k-seqlen128-iters2" / workspace.METADATA_FILE
    assert w4a8 in steps["03_quantization__seqlen128"].results and w4a8 not in steps["03_quantization__seqlen64"].results
    off = plan(workspace.resolve(small_profile(tmp_path, quantization={"w4a8": False})),
               load_profile(small_profile(tmp_path, quantization={"w4a8": False})))
    assert not any(path.parent.name.startswith("w4a8-") for step in off for path in step.results)


def test_notebook_01_runs_once_per_profile_without_a_seqlen(tmp_path, stand_in, output_root):
    steps = plan(workspace.resolve(small_profile(tmp_path)), load_profile(small_profile(tmp_path)))
    architecture = [step for step in steps if step.notebook == "01_architecture"]
    assert len(architecture) == 1 and "seqlen" not in architecture[0].parameters
    assert architecture[0].output == output_root / "01_architecture.ipynb"
    assert executed_after(stand_in, small_profile(tmp_path)) == ALL
    assert executed_after(stand_in, small_profile(tmp_path, calibration={"seqlens": [64, 128, 256]})) == [
        "02_calibration__seqlen256", "03_quantization__seqlen256", "04_embedding_fidelity", "05_vidore_eval",
        "06_memory_sweep", "07_index_compression", "08_frontier"]  # a new seqlen leaves 01 alone


def test_overrides_reach_the_notebooks_and_rerun_only_what_they_change(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    stand_in.parameters.clear()
    assert executed_after(stand_in, profile_path, overrides=["sweep.repeats=3"]) == ["06_memory_sweep"]
    written = output_root / pipeline.OVERRIDDEN_PROFILE
    assert stand_in.parameters == [{"profile_path": str(written)}]  # what the notebook loads
    assert load_profile(written) == load_profile(profile_path, overrides=["sweep.repeats=3"])
    assert load_profile(written)["sweep"]["repeats"] == 3


def test_a_bad_override_on_the_command_line_is_one_line_naming_the_nearest_key(tmp_path, stand_in, output_root, capsys):
    from colquant.__main__ import main

    assert main(["run", small_profile(tmp_path), "--set", "quantization.iterz=50"]) == 2
    error = capsys.readouterr().err
    assert "quantization.iterz is not a known key; did you mean 'iters'?" in error and error.count("\n") == 1
    assert stand_in.executed == []


def steps_by_notebook(profile_path) -> dict:
    return {step.key: step for step in plan(workspace.resolve(profile_path), load_profile(profile_path))}


def test_notebooks_05_and_07_cache_their_mteb_results_in_folders_of_their_own():
    """The plan's caches are where the notebooks write: a --force of one replaces its results only."""
    sources = {name: (pipeline.NOTEBOOKS_DIR / f"{name}.ipynb").read_text() for name in ("05_vidore_eval", "07_index_compression")}
    assert "workspace.mteb_dir(profile)" in sources["05_vidore_eval"]
    assert "workspace.index_mteb_dir(profile)" in sources["07_index_compression"]
    assert "workspace.mteb_dir(profile)" not in sources["07_index_compression"]


def test_forcing_05_keeps_07s_results_and_a_step_whose_results_vanish_runs_again(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    steps = steps_by_notebook(profile_path)
    evaluation, index = steps["05_vidore_eval"].caches, steps["07_index_compression"].caches
    shared = {workspace.embeddings_dir(load_profile(profile_path))}  # the embeddings both read and write
    assert set(evaluation) & set(index) == shared
    evaluation, index = [p for p in evaluation if p not in shared], [p for p in index if p not in shared]
    assert index and not {folder for folder in index for other in evaluation if other in (folder, *folder.parents)}
    index_result = index[0] / "results" / "tiny-bf16__index-pool3" / "task.json"
    index_result.parent.mkdir(parents=True)
    index_result.write_text('{"ndcg_at_5": 0.5}')
    assert executed_after(stand_in, profile_path, force=True, notebooks=("05",)) == ["05_vidore_eval"]
    assert index_result.read_text() == '{"ndcg_at_5": 0.5}'
    assert executed_after(stand_in, profile_path) == []
    discard(index[0])  # its mteb results are gone: 07 is not done any more
    assert executed_after(stand_in, profile_path) == ["07_index_compression"]


def test_a_forced_run_recomputes_the_embeddings_05_and_07_share_once(tmp_path, stand_in, output_root, monkeypatch):
    """Forced, 05 recomputes the embedding cache; 07, after it in the same run, reuses what 05 just
    wrote instead of setting it aside and encoding every variant again."""
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    embeddings = workspace.embeddings_dir(load_profile(profile_path))
    (embeddings / "before-force").write_text("old entry")

    def writing_entries(step, description):
        stand_in(step, description)
        if step.notebook == "05_vidore_eval":
            (embeddings / "written-by-05").write_text("new entry")

    monkeypatch.setattr(pipeline, "_execute", writing_entries)
    run(profile_path, force=True)
    assert sorted(path.name for path in embeddings.iterdir()) == ["written-by-05"]


def finish_old_results(output_root, profile_path) -> dict:
    """Finished variants with the results the report recorded in them, and finished sweep rows."""
    old = {}
    for variant in workspace.quantized_variants(load_profile(profile_path)).values():
        (variant / REPORTED_RESULTS_FILE).write_text('{"NDCG@5": 0.61}')
        old[variant / REPORTED_RESULTS_FILE] = '{"NDCG@5": 0.61}'
    (output_root / "results" / "sweep.jsonl").write_text('{"variant": "bf16", "batch_size": 1}\n')
    old[output_root / "results" / "sweep.jsonl"] = '{"variant": "bf16", "batch_size": 1}\n'
    return old


@pytest.mark.parametrize("killed", ["03_quantization__seqlen64", "06_memory_sweep"])
def test_a_forced_step_killed_part_way_keeps_the_results_it_was_to_replace(tmp_path, stand_in, output_root, killed):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    old = finish_old_results(output_root, profile_path)
    stand_in.kill_at = killed
    with pytest.raises(KeyboardInterrupt):
        run(profile_path, force=True, notebooks=(killed[:2],))
    assert {path: path.read_text() for path in old} == old
    assert not list(output_root.rglob(f"*{pipeline.SET_ASIDE}"))
    stand_in.kill_at = None
    assert executed_after(stand_in, profile_path)[0] == killed  # not done: it did not finish


def test_results_a_hard_killed_forced_run_set_aside_are_put_back_by_the_next_run(tmp_path, stand_in, output_root):
    """SIGKILL gives the forced step no chance to put its results back; the next run does."""
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    old = finish_old_results(output_root, profile_path)
    variant = next(iter(workspace.quantized_variants(load_profile(profile_path)).values()))
    for path in (variant, output_root / "results" / "sweep.jsonl"):  # as _execute_replacing leaves them
        path.rename(path.with_name(f".{path.name}{pipeline.SET_ASIDE}"))
        write_partial(path)
    run(profile_path, notebooks=("01",))
    assert {path: path.read_text() for path in old} == old and not (variant / "partial").exists()
    assert not list(output_root.rglob(f"*{pipeline.SET_ASIDE}"))


def test_a_forced_step_that_finishes_replaces_its_results(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    old = finish_old_results(output_root, profile_path)
    run(profile_path, force=True, notebooks=("03", "06"))
    assert all(not path.exists() or path.read_text() != text for path, text in old.items())
    assert not [p for p in output_root.rglob(".*") if p.name != workspace.LOCK_FILE]  # nothing set aside or staged


COMPARISONS = ["04_embedding_fidelity", "05_vidore_eval", "06_memory_sweep", "07_index_compression", "08_frontier"]


def test_re_quantized_variants_make_the_comparisons_stale_until_they_run_again(tmp_path, stand_in, output_root):
    """`--force --notebooks 03` re-quantizes under the same names: 04-07's numbers are of weights
    that no longer exist, so the report is told they are stale, and the next run recomputes them."""
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    assert stand_in.stale == frozenset()
    summary = run(profile_path, force=True, notebooks=("03",))
    assert stand_in.stale == frozenset(COMPARISONS)
    assert all("stale" in row["status"] for row in summary if row["step"] in COMPARISONS)
    assert executed_after(stand_in, profile_path) == COMPARISONS and stand_in.stale == frozenset()


def test_a_partial_run_with_other_calibration_settings_marks_everything_after_it_stale(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    run(profile_path, notebooks=("02", "03"), overrides=["calibration.nsamples=4"])
    assert stand_in.stale == frozenset(COMPARISONS)
    run(profile_path, notebooks=("05",))  # back to the file's settings: 02-03 (nsamples=2) are stale now
    assert stand_in.stale == frozenset({"02_calibration", "03_quantization", *COMPARISONS})


def test_notebook_numbers_are_read_without_their_leading_zero_and_unknown_ones_refused(tmp_path, stand_in, output_root):
    profile_path = small_profile(tmp_path)
    assert executed_after(stand_in, profile_path, notebooks=("1",)) == ["01_architecture"]
    for selection in (("9",), ("04", ""), ("x",)):
        with pytest.raises(PipelineError, match=r"is not a notebook number; choose from 01,02,03,04,05,06,07,08"):
            run(profile_path, notebooks=selection)


def test_a_deleted_fp8_variant_makes_its_quantization_step_run_again(tmp_path, stand_in, output_root):
    """FP8 variants are 03's outputs like the others: gone, 03 is not done (and --force remakes them)."""
    profile_path = small_profile(tmp_path)
    executed_after(stand_in, profile_path)
    discard(output_root / "variants" / "fp8-lm")
    assert "03_quantization__seqlen64" in executed_after(stand_in, profile_path)
    assert (output_root / "variants" / "fp8-lm" / METADATA_FILE).exists()


GRID = {"seqlen": 64, "bits": [3], "rtn": False}


def test_the_grid_is_made_at_its_seqlen_and_only_07_and_08_compare_it(tmp_path, stand_in, output_root):
    """A grid point is 03's output at the grid's seqlen; other weights under its name re-run the frontier
    (07, 08), not 04-06, which compare the seeds' variants."""
    profile_path = small_profile(tmp_path, quantization={"grid": GRID})
    steps = {step.key: step for step in plan(workspace.resolve(profile_path), load_profile(profile_path))}
    assert output_root / "variants" / "w3a16-g128-sym-pile10k-seqlen64-iters2" in steps["03_quantization__seqlen64"].caches
    assert all("w3a16" not in str(path) for path in steps["03_quantization__seqlen128"].caches)
    assert executed_after(stand_in, profile_path) == ALL
    profile = load_profile(profile_path)

    def fingerprints():
        done: dict[str, str] = {}
        for step in plan(workspace.resolve(profile_path), profile):
            done[step.key] = pipeline.fingerprint(step, profile, done)
        return done

    before = fingerprints()
    (output_root / "variants" / "w3a16-g128-sym-embedded-seqlen64-iters2" / METADATA_FILE).write_text(
        json.dumps(stand_in_metadata(output_root / "variants" / "w3a16-g128-sym-embedded-seqlen64-iters2", 99)))
    after = fingerprints()
    assert [key for key in before if before[key] != after[key]] == ["07_index_compression", "08_frontier"]
