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

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jupyter_client.manager import AsyncKernelManager
from traitlets import CaselessStrEnum

from colquant import workspace
from colquant.files import discard, remove_stale_staging
from colquant.frontier import FRONT_TABLE, FRONTIER_TABLE, MODEL_BYTES_TABLE, RECOMMENDATIONS_TABLE, SENSITIVITY_TABLE
from colquant.grid_plan import describe_plan, grid_plan
from colquant.params import load_profile, quantization_section
from colquant.upstream import MEASURES_GRID

log = logging.getLogger(__name__)
# papermill waits 60 s for a kernel to start; on a busy 2-core machine (CI running tests side by side)
# a kernel importing torch took longer, and the run failed with "Kernel didn't respond in 60 seconds"
KERNEL_START_TIMEOUT_S = 600

NOTEBOOKS_DIR = workspace.REPO_ROOT / "notebooks"
PER_SEQLEN = ("02_calibration", "03_quantization")
ACROSS_VARIANTS = ("04_embedding_fidelity", "05_vidore_eval", "06_memory_sweep", "07_index_compression", "08_frontier")
STATE_FILE = "pipeline_state.json"
OVERRIDDEN_PROFILE = "profile.yaml"  # the profile with the command line's --set applied, as notebooks read it
NOTEBOOK_DEFAULT_PROFILE = "params/tiny.yaml"  # what every notebook's `parameters` cell sets
SET_ASIDE = ".before-force"  # `.<name>.before-force`: a forced step's previous results while it runs
# The profile sections each notebook reads (besides the profile's name and random_weights).
SECTIONS = {
    "01_architecture": ("model",),
    "02_calibration": ("model", "corpus", "calibration"),
    "03_quantization": ("model", "calibration", "quantization"),
    "04_embedding_fidelity": ("model", "corpus", "fidelity", "evaluation"),
    "05_vidore_eval": ("model", "corpus", "evaluation"),
    "06_memory_sweep": ("model", "sweep"),
    "07_index_compression": ("model", "corpus", "evaluation", "compression"),
    "08_frontier": ("model", "corpus", "quantization", "fidelity", "evaluation", "compression", "frontier"),
}
READS_ACROSS = {"08_frontier": ("07_index_compression",)}  # steps across variants that read another one's results


class PipelineError(RuntimeError):
    """A notebook failed or did not write its results; the message names it and its executed copy."""


class QuietKernelManager(AsyncKernelManager):
    """The notebooks' kernel, without the noise of a normal run at its source.

    IPC sockets instead of TCP (the kernel warns that TCP carries code unencrypted), and no SIGINT
    to a kernel that is being shut down after its notebook finished (jupyter_client interrupts
    before asking it to exit, and the idle kernel logs "KeyboardInterrupt caught in kernel").
    """

    transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()


@dataclass(frozen=True)
class Step:
    notebook: str
    parameters: dict[str, Any]
    output: Path
    results: tuple[Path, ...]  # what the notebook must have written for the step to count as done
    caches: tuple[Path, ...]  # reused results `--force` recomputes (they count as results too)
    depends_on: tuple[str, ...]  # keys of the steps whose outputs it reads

    @property
    def key(self) -> str:
        return self.output.stem


def plan(profile_path: Path, profile: dict[str, Any]) -> list[Step]:
    """The notebooks to execute for this profile, in order, with what each writes and reads."""
    from colquant.fp8 import variant_names as fp8_variants

    out = workspace.output_dir(profile)
    results = workspace.results_dir(profile)
    parameters = {"profile_path": _relative_to_root(profile_path)}
    # made by every seqlen's 03 from the base weights alone (no calibration)
    uncalibrated = [quantization_section(profile).variant_name(0, "rtn")] if profile["quantization"]["rtn_baseline"] else []
    uncalibrated += fp8_variants(profile)
    steps = [Step("01_architecture", parameters, out / "01_architecture.ipynb", (results / "architecture.json",), (), ())]
    quantized = []
    for seqlen in profile["calibration"]["seqlens"]:
        grid = profile["quantization"]["grid"]
        made_here = workspace.grid_variant_names(profile) if grid is not None and grid["seqlen"] == seqlen else []
        names = dict.fromkeys([workspace.autoround_variant(profile, seqlen), *uncalibrated, *made_here])
        variants = tuple(workspace.variants_dir(profile) / name for name in names)
        per_seqlen = {
            "02_calibration": ((workspace.calibration_file(profile, seqlen), results / f"calibration__seqlen{seqlen}.json"), (), ()),
            "03_quantization": (
                (results / f"quantization__seqlen{seqlen}.json", *(v / workspace.METADATA_FILE for v in variants)),
                variants, (f"02_calibration__seqlen{seqlen}",),
            ),
        }
        for name in PER_SEQLEN:
            written, caches, depends_on = per_seqlen[name]
            steps.append(Step(name, {**parameters, "seqlen": seqlen}, out / f"{name}__seqlen{seqlen}.ipynb",
                              written, caches, depends_on))
        quantized.append(f"03_quantization__seqlen{seqlen}")
    across = {
        "04_embedding_fidelity": ((results / f"fidelity_{n}.csv" for n in ("summary", "layer_errors", "embeddings")), ()),
        "05_vidore_eval": ((results / "ndcg.csv", results / "ndcg_table.csv"), (workspace.mteb_dir(profile),)),
        "06_memory_sweep": ((results / f"{n}" for n in ("sweep.jsonl", "sweep_same_batch.csv", "sweep_budgets.csv")),
                            (results / "sweep.jsonl",)),
        "07_index_compression": ((results / "compression.csv", results / "compression_table.csv"),
                                 (workspace.index_mteb_dir(profile),)),
        "08_frontier": ((results / name for name in (FRONTIER_TABLE, FRONT_TABLE, RECOMMENDATIONS_TABLE,
                                                     MODEL_BYTES_TABLE, SENSITIVITY_TABLE)), ()),
    }
    for name in ACROSS_VARIANTS:
        written, caches = across[name]
        steps.append(Step(name, parameters, out / f"{name}.ipynb", tuple(written), caches,
                          (*quantized, *READS_ACROSS.get(name, ()))))
    return steps


def _relative_to_root(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(workspace.REPO_ROOT))
    except ValueError:
        return str(path)


def fingerprint(step: Step, profile: dict[str, Any], upstream: dict[str, str]) -> str:
    """The step's notebook source, parameters, the profile sections it reads, its upstream steps',
    and for a step that compares variants, the content of the variants on disk now.

    The profile enters by content, not by path: `--set` hands the notebooks another file
    (`profile.yaml` in the outputs), which must re-run only the steps whose sections it changes.
    The variants enter by content because a re-quantization under the same name (`--force`, or a
    calibration setting the name does not carry) must not leave 04-08's numbers standing."""
    sections = {name: profile[name] for name in SECTIONS[step.notebook]}
    if "seqlen" in step.parameters and "calibration" in sections:  # its own seqlen is a parameter
        sections["calibration"] = {k: v for k, v in sections["calibration"].items() if k != "seqlens"}
    digest = hashlib.sha256()
    digest.update((NOTEBOOKS_DIR / f"{step.notebook}.ipynb").read_bytes())
    parameters = {key: value for key, value in step.parameters.items() if key != "profile_path"}
    identity = [parameters, profile["profile"], profile["random_weights"], sections,
                [upstream[key] for key in step.depends_on]]
    if step.notebook in ACROSS_VARIANTS:
        identity.append({name: workspace.checkpoint_fingerprint(path)
                         for name, path in workspace.quantized_variants(
                             profile, grid=step.notebook in MEASURES_GRID).items()})
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()


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
    """
    from colquant.reporting import write_report

    notebooks = _notebook_numbers(notebooks)
    profile_path = workspace.resolve(profile_path)
    profile = load_profile(profile_path, overrides=overrides)
    out = workspace.output_dir(profile)
    with workspace.output_lock(out, wait_s=wait_s):
        _put_back_set_aside(profile)
        _remove_interrupted_staging(profile)
        if overrides:
            profile_path = _write_overridden_profile(profile, profile_path, overrides)
        log.info(describe_plan(grid_plan(profile)))
        state_path = out / STATE_FILE
        state = _read_state(state_path)
        summary: list[dict[str, Any]] = []
        fingerprints: dict[str, str] = {}
        steps = plan(profile_path, profile)
        planned: list[Step] = []
        for index, step in enumerate(steps, 1):
            # planned again: a variant's name carries the calibration source 02 actually used
            step = {fresh.key: fresh for fresh in plan(profile_path, profile)}[step.key]
            planned.append(step)
            fingerprints[step.key] = fingerprint(step, profile, fingerprints)
            if notebooks is not None and step.notebook[:2] not in notebooks:
                summary.append({"step": step.key, "status": "not selected"})
                continue
            if not force and _finished(step, state, fingerprints[step.key]):
                log.info("%d/%d %s: unchanged, skipped", index, len(steps), step.key)
                summary.append({"step": step.key, "status": "skipped (unchanged)"})
                continue
            state.pop(step.key, None)
            workspace.write_json(state_path, state)  # a kill from here on leaves the step not done
            _execute_replacing(step, f"{index}/{len(steps)} {step.key}", force=force)
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


def _notebook_numbers(notebooks: Sequence[str] | None) -> tuple[str, ...] | None:
    """`("4", "05")` as `("04", "05")`; a number no notebook has is refused: it would select nothing,
    and the run would only rewrite the report."""
    if notebooks is None:
        return None
    known = [name[:2] for name in SECTIONS]
    numbers = tuple(str(number).strip().zfill(2) for number in notebooks)
    unknown = [repr(given) for given, number in zip(notebooks, numbers) if number not in known]
    if unknown or not numbers:
        raise PipelineError(f"--notebooks {','.join(map(str, notebooks))}: {', '.join(unknown) or 'nothing'} is not a "
                            f"notebook number; choose from {','.join(known)}")
    return numbers


def _write_overridden_profile(profile: dict[str, Any], source: Path, overrides: Sequence[str]) -> Path:
    """The validated profile as YAML in its output directory, for the notebooks to read."""
    header = f"# {source} with --set {' --set '.join(overrides)}, written by `colquant run`; edit the source instead\n"
    return workspace.write_text(workspace.output_dir(profile) / OVERRIDDEN_PROFILE,
                                header + yaml.safe_dump(profile, sort_keys=False))


def _read_state(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return workspace.read_json(path, "delete it: every step then runs again (finished results are reused)")


def _finished(step: Step, state: dict[str, str], current: str) -> bool:
    """Recorded as finished with this fingerprint, and everything it wrote (cached results too) is there."""
    written = (step.output, *step.results, *step.caches)
    return state.get(step.key) == current and all(path.exists() for path in written)


def stale_steps(steps: list[Step], state: dict[str, str], fingerprints: dict[str, str]) -> set[str]:
    """Keys of the steps whose results exist but are not those of the current inputs: not finished
    with their current fingerprint (a partial run changed what they read, e.g. re-quantized the
    variants they compared), or reading from a step that is not."""
    unfinished: set[str] = set()
    for step in steps:
        if not _finished(step, state, fingerprints[step.key]) or unfinished & set(step.depends_on):
            unfinished.add(step.key)
    return {step.key for step in steps if step.key in unfinished and any(path.exists() for path in step.results)}


def _execute_replacing(step: Step, description: str, *, force: bool) -> None:
    """Run the step; with `force`, its cached results are set aside first so that it recomputes
    them, put back if it does not finish, and deleted only once it has."""
    set_aside = [_set_aside(path) for path in step.caches if path.exists()] if force else []
    try:
        _execute(step, description)
    except BaseException:
        for aside in set_aside:
            _put_back(aside)
        raise
    for aside in set_aside:
        discard(aside)


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
    """Staging folders of saves a killed run left behind (this run holds the lock, so none is live)."""
    remove_stale_staging(workspace.output_dir(profile))
    remove_stale_staging(workspace.results_dir(profile))
    remove_stale_staging(workspace.variants_dir(profile))


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
            kernel_manager_class=QuietKernelManager,
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
                    kernel_manager_class=QuietKernelManager, store_widget_state=False,
                    start_timeout=KERNEL_START_TIMEOUT_S,
                )
                executed.append(notebook)
        finally:
            os.environ.pop(workspace.OUTPUT_ROOT_ENV, None)
    return executed
