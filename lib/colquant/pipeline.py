"""Headless runs: execute the numbered notebooks with papermill for a profile, then write the report.

Notebooks 01-03 run once per calibration seqlen (`outputs/<profile>/<NN_name>__seqlen<N>.ipynb`);
04-07 compare every variant produced and run once. A step is skipped when its fingerprint (the
notebook's source, its parameters, the profile, and the fingerprints of the steps before it) is
unchanged and its executed notebook exists, so an interrupted run resumes where it stopped and a
finished one costs nothing to repeat.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from colquant import workspace
from colquant.params import load_profile

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = workspace.REPO_ROOT / "notebooks"
PER_SEQLEN = ("01_architecture", "02_calibration", "03_quantization")
ACROSS_VARIANTS = ("04_embedding_fidelity", "05_vidore_eval", "06_memory_sweep", "07_index_compression")
STATE_FILE = "pipeline_state.json"


class PipelineError(RuntimeError):
    """A notebook failed; the message names it and where its executed copy (with the error) is."""


@dataclass(frozen=True)
class Step:
    notebook: str
    parameters: dict[str, Any]
    output: Path

    @property
    def key(self) -> str:
        return self.output.stem


def plan(profile_path: Path, profile: dict[str, Any]) -> list[Step]:
    """The notebooks to execute for this profile, in order."""
    out = workspace.output_dir(profile)
    relative = _relative_to_root(profile_path)
    steps = [
        Step(name, {"profile_path": relative, "seqlen": seqlen}, out / f"{name}__seqlen{seqlen}.ipynb")
        for seqlen in profile["calibration"]["seqlens"]
        for name in PER_SEQLEN
    ]
    steps += [Step(name, {"profile_path": relative}, out / f"{name}.ipynb") for name in ACROSS_VARIANTS]
    return steps


def _relative_to_root(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(workspace.REPO_ROOT))
    except ValueError:
        return str(path)


def fingerprint(step: Step, profile: dict[str, Any], previous: str) -> str:
    digest = hashlib.sha256()
    digest.update((NOTEBOOKS_DIR / f"{step.notebook}.ipynb").read_bytes())
    digest.update(json.dumps([step.parameters, profile, previous], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def run(
    profile_path: str | Path, *, force: bool = False, notebooks: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """Execute the profile's notebooks (skipping unchanged finished ones), then write REPORT.md.

    `notebooks` restricts the run to some of them by number (e.g. ("01", "02", "03", "06") on a
    machine without mteb); the others are neither run nor forgotten.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from colquant.reporting import write_report

    profile_path = workspace.resolve(profile_path)
    profile = load_profile(profile_path)
    out = workspace.output_dir(profile)
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    summary, previous = [], ""
    for step in tqdm(plan(profile_path, profile), desc=f"pipeline {profile['profile']}"):
        previous = fingerprint(step, profile, previous)
        if notebooks is not None and step.notebook[:2] not in notebooks:
            summary.append({"step": step.key, "status": "not selected"})
            continue
        if not force and state.get(step.key) == previous and step.output.exists():
            summary.append({"step": step.key, "status": "skipped (unchanged)"})
            continue
        state.pop(step.key, None)
        try:
            papermill.execute_notebook(
                str(NOTEBOOKS_DIR / f"{step.notebook}.ipynb"),
                str(step.output),
                parameters=step.parameters,
                cwd=str(workspace.REPO_ROOT),
                progress_bar=False,
            )
        except PapermillExecutionError as error:
            workspace.write_json(state_path, state)
            raise PipelineError(
                f"{step.notebook} failed ({error.ename}: {error.evalue}); the executed notebook with the "
                f"failing cell is {step.output}"
            ) from error
        state[step.key] = previous
        workspace.write_json(state_path, state)
        summary.append({"step": step.key, "status": "executed"})
    report = write_report(profile)
    summary.append({"step": "REPORT.md", "status": str(report)})
    return summary


def refresh_committed_notebooks(profile_path: str | Path = "params/tiny.yaml") -> list[Path]:
    """Execute notebooks/*.ipynb in place, in order, against a fresh output directory.

    The committed notebooks are the regression reference nbval compares with (`make test`), so
    they must be produced exactly as nbval will re-run them: default parameters, a clean slate.
    """
    import os
    import tempfile

    import papermill

    executed = []
    with tempfile.TemporaryDirectory(prefix="colquant-notebooks-") as scratch:
        os.environ[workspace.OUTPUT_ROOT_ENV] = scratch
        try:
            for notebook in sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
                papermill.execute_notebook(
                    str(notebook), str(notebook), parameters={"profile_path": str(profile_path)},
                    cwd=str(NOTEBOOKS_DIR), progress_bar=False,
                )
                executed.append(notebook)
        finally:
            os.environ.pop(workspace.OUTPUT_ROOT_ENV, None)
    return executed
