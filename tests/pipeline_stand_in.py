"""The pipeline run with stand-in notebooks: a shrunken tiny profile, and a stand-in for each notebook
that writes the results the notebook declares (or not, or is killed half way, as a test asks), so the
scheduling tests (tests/test_pipeline.py, tests/test_run_plan.py) take seconds. The fixtures that
install them (`output_root`, `stand_in`) are in conftest.py."""

import json

import yaml
from colquant.research import workspace
from colquant.research.params import load_profile
from colquant.research.pipeline import PipelineError, run


def small_profile(tmp_path, **overrides) -> str:
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["profile"] = "pipeline-test"
    profile["model"]["max_num_visual_tokens"] = 64
    profile["corpus"].update(n_pages=8, n_queries=16)
    profile["calibration"].update(seqlens=[64, 128], nsamples=2)
    profile["quantization"].update(iters=2, batch_size=2, grid=None, w4a8=True)  # the largest seqlen's
    profile["fidelity"].update(n_queries=4, n_pages=6)
    profile["sweep"].update(query_batch_sizes=[1, 2], page_batch_sizes=[1], repeats=1)
    for section, values in overrides.items():
        profile[section].update(values)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


class StandIn:
    """Replaces `pipeline._execute`: records the step and writes what the notebook declares it
    writes (or not, or is killed half way, as a test asks)."""

    def __init__(self) -> None:
        self.executed: list[str] = []
        self.parameters: list[dict] = []
        self.kill_at: str | None = None
        self.write_results = True
        self.stale: frozenset | None = None  # what the pipeline handed the report as stale

    def __call__(self, step, description):
        self.executed.append(step.key)
        self.parameters.append(step.parameters)
        step.output.write_text("{}")
        if step.key == self.kill_at:
            for path in step.caches:  # half of the recomputed results
                write_partial(path)
            raise KeyboardInterrupt  # killed while the notebook runs
        for path in step.results if self.write_results else ():
            path.parent.mkdir(parents=True, exist_ok=True)
            # notebook 02's record of the source it used (offline, the tiny profile's fallback); other
            # results name the execution that wrote them, so a re-quantized variant has new content
            path.write_text('{"source_used": "embedded"}' if path.name.startswith("calibration__")
                            else json.dumps(stand_in_metadata(path, len(self.executed)))
                            if path.name == workspace.METADATA_FILE else json.dumps({"execution": len(self.executed)}))
        for path in step.caches if self.write_results else ():  # mteb's result folders
            path.mkdir(parents=True, exist_ok=True) if not path.exists() else None
        if step.results and not self.write_results:
            raise PipelineError(f"{step.notebook} finished but did not write {step.results[0]}")


def stand_in_metadata(path, execution: int) -> dict:
    """A variant's metadata as far as the pipeline reads it (the plan it logs times quantizations by method)."""
    name = path.parent.name
    method = "rtn" if name.endswith("-rtn") else "fp8-dynamic" if name.startswith("fp8") else "autoround"
    return {"settings": {"method": method}, "wall_time_s": 1.0, "execution": execution}


def write_partial(path):
    """What a killed notebook leaves where a cached result goes: a folder or file with half of it."""
    if path.suffix:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "partial").write_text("partial")


def not_measured(profile, workload):
    """The warm-up of the plan a run prints first: stand-in notebooks run no model, so none is timed."""
    raise ValueError("stand-in notebooks: no warm-up")


def executed_after(stand_in, profile_path, **options) -> list[str]:
    stand_in.executed.clear()
    run(profile_path, **options)
    return list(stand_in.executed)


ALL = ["01_architecture", "02_calibration__seqlen64", "03_quantization__seqlen64",
       "02_calibration__seqlen128", "03_quantization__seqlen128",
       "04_embedding_fidelity", "05_vidore_eval", "06_memory_sweep", "07_index_compression", "08_frontier"]
