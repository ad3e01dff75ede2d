"""What `colquant run` will do and what it will cost, before it does anything: `colquant run PROFILE --plan`.

`make_plan` decides each step's status as `pipeline.run` does (selected, forced, finished with its
current fingerprint and results) without running or writing anything: `runs`, `done` (skipped, its
results reused), `not selected`, or `runs if 03 changes the weights` for a finished comparison step
(04-08) whose quantization step runs while its variants exist (the run re-checks it after 03).

For each step that runs it counts the model work: checkpoint loads; pages and queries encoded (05
and 07 net of the mteb results and embedding-cache entries already on disk, 07 also net of what 05
stores earlier in the same run; variants sharing a vision tower run it once per page, as
`shared_vision` evaluates them, the sharing predicted from how they are made). A quantization costs the
seconds `grid_plan` has measured for its method (in this output directory, else in the profile's reference
run); one whose method nobody timed yet costs auto-round's text tokens (per iteration a forward and a backward
of a calibration batch, taken as three forwards, plus two forwards of every sample). The work is multiplied
by the per-item times a short warm-up measures on this machine's device (`colquant.research.warmup`, in a
child process). mteb's scoring, notebook start-up and plotting are not counted. `pipeline.run`
prints the same plan as its first lines.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colquant.research import workspace
from colquant.research.grid_plan import METHOD_STAGES, measured_seconds, reference_seconds, variant_methods
from colquant.research.params import load_profile
from colquant.research.steps import (
    ACROSS_VARIANTS,
    STATE_FILE,
    Step,
    finished,
    fingerprint,
    notebook_numbers,
    plan,
    read_state,
)

log = logging.getLogger(__name__)

RUNS, DONE, NOT_SELECTED, CONDITIONAL = "runs", "done", "not selected", "runs if 03 changes the weights"
BACKWARD_FORWARDS = 3  # a forward and its backward cost about three forwards (the backward does two GEMMs per one)
BUILT_MODELS = ("embedded-tiny", "synthetic-4b")
TUNED = ("autoround", "autoscheme")  # the methods that run auto-round's tuning on calibration text


@dataclass
class StepPlan:
    """One step: its status and why; the model work it does; what it reuses; its estimated seconds."""

    key: str
    status: str
    why: str
    loads: int = 0
    pages: int = 0  # pages through a language model (each variant's encoding counts)
    vision_pages: int = 0  # pages through a vision tower (fewer where variants share one)
    queries: int = 0
    text_tokens: int = 0  # auto-round's forward-equivalent text tokens (of variants whose method is not timed yet)
    timed_s: float = 0.0  # quantizations timed per method (`grid_plan`: here, else the profile's reference run)
    reuses: list[str] = field(default_factory=list)
    seconds: float | None = None


@dataclass
class RunPlan:
    profile: str
    steps: list[StepPlan]
    rates: Any  # warmup.Rates, or None
    rates_note: str
    cache_note: str

    @property
    def executed(self) -> list[str]:
        """The steps a run executes (besides the conditional ones, run only if 03 changes the weights)."""
        return [step.key for step in self.steps if step.status == RUNS]


def make_plan(profile_path: str | Path, *, overrides: Sequence[str] = (), force: bool = False,
              notebooks: Sequence[str] | None = None, measure: bool = True) -> RunPlan:
    """The plan of `pipeline.run(profile_path, overrides=..., force=..., notebooks=...)`; writes nothing."""
    profile = load_profile(workspace.resolve(profile_path), overrides=overrides)
    steps = plan(workspace.resolve(profile_path), profile)
    statuses = step_statuses(steps, profile, force, notebook_numbers(notebooks))
    work = Workloads(profile, force)
    planned = [work.of(step, *statuses[step.key]) for step in steps]
    rates, note = _rates(profile, planned) if measure else (None, "no warm-up (measure=False)")
    for step in planned:
        step.seconds = _seconds(step, rates)
    return RunPlan(profile["profile"], planned, rates, note, work.cache_note(rates))


def step_statuses(steps: list[Step], profile: dict[str, Any], force: bool,
                  notebooks: tuple[str, ...] | None) -> dict[str, tuple[str, str]]:
    """Step key -> (status, why), by the rules `pipeline.run` applies."""
    state = read_state(workspace.output_dir(profile) / STATE_FILE)
    fingerprints: dict[str, str] = {}
    statuses: dict[str, tuple[str, str]] = {}
    for step in steps:
        fingerprints[step.key] = fingerprint(step, profile, fingerprints)
        upstream = [statuses[key] for key in step.depends_on]
        if notebooks is not None and step.notebook[:2] not in notebooks:
            statuses[step.key] = (NOT_SELECTED, "")
        elif force:
            statuses[step.key] = (RUNS, "--force")
        elif not finished(step, state, fingerprints[step.key]):
            statuses[step.key] = (RUNS, _unfinished_because(step, state, fingerprints[step.key]))
        elif step.notebook in ACROSS_VARIANTS and any(status in (RUNS, CONDITIONAL) for status, _ in upstream):
            makes_new = any(why.startswith(("new variant", "--force")) for _, why in upstream)
            statuses[step.key] = (RUNS, "03 makes new variants") if makes_new else (CONDITIONAL, "03 runs")
        else:
            statuses[step.key] = (DONE, "unchanged")
    return statuses


def _unfinished_because(step: Step, state: dict[str, str], current: str) -> str:
    if step.key not in state:
        return "never finished"
    missing = [path for path in (step.output, *step.results, *step.caches) if not path.exists()]
    variants = sorted({path.parent.name for path in missing if path.name == workspace.METADATA_FILE})
    if variants:
        return f"new variants: {', '.join(variants)}"
    return f"{_shown(missing[0])} is missing" if missing else "its inputs changed"


class Workloads:
    """The model work of each step, from the profile, mteb's task statistics and what is on disk."""

    def __init__(self, profile: dict[str, Any], force: bool) -> None:
        self.profile, self.force = profile, force
        self.variants = [workspace.BASELINE, *workspace.expected_variants(profile)]  # 07 and 08 compare all
        self.compared = [workspace.BASELINE, *workspace.expected_variants(profile, grid=False)]  # 04-06: not the grid's
        self.built = self._built_checkpoints()
        self.stored_by_05: set[tuple[str, str, str]] = set()  # (variant, task, subset) 05 stores in this run
        self.made: set[str] = set()  # variants an earlier 03 step of this run makes
        self._sizes: list[Any] | None = None

    def _built_checkpoints(self) -> dict[str, Path]:
        """The checkpoints on disk now: finished variants, and the base model where it is built or
        downloaded (nothing is built or downloaded here)."""
        built = dict(workspace.quantized_variants(self.profile))
        model = self.profile["model"]
        base = workspace.output_dir(self.profile) / "base-model"
        if model["id"] in BUILT_MODELS and (base / "config.json").is_file():
            built[workspace.BASELINE] = base
        elif Path(model["id"]).expanduser().is_dir():
            built[workspace.BASELINE] = Path(model["id"]).expanduser()
        elif model["id"] not in BUILT_MODELS:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError

            try:
                built[workspace.BASELINE] = Path(snapshot_download(model["id"], revision=model["revision"],
                                                                   local_files_only=True))
            except LocalEntryNotFoundError:
                pass  # not downloaded yet: its pages count as not cached
        return built

    @property
    def sizes(self) -> list[Any]:
        """The evaluated (task, subset)s' sizes (`task_sizes`), read once."""
        from colquant.evaluate.task_sizes import task_sizes

        if self._sizes is None:
            self._sizes = task_sizes(self.profile)
        return self._sizes

    def of(self, step: Step, status: str, why: str) -> StepPlan:
        planned = StepPlan(step.key, status, why)
        if status in (RUNS, CONDITIONAL):
            getattr(self, f"_step_{step.notebook[:2]}")(planned, step)
        else:
            planned.reuses = [_shown(path) for path in (*step.results, *step.caches) if path.exists()]
        return planned

    def _step_01(self, planned: StepPlan, step: Step) -> None:
        planned.loads = 1

    def _step_02(self, planned: StepPlan, step: Step) -> None:
        calibration = self.profile["calibration"]
        planned.loads = 1
        planned.pages = planned.vision_pages = calibration["nsamples"] if calibration["source"] == "pages" else 0

    def _step_03(self, planned: StepPlan, step: Step) -> None:
        quantization, calibration = self.profile["quantization"], self.profile["calibration"]
        made = [path.parent for path in step.results[1:]
                if (self.force or not path.exists()) and path.parent.name not in self.made]
        self.made.update(path.name for path in made)  # the uncalibrated ones: made by the first 03 only
        planned.reuses = [_shown(path.parent) for path in step.results[1:] if path.exists() and not self.force]
        planned.loads = 2 * len(made)  # each is made from a base load, then reloaded to check its layers
        timed, source = self.quantization_seconds
        stages = {path: METHOD_STAGES.get(self.methods.get(path.name, "")) for path in made}
        planned.timed_s = sum(timed[stage] for stage in stages.values() if stage in timed)
        if planned.timed_s:
            planned.why += f"; quantization time per method {source}"
        untimed = [path for path, stage in stages.items() if stage not in timed]
        calibrated = [path for path in untimed if self.methods.get(path.name) in TUNED]  # not a W4A8 run: it tunes nothing
        per_variant = quantization["iters"] * quantization["batch_size"] * BACKWARD_FORWARDS + 2 * calibration["nsamples"]
        planned.text_tokens = len(calibrated) * step.parameters["seqlen"] * per_variant

    @functools.cached_property
    def methods(self) -> dict[str, str]:
        """Each variant the profile makes, with its quantization method (`grid_plan.variant_methods`)."""
        return variant_methods(self.profile)

    @functools.cached_property
    def quantization_seconds(self) -> tuple[dict[str, float], str]:
        """Seconds per quantization, per `grid_plan` stage, read once for all 03 steps: the median over
        this output directory's finished variants, else the profile's reference run
        (`benchmarks/frontier_grid.py`); a method timed by neither is estimated from auto-round's text
        tokens at the warm-up's rate."""
        here = measured_seconds(self.profile)
        if here:
            return here, "measured on this output directory's variants"
        reference, where = reference_seconds(self.profile)
        return reference, f"from the reference run ({where})"

    def _step_04(self, planned: StepPlan, step: Step) -> None:
        fidelity, count = self.profile["fidelity"], len(self.compared)
        planned.loads = count
        planned.pages = planned.vision_pages = fidelity["n_pages"] * count
        planned.queries = fidelity["n_queries"] * count

    def _step_06(self, planned: StepPlan, step: Step) -> None:
        sweep, count = self.profile["sweep"], len(self.compared)
        planned.loads = count
        planned.pages = planned.vision_pages = count * sweep["repeats"] * sum(sweep["page_batch_sizes"])
        planned.queries = count * sweep["repeats"] * sum(sweep["query_batch_sizes"])

    def _step_05(self, planned: StepPlan, step: Step) -> None:
        scoring = self.profile["evaluation"]["scoring"]
        self._evaluation(planned, step, lambda variant: [(workspace.mteb_dir(self.profile), variant, scoring)],
                         self.compared)
        self.stored_by_05 = {(variant, size.task, size.subset) for variant in self.compared for size in self.sizes}

    def _step_07(self, planned: StepPlan, step: Step) -> None:
        from colquant.evaluate.compress_eval import index_variant_name
        from colquant.inference.compress import profile_settings

        def results(variant: str) -> list[tuple[Path, str, str]]:
            return [(workspace.index_mteb_dir(self.profile), index_variant_name(variant, setting), "exact")
                    for setting in profile_settings(self.profile)]

        self._evaluation(planned, step, results, self.variants, skip=self.stored_by_05)

    def _step_08(self, planned: StepPlan, step: Step) -> None:
        """Every variant loaded once for its bytes; BF16 and each variant of 3 bits or fewer again for the
        per-projection sensitivity, on `frontier.SENSITIVITY_ITEMS` pages each."""
        from colquant.research.frontier import SENSITIVITY_ITEMS

        low_bit = 1 + len(self._low_bit_grid_points())
        planned.loads = len(self.variants) + low_bit
        planned.pages = planned.vision_pages = low_bit * min(SENSITIVITY_ITEMS, self.profile["corpus"]["n_pages"])

    def _low_bit_grid_points(self) -> list[str]:
        """The grid's points with layers of 3 bits or fewer (what `frontier.low_bit_variants` picks once made)."""
        from colquant.quantize.weight_grid import grid_variants

        grid = self.profile["quantization"]["grid"]
        if grid is None:
            return []
        source = workspace.calibration_source_used(self.profile, grid["seqlen"])
        return [name for name, point in grid_variants(self.profile, source).items() if point.bits <= 3]

    def _evaluation(self, planned: StepPlan, step: Step, results: Any, variants: list[str],
                    skip: set[tuple[str, str, str]] = frozenset()) -> None:
        """Per (variant, task, subset), the pages and queries it encodes: none where mteb's results
        of every evaluation of it are on disk (mteb reads them back), else those neither the
        embedding cache holds nor 05 stores earlier in this run. `results(variant)` names those
        evaluations: (mteb folder, variant name, scoring)."""
        from colquant.evaluate.embedding_cache import manifests

        cached = {} if self.force else _cached_items(manifests(workspace.embeddings_dir(self.profile)))
        towers = self.sharing()
        planned.loads = len(variants)
        planned.reuses = [_shown(path) + "/" for path in step.caches if path.exists() and not self.force]
        for size in self.sizes:
            shared: dict[str, int] = {}
            for variant in variants:
                if (variant, size.task, size.subset) in skip or self._evaluated(variant, size.task, results(variant)):
                    continue
                key = (self._fingerprint(variant), size.task, size.subset, size.revision)
                pages = max(0, size.pages - cached.get((*key, "pages"), 0))
                planned.pages += pages
                planned.queries += max(0, size.queries - cached.get((*key, "queries"), 0))
                shared[towers[variant]] = max(shared.get(towers[variant], 0), pages)
            planned.vision_pages += sum(shared.values())

    def _evaluated(self, variant: str, task: str, evaluations: list[tuple[Path, str, str]]) -> bool:
        """Whether mteb's result file of `task` exists for each of the variant's evaluations (under
        the revision `evaluation_fingerprint` gives its checkpoint as it is now)."""
        path = self.built.get(variant)
        if self.force or path is None:
            return False
        return all((folder / "results" / f"colquant__{self.profile['profile']}-{name}"
                    / workspace.evaluation_fingerprint(self.profile, path, scoring) / f"{task}.json").is_file()
                   for folder, name, scoring in evaluations)

    def _fingerprint(self, variant: str) -> str | None:
        path = self.built.get(variant)
        return workspace.checkpoint_fingerprint(path) if path is not None else None

    def sharing(self) -> dict[str, str]:
        """Variant -> the first variant with its vision tower, predicted from how the variants are
        made (only fp8-all quantizes the tower; the evaluation decides by the tower's weights); on
        several GPUs none share (`shared_vision.MemoryCheck`: each variant spreads over all GPUs)."""
        from colquant.inference.distributed import visible_gpus

        if str(self.profile["model"]["device"]).startswith(("cuda", "auto")) and len(visible_gpus()) > 1:
            return {name: name for name in self.variants}
        return {name: name if name == "fp8-all" else workspace.BASELINE for name in self.variants}

    def cache_note(self, rates: Any) -> str:
        """The embedding cache now, what the whole study needs in it, and whether that fits."""
        from colquant.evaluate.embedding_cache import DISK_RESERVE, cache_size, size_limit

        root = workspace.embeddings_dir(self.profile)
        entries, used = cache_size(root)
        pages, queries = sum(size.pages for size in self.sizes), sum(size.queries for size in self.sizes)
        text = (f"Embedding cache {_shown(root)}/: {entries} entries, {used / 2**30:.2f} GiB. The study stores "
                f"{len(self.variants)} variants x ({pages:,} pages + {queries:,} queries)")
        if rates is None:
            return text + "."
        need = len(self.variants) * (pages * rates.page_tokens + queries * rates.query_tokens) * rates.embedding_bytes
        disk = shutil.disk_usage(_existing(root))
        room = disk.free - DISK_RESERVE * disk.total
        if size_limit() is not None:
            room = min(room, size_limit() - used)
        verdict = "fits" if need <= used + room else "does NOT fit: 07 encodes again what it could not store"
        return (f"{text}: at {rates.page_tokens:,.0f} tokens a page and {rates.query_tokens:,.0f} a query, "
                f"{rates.embedding_bytes} bytes a token, {need / 2**30:,.1f} GiB; room {room / 2**30:,.1f} GiB: {verdict}.")


def _cached_items(found: list[tuple[Path, dict[str, Any]]]) -> dict[tuple[Any, ...], int]:
    """(checkpoint, task, subset, revision, kind) -> items the cache holds for it."""
    items: dict[tuple[Any, ...], int] = {}
    for _, manifest in found:
        for record in manifest["entries"].values():
            key = (manifest["identity"]["checkpoint"], record["task"], record["subset"], record["revision"], record["kind"])
            items[key] = items.get(key, 0) + record["items"]
    return items


def _rates(profile: dict[str, Any], steps: list[StepPlan]) -> tuple[Any, str]:
    """The warm-up's rates, when a step with model work runs; else None and why not."""
    from colquant.research import warmup

    if not any(step.loads or step.pages or step.queries or step.text_tokens or step.timed_s for step in steps):
        return None, "nothing to run: no warm-up"
    try:
        rates = warmup.measure_in_subprocess(profile, warmup.workload_of(profile))
    except ValueError as error:
        return None, f"no estimate: {error}"
    loads = f"model load {rates.load_s:.1f} s" if rates.load_s is not None else "loads not timed (no checkpoint on disk yet)"
    return rates, (f"measured on {rates.device} with {rates.model}: {rates.pages} pages of {rates.page_size[0]}x"
                   f"{rates.page_size[1]} ({rates.page_tokens:,.0f} tokens) at {1 / rates.page_s:.1f} pages/s (vision "
                   f"tower {rates.vision_share:.0%}), {rates.queries} queries at {1 / rates.query_s:.0f}/s, "
                   f"{loads}")


def _seconds(step: StepPlan, rates: Any) -> float | None:
    if rates is None:
        return None
    vision = min(rates.vision_s, rates.page_s)
    return (step.vision_pages * vision + step.pages * (rates.page_s - vision) + step.queries * rates.query_s
            + step.text_tokens * rates.text_token_s + step.timed_s + step.loads * (rates.load_s or 0.0))


def format_plan(run_plan: RunPlan) -> str:
    """The plan as the lines `colquant run --plan` prints (and every run starts with)."""
    width = max(len(step.key) for step in run_plan.steps)
    lines = [f"colquant run {run_plan.profile}: plan",
             f"{'step':<{width}}  {'status':<13} {'pages':>9} {'queries':>8} {'estimate':>9}  why / reuses"]
    for step in run_plan.steps:
        estimate = "" if step.seconds is None or step.status not in (RUNS, CONDITIONAL) else duration(step.seconds)
        status = "runs if 03..." if step.status == CONDITIONAL else step.status
        detail = step.why if step.status != DONE else "reuses " + (", ".join(step.reuses[:3]) or "its results")
        if step.status == RUNS and step.reuses:
            detail += "; reuses " + ", ".join(step.reuses[:3])
        lines.append(f"{step.key:<{width}}  {status:<13} {step.pages:>9,} {step.queries:>8,} {estimate:>9}  {detail}")
    total = [step.seconds for step in run_plan.steps if step.status in (RUNS, CONDITIONAL) and step.seconds is not None]
    conditional = [step.key for step in run_plan.steps if step.status == CONDITIONAL]
    if run_plan.rates is not None:
        lines.append(f"Estimated wall time: {duration(sum(total))} of model work"
                     + (f" (with {', '.join(conditional)}, which run only if 03 changes the weights)" if conditional else "")
                     + "; mteb's scoring, notebook start-up and plots not counted.")
    lines += [f"Rates: {run_plan.rates_note}.", run_plan.cache_note]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):02d} min"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(workspace.output_root()))
    except ValueError:
        return str(path)


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
