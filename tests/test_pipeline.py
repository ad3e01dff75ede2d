"""The papermill pipeline end to end on a shrunken tiny profile (about a minute on 2 cores)."""

import json

import pytest
import yaml

from colquant import workspace
from colquant.params import load_profile
from colquant.pipeline import PipelineError, plan, run


def small_profile(tmp_path, **overrides) -> str:
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["profile"] = "pipeline-test"
    profile["model"]["max_num_visual_tokens"] = 64
    profile["corpus"].update(n_pages=8, n_queries=16)
    profile["calibration"].update(seqlens=[64, 128], nsamples=2)
    profile["quantization"].update(iters=2, batch_size=2)
    profile["fidelity"].update(n_queries=4, n_pages=6)
    profile["sweep"].update(query_batch_sizes=[1, 2], page_batch_sizes=[1], repeats=1)
    for section, values in overrides.items():
        profile[section].update(values)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


@pytest.fixture
def output_root(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return tmp_path / "outputs" / "pipeline-test"


def test_pipeline_runs_from_clean_outputs_then_skips_everything(tmp_path, output_root):
    profile_path = small_profile(tmp_path)
    first = run(profile_path)
    executed = [row["step"] for row in first if row["status"] == "executed"]
    assert executed == [step.key for step in plan(workspace.resolve(profile_path), load_profile(profile_path))]
    for seqlen in (64, 128):
        for name in ("01_architecture", "02_calibration", "03_quantization"):
            assert (output_root / f"{name}__seqlen{seqlen}.ipynb").exists()
    variants = sorted(p.name for p in (output_root / "variants").iterdir())
    assert variants == [
        "w4a16-g128-sym-embedded-seqlen128-iters2",  # offline, the profile's embedded fallback was used
        "w4a16-g128-sym-embedded-seqlen64-iters2",
        "w4a16-g128-sym-rtn",
    ]
    report = (output_root / "REPORT.md").read_text()
    assert "random weights" in report and "No " not in report.split("## Plots")[0]
    second = run(profile_path)
    assert {row["status"] for row in second[:-1]} == {"skipped (unchanged)"}


def test_changed_parameter_reruns_that_step_and_everything_after(tmp_path, output_root):
    run(small_profile(tmp_path), notebooks=("01",))
    state_before = json.loads((output_root / "pipeline_state.json").read_text())
    again = run(small_profile(tmp_path, calibration={"nsamples": 3}), notebooks=("01",))
    assert [row["status"] for row in again if row["step"].startswith("01_")] == ["executed", "executed"]
    assert json.loads((output_root / "pipeline_state.json").read_text()) != state_before


def test_failing_notebook_names_itself_and_its_executed_copy(tmp_path, output_root):
    profile_path = small_profile(tmp_path, model={"id": "nobody/no-such-model"})
    with pytest.raises(PipelineError, match=r"(?s)01_architecture failed \(CheckpointError: .*hf download nobody/no-such-model.*01_architecture__seqlen64\.ipynb"):
        run(profile_path)
