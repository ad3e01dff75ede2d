"""Headless runs: execute the numbered notebooks with papermill for a profile, then write the report.

Notebook 01 describes the model and runs once; 02-03 run once per calibration seqlen
(`outputs/<profile>/<NN_name>__seqlen<N>.ipynb`, the frontier's weight grid made by the run of its
seqlen); 04-08 compare every variant the profile produces and run once (08 reads 07's grid too).
A step is skipped only when its fingerprint is the one recorded when it last *finished* and every
result it declares exists. The fingerprint covers the notebook's source, its
parameters, the profile sections it reads, the fingerprints of the steps whose outputs it reads
and, for 04-08, the content fingerprints of the variants they compare, so a change re-runs exactly
the steps it affects (e.g. `sweep.repeats` re-runs only 06) and re-quantized weights re-run 04-08.
A step left out of a partial run whose results no longer match is *stale*: REPORT.md and the
variants' cards show none of its numbers, only the command that recomputes them. A
step's record is removed before it runs, so a run killed half way never leaves a step that looks
finished. `--force` recomputes a step's cached results without losing them: they are set aside
(`.<name>.before-force`) while it runs, put back if it fails or is killed (at once, or by the next
run), and deleted only once it has finished with their successors. One run at a time holds the
output directory. Command-line overrides
(`--set quantization.iters=50`) reach the notebooks as the validated profile written to
`outputs/<profile>/profile.yaml`, which they then read in place of the file.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from colquant.basics.files import discard, remove_stale_staging
from colquant.research import workspace
from colquant.research.params import load_profile
from colquant.research.steps import (NOTEBOOKS_DIR, STATE_FILE, PipelineError, Step, finished, fingerprint, notebook_numbers, plan,
                                     read_state, stale_steps)

log = logging.getLogger(__name__)
# papermill waits 60 s for a kernel to start; on a busy 2-core machine (CI running tests side by side)
# a kernel importing torch took longer, and the run failed with "Kernel didn't respond in 60 seconds"
KERNEL_START_TIMEOUT_S = 600

OVERRIDDEN_PROFILE = "profile.yaml"  # the profile with the command line's --set applied, as notebooks read it
NOTEBOOK_DEFAULT_PROFILE = "params/tiny.yaml"  # what every notebook's `parameters` cell sets
SET_ASIDE = ".before-force"  # `.<name>.before-force`: a forced step's previous results while it runs


@functools.cache
def quiet_kernel_manager() -> type:
    """The notebooks' kernel manager class, without the noise of a normal run at its source.

    IPC sockets instead of TCP (the kernel warns that TCP carries code unencrypted), and no SIGINT
    to a kernel that is being shut down after its notebook finished (jupyter_client interrupts
    before asking it to exit, and the idle kernel logs "KeyboardInterrupt caught in kernel").
    Made on first use, so that planning a run (`colquant.research.run_plan`) needs no Jupyter installed.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class QuietKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    return QuietKernelManager


def run(
    profile_path: str | Path, *, overrides: Sequence[str] = (), force: bool = False,
    notebooks: tuple[str, ...] | None = None, wait_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Execute the profile's notebooks (skipping unchanged finished ones), then write REPORT.md.

    `notebooks` restricts the run to some of them by number (e.g. ("01", "02", "03", "06") on a
    machine without mteb); the others are neither run nor forgotten. `force` re-runs the selected
    steps and recomputes their cached results (mteb results, sweep rows, quantized variants).
    A second run on the same output directory waits up to `wait_s` seconds, then refuses.
    `overrides` (`KEY.PATH=VALUE`) change the profile's settings for this run, validated as the file is.
    The run's first lines are its plan (`colquant.research.run_plan`: steps, work, reused caches, estimated time).
    """
    from colquant.research.reporting import write_report
    from colquant.research.run_plan import format_plan, make_plan

    notebooks = notebook_numbers(notebooks)
    profile_path = workspace.resolve(profile_path)
    profile = load_profile(profile_path, overrides=overrides)
    out = workspace.output_dir(profile)
    with workspace.output_lock(out, wait_s=wait_s):
        _put_back_set_aside(profile)
        _remove_interrupted_staging(profile)
        log.info("%s", format_plan(make_plan(profile_path, overrides=overrides, force=force, notebooks=notebooks)))
        if overrides:
            profile_path = _write_overridden_profile(profile, profile_path, overrides)
        state_path = out / STATE_FILE
        state = read_state(state_path)
        summary: list[dict[str, Any]] = []
        fingerprints: dict[str, str] = {}
        steps = plan(profile_path, profile)
        planned: list[Step] = []
        recomputed: set[Path] = set()  # caches a forced step of this run has already recomputed
        for index, step in enumerate(steps, 1):
            # planned again: a variant's name carries the calibration source 02 actually used
            step = {fresh.key: fresh for fresh in plan(profile_path, profile)}[step.key]
            planned.append(step)
            fingerprints[step.key] = fingerprint(step, profile, fingerprints)
            if notebooks is not None and step.notebook[:2] not in notebooks:
                summary.append({"step": step.key, "status": "not selected"})
                continue
            if not force and finished(step, state, fingerprints[step.key]):
                log.info("%d/%d %s: unchanged, skipped", index, len(steps), step.key)
                summary.append({"step": step.key, "status": "skipped (unchanged)"})
                continue
            state.pop(step.key, None)
            workspace.write_json(state_path, state)  # a kill from here on leaves the step not done
            _execute_replacing(step, f"{index}/{len(steps)} {step.key}", force=force, recomputed=recomputed)
            state[step.key] = fingerprints[step.key]
            workspace.write_json(state_path, state)
            summary.append({"step": step.key, "status": "executed"})
        stale = stale_steps(planned, state, fingerprints)
        report = write_report(profile, stale=frozenset(step.notebook for step in planned if step.key in stale))
    for row in summary:
        if row["step"] in stale:
            row["status"] += "; results stale (left out of REPORT.md and the model cards)"
    summary.append({"step": "REPORT.md", "status": str(report)})
    return summary


def _write_overridden_profile(profile: dict[str, Any], source: Path, overrides: Sequence[str]) -> Path:
    """The validated profile as YAML in its output directory, for the notebooks to read."""
    header = f"# {source} with --set {' --set '.join(overrides)}, written by `colquant run`; edit the source instead\n"
    return workspace.write_text(workspace.output_dir(profile) / OVERRIDDEN_PROFILE,
                                header + yaml.safe_dump(profile, sort_keys=False))


def _execute_replacing(step: Step, description: str, *, force: bool, recomputed: set[Path]) -> None:
    """Run the step; with `force`, its cached results are set aside first so that it recomputes
    them, put back if it does not finish, and deleted only once it has. A cache two steps share
    (the embeddings of 05 and 07) is recomputed once per run: by the first of them, not again by
    the second, which reuses what the first just computed; `recomputed` holds those of this run."""
    fresh = [path for path in step.caches if path not in recomputed] if force else []
    set_aside = [_set_aside(path) for path in fresh if path.exists()]
    try:
        _execute(step, description)
    except BaseException:
        for aside in set_aside:
            _put_back(aside)
        raise
    for aside in set_aside:
        discard(aside)
    recomputed.update(fresh)


def _set_aside(path: Path) -> Path:
    aside = path.with_name(f".{path.name}{SET_ASIDE}")
    with workspace.writing(path):
        os.rename(path, aside)
    return aside


def _put_back(aside: Path) -> None:
    """Restore results set aside for a forced step that did not finish; what it wrote in their
    place is incomplete and goes."""
    original = aside.with_name(aside.name.removeprefix(".").removesuffix(SET_ASIDE))
    if original.exists():
        discard(original)
    with workspace.writing(original):
        os.rename(aside, original)


def _put_back_set_aside(profile: dict[str, Any]) -> None:
    """Results a killed forced run had set aside (this run holds the lock, so no step is running)."""
    for folder in (workspace.output_dir(profile), workspace.results_dir(profile), workspace.variants_dir(profile)):
        for aside in sorted(folder.glob(f".*{SET_ASIDE}")):
            log.info("restoring %s, set aside by a forced run that did not finish", aside)
            _put_back(aside)


def _remove_interrupted_staging(profile: dict[str, Any]) -> None:
    """Staging folders of saves a killed run left behind, and its unfinished embedding-cache files
    (this run holds the lock, so none is live)."""
    # imports torch: only once a run starts, so that `colquant --help` stays instant
    from colquant.evaluate.embedding_cache import remove_unfinished

    remove_stale_staging(workspace.output_dir(profile))
    remove_stale_staging(workspace.results_dir(profile))
    remove_stale_staging(workspace.variants_dir(profile))
    remove_unfinished(workspace.embeddings_dir(profile))


def _execute(step: Step, description: str) -> None:
    """Run one notebook with papermill, one progress line per notebook counting its cells."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(NOTEBOOKS_DIR / f"{step.notebook}.ipynb"),
            str(step.output),
            parameters=step.parameters,
            cwd=str(workspace.REPO_ROOT),
            progress_bar={"desc": description, "leave": True},
            kernel_manager_class=quiet_kernel_manager(),
            store_widget_state=False,  # tqdm bars are ipywidgets in a kernel: their state is 50-400 KB of noise
            start_timeout=KERNEL_START_TIMEOUT_S,
        )
    except PapermillExecutionError as error:
        raise PipelineError(
            f"{step.notebook} failed ({error.ename}: {error.evalue}); the executed notebook with the "
            f"failing cell is {step.output}"
        ) from error
    missing = [str(path) for path in step.results if not path.exists()]
    if missing:
        raise PipelineError(f"{step.notebook} finished but did not write {', '.join(missing)}; see {step.output}")


def refresh_committed_notebooks(profile_path: str | Path = NOTEBOOK_DEFAULT_PROFILE) -> list[Path]:
    """Execute notebooks/*.ipynb in place, in order, against a fresh output directory.

    The committed notebooks are the regression reference nbval compares with (`make test`), so
    they must be produced exactly as nbval will re-run them: default parameters, a clean slate.
    """
    import os
    import tempfile

    import papermill

    executed = []
    # the notebooks' own default needs no injected "# Parameters" cell, which would carry this machine's path
    default = workspace.resolve(profile_path) == workspace.resolve(NOTEBOOK_DEFAULT_PROFILE)
    with tempfile.TemporaryDirectory(prefix="colquant-notebooks-") as scratch:
        os.environ[workspace.OUTPUT_ROOT_ENV] = scratch
        try:
            for notebook in sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
                papermill.execute_notebook(
                    str(notebook), str(notebook), parameters={} if default else {"profile_path": str(profile_path)},
                    cwd=str(NOTEBOOKS_DIR), progress_bar={"desc": notebook.stem, "leave": True},
                    kernel_manager_class=quiet_kernel_manager(), store_widget_state=False,
                    start_timeout=KERNEL_START_TIMEOUT_S,
                )
                executed.append(notebook)
        finally:
            os.environ.pop(workspace.OUTPUT_ROOT_ENV, None)
    return executed
