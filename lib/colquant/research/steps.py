"""The pipeline's steps: which notebooks a profile runs, with what each writes and reads, and when a step
counts as finished (its fingerprint recorded and every result present).

Why a module of its own: `pipeline.run` executes these steps and `run_plan` predicts what a run will do
with the same rules; both read them from here, so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colquant.research import workspace
from colquant.research.frontier import FRONT_TABLE, FRONTIER_TABLE, MODEL_BYTES_TABLE, RECOMMENDATIONS_TABLE, SENSITIVITY_TABLE
from colquant.research.params import quantization_section
from colquant.research.upstream import MEASURES_GRID
from colquant.retriever.checkpoint_files import METADATA_FILE, checkpoint_fingerprint

NOTEBOOKS_DIR = workspace.REPO_ROOT / "notebooks"


PER_SEQLEN = ("02_calibration", "03_quantization")


ACROSS_VARIANTS = ("04_embedding_fidelity", "05_vidore_eval", "06_memory_sweep", "07_index_compression", "08_frontier")


STATE_FILE = "pipeline_state.json"


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
    from colquant.quantize.fp8_variants import variant_names as fp8_variants

    out = workspace.output_dir(profile)
    results = workspace.results_dir(profile)
    parameters = {"profile_path": relative_to_root(profile_path)}
    # made by every seqlen's 03 from the base weights alone (no calibration)
    uncalibrated = [quantization_section(profile).variant_name(0, "rtn")] if profile["quantization"]["rtn_baseline"] else []
    uncalibrated += fp8_variants(profile)
    steps = [Step("01_architecture", parameters, out / "01_architecture.ipynb", (results / "architecture.json",), (), ())]
    quantized = []
    for seqlen in profile["calibration"]["seqlens"]:
        w4a8 = [workspace.w4a8_variant(profile, seqlen)] if seqlen == workspace.w4a8_seqlen(profile) else []
        grid = profile["quantization"]["grid"]
        made_here = workspace.grid_variant_names(profile) if grid is not None and grid["seqlen"] == seqlen else []
        names = dict.fromkeys([workspace.autoround_variant(profile, seqlen), *uncalibrated, *w4a8, *made_here])
        variants = tuple(workspace.variants_dir(profile) / name for name in names)
        per_seqlen = {
            "02_calibration": ((workspace.calibration_file(profile, seqlen), results / f"calibration__seqlen{seqlen}.json"), (), ()),
            "03_quantization": (
                (results / f"quantization__seqlen{seqlen}.json", *(v / METADATA_FILE for v in variants)),
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
        "05_vidore_eval": ((results / "ndcg.csv", results / "ndcg_table.csv"),
                           (workspace.mteb_dir(profile), workspace.embeddings_dir(profile))),
        "06_memory_sweep": ((results / f"{n}" for n in ("sweep.jsonl", "sweep_same_batch.csv", "sweep_budgets.csv")),
                            (results / "sweep.jsonl",)),
        "07_index_compression": ((results / "compression.csv", results / "compression_table.csv"),
                                 (workspace.index_mteb_dir(profile), workspace.embeddings_dir(profile))),
        "08_frontier": ((results / name for name in (FRONTIER_TABLE, FRONT_TABLE, RECOMMENDATIONS_TABLE,
                                                     MODEL_BYTES_TABLE, SENSITIVITY_TABLE)), ()),
    }
    for name in ACROSS_VARIANTS:
        written, caches = across[name]
        steps.append(Step(name, parameters, out / f"{name}.ipynb", tuple(written), caches,
                          (*quantized, *READS_ACROSS.get(name, ()))))
    return steps


def relative_to_root(path: Path) -> str:
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
        identity.append({name: checkpoint_fingerprint(path)
                         for name, path in workspace.quantized_variants(
                             profile, grid=step.notebook in MEASURES_GRID).items()})
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def notebook_numbers(notebooks: Sequence[str] | None) -> tuple[str, ...] | None:
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


def read_state(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return workspace.read_json(path, "delete it: every step then runs again (finished results are reused)")


def finished(step: Step, state: dict[str, str], current: str) -> bool:
    """Recorded as finished with this fingerprint, and everything it wrote (cached results too) is there."""
    written = (step.output, *step.results, *step.caches)
    return state.get(step.key) == current and all(path.exists() for path in written)


def stale_steps(steps: list[Step], state: dict[str, str], fingerprints: dict[str, str]) -> set[str]:
    """Keys of the steps whose results exist but are not those of the current inputs: not finished
    with their current fingerprint (a partial run changed what they read, e.g. re-quantized the
    variants they compared), or reading from a step that is not."""
    unfinished: set[str] = set()
    for step in steps:
        if not finished(step, state, fingerprints[step.key]) or unfinished & set(step.depends_on):
            unfinished.add(step.key)
    return {step.key for step in steps if step.key in unfinished and any(path.exists() for path in step.results)}
