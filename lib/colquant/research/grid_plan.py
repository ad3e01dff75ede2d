"""What a profile's variants cost before they run: how many quantizations and evaluations, and how long.

The frontier's grid multiplies runs: every weight setting is quantized once (notebook 03), evaluated on
every task (05) and with every index setting (07, which encodes each task once per variant and scores
each setting on those encodings). `grid_plan` counts them, says how many finished checkpoints already
exist, and estimates the time of what is left from seconds per run measured: the quantization times
recorded in this output directory's variants, else those of the profile's reference run of
`benchmarks/frontier_grid.py` (`benchmarks/results/frontier-grid-<profile>.json`; the real 4B profile is
timed by its synthetic twin's). Evaluation times are not recorded by the notebooks, so a stage with no
measurement shows no estimate rather than a guess. Notebook 08 shows this table with what the runs cost;
`colquant run`'s one plan (`run_plan`) times its quantization steps with the same seconds per method.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from colquant.research import workspace
from colquant.retriever.checkpoint_files import read_variant_metadata

REFERENCES = workspace.REPO_ROOT / "benchmarks" / "results"  # frontier-grid-<profile>.json (benchmarks/frontier_grid.py)
# profiles whose runs are timed by another's measurement: the same model shapes and quantization settings
REFERENCE_PROFILES = {"colqwen3-4b": "synthetic-4b"}
STAGES = ("quantize: auto-round", "quantize: RTN", "quantize: AutoScheme (selection + tuning)", "quantize: FP8",
          "evaluate: 05 (variant x task)", "evaluate: 07 (variant x index setting x task)")
METHOD_STAGES = {"autoround": STAGES[0], "rtn": STAGES[1], "autoscheme": STAGES[2], "fp8-dynamic": STAGES[3]}


def variant_methods(profile: dict[str, Any]) -> dict[str, str]:
    """Each variant the profile makes (`workspace.expected_variants`), with its method."""
    from colquant.quantize.fp8_variants import variant_names as fp8_variants
    from colquant.quantize.weight_grid import grid_variants
    from colquant.research.params import quantization_section
    from colquant.retriever.fp8 import METHOD as FP8

    methods = {workspace.autoround_variant(profile, seqlen): "autoround" for seqlen in profile["calibration"]["seqlens"]}
    if profile["quantization"]["rtn_baseline"]:
        methods[quantization_section(profile).variant_name(0, "rtn")] = "rtn"
    methods |= {name: FP8 for name in fp8_variants(profile)}
    grid = profile["quantization"]["grid"]
    if grid is not None:
        source = workspace.calibration_source_used(profile, grid["seqlen"])
        for name, point in grid_variants(profile, source).items():
            methods.setdefault(name, point.method)
    return methods


def measured_seconds(profile: dict[str, Any]) -> dict[str, float]:
    """Median wall time per quantization method over this output directory's finished variants."""
    times: dict[str, list[float]] = {}
    for path in workspace.quantized_variants(profile).values():
        metadata = read_variant_metadata(path)
        if "loads" in metadata:  # a W4A8 run: its checkpoint's metadata, no quantization of its own
            continue
        times.setdefault(METHOD_STAGES[metadata["settings"]["method"]], []).append(metadata["wall_time_s"])
    return {stage: statistics.median(values) for stage, values in times.items()}


def reference_seconds(profile: dict[str, Any], directory: Path = REFERENCES) -> tuple[dict[str, float], str]:
    """(median seconds per quantization stage, where and how they were measured) from the reference runs of
    `benchmarks/frontier_grid.py` for this profile (or the profile it stands in for: `frontier-grid-<name>.json`
    and its parts `frontier-grid-<name>-<kinds>.json`), or ({}, "")."""
    name = REFERENCE_PROFILES.get(profile["profile"], profile["profile"])
    runs = [json.loads(path.read_text()) for path in sorted(directory.glob(f"frontier-grid-{name}*.json"))
            if path.stem == f"frontier-grid-{name}" or path.stem.startswith(f"frontier-grid-{name}-")]
    if not runs:
        return {}, ""
    times: dict[str, list[float]] = {}
    for row in (row for run in runs for row in run["rows"]):
        times.setdefault(row["stage"], []).append(row["quantize_s"])
    where = "; ".join(sorted({f"{run['device']}, {name}, iters {run['quantization']['iters']}" for run in runs}))
    return {stage: statistics.median(values) for stage, values in times.items()}, where


def grid_plan(profile: dict[str, Any], reference: tuple[Mapping[str, float], str] | None = None) -> pd.DataFrame:
    """One row per stage: runs the profile implies, how many quantizations are already on disk, seconds
    per run (measured here, else the reference) and the estimated time of those still to run."""
    from colquant.research.upstream import MEASURES_GRID

    methods = variant_methods(profile)
    finished = workspace.quantized_variants(profile)
    compared = {notebook: len(workspace.expected_variants(profile, grid=notebook in MEASURES_GRID)) + 1  # and BF16
                for notebook in ("05_vidore_eval", "07_index_compression")}
    tasks = len(profile["evaluation"]["tasks"])
    counts = {stage: [sum(m == method for m in methods.values()),
                      sum(m == method and name in finished for name, m in methods.items())]
              for method, stage in METHOD_STAGES.items()}
    counts[STAGES[4]] = [(compared["05_vidore_eval"] + 1) * tasks, 0]  # BF16 also scored the other way
    counts[STAGES[5]] = [compared["07_index_compression"] * len(profile["compression"]["settings"]) * tasks, 0]
    here = measured_seconds(profile)
    known, where = reference if reference is not None else reference_seconds(profile)
    rows = []
    for stage in STAGES:
        runs, done = counts[stage]
        seconds, source = (here[stage], "measured here") if stage in here else \
            (known[stage], f"reference: {where}") if stage in known else (None, "not measured yet")
        rows.append({"stage": stage, "runs": runs, "on disk": done, "to run": runs - done, "s per run": seconds,
                     "estimated s": None if seconds is None else (runs - done) * seconds, "seconds from": source})
    return pd.DataFrame(rows)


def describe_plan(plan: pd.DataFrame) -> str:
    """One paragraph: the runs the profile implies and the estimated time of what is left (evaluations
    counted in full: mteb answers cached ones at once, so their estimate is an upper bound)."""
    quantize = plan[plan["stage"].str.startswith("quantize")]
    evaluate = plan[plan["stage"].str.startswith("evaluate")]
    estimate = plan["estimated s"].dropna()
    unknown = plan.loc[plan["estimated s"].isna() & (plan["to run"] > 0), "stage"].tolist()
    time = (f"estimated {estimate.sum() / 60:.1f} min for what is left" if not estimate.empty else "no estimate yet")
    missing = f" (not counting {', '.join(unknown)}: no run of that kind measured yet)" if unknown else ""
    return (f"The profile implies {int(quantize['runs'].sum())} quantizations ({int(quantize['on disk'].sum())} already on "
            f"disk) and {int(evaluate['runs'].sum())} evaluations (mteb results are reused where cached); "
            f"{time}{missing}.")
