"""Real model bytes and quantization time of every default grid point of a profile (issue 27), through
notebook 03's own code path (`colquant.research.variants`), one point after another.

    python benchmarks/frontier_grid.py params/synthetic-4b.yaml OUT [--budget-s 500] [--kinds rtn,autoscheme]

For each point (the RTN baselines, AutoScheme, the grid's auto-round points, the FP8 variants, then the
seeds' auto-round variant at the grid's seqlen): the wall time and peak memory of quantizing it
(AutoScheme: its selection and its tuning), its checkpoint's weight files, and its bytes once loaded on
the profile's device (`frontier.measure_model_bytes`, with the CUDA allocator's growth beside it). The
JSON (`frontier-grid-<profile>.json`; `colquant.research.grid_plan` reads it from benchmarks/results/ as the
profile's reference timings) is rewritten after every point, so a run stopped by its time limit keeps
what it measured; a point predicted (by the last point of its kind, tuned or not) to end after
`--budget-s` is listed as not run.
`--kinds` (of `ORDER`) splits a grid that one run's time limit cannot hold into runs that each can: their
JSON files (`frontier-grid-<profile>-<kinds>.json`) are read together as the reference. On a CPU with
`params/tiny.yaml` it checks the script in a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from colquant.quantize.calibration import build_calibration
from colquant.quantize.weight_formats import weight_format
from colquant.quantize.weight_grid import grid_settings
from colquant.research import workspace
from colquant.research.frontier import GIB, measure_model_bytes
from colquant.research.grid_plan import METHOD_STAGES
from colquant.research.params import load_profile
from colquant.research.variants import produce_fp8_variant
from colquant.research.variants import produce_grid_point, produce_variant

log = logging.getLogger("frontier_grid")
# the grid first (RTN, then the tuned points), then FP8 (seconds), then the seeds' variant (already measured
# by benchmarks/device_synthetic_4b.sh): a run cut short by its budget loses the least new
ORDER = {"rtn": 0, "seeds-rtn": 0, "autoscheme": 1, "autoround": 2, "fp8": 3, "seeds": 4}


def calibrate(profile: dict[str, Any], seqlen: int) -> None:
    """What notebook 02 does for the grid's seqlen: the calibration set and its record of the source used."""
    model, processor = workspace.load_variant(profile, workspace.base_model(profile))
    calibration = build_calibration(profile, seqlen, model, processor, workspace.corpus(profile))
    calibration.save(workspace.calibration_file(profile, seqlen))
    workspace.write_json(workspace.results_dir(profile) / f"calibration__seqlen{seqlen}.json",
                         {"source_used": calibration.source_used, "nsamples": calibration.nsamples, "seqlen": seqlen})


def points(profile: dict[str, Any]) -> list[tuple[str, Any]]:
    """(kind, what to make) in `ORDER`: RTN (the grid's and the seeds' baseline), AutoScheme, auto-round,
    FP8, then the seeds' variant."""
    made = [("fp8", kind) for kind in profile["quantization"]["fp8"]]
    made += [(point.method, point) for point in grid_settings(profile)]
    made += [("seeds-rtn", None)] if profile["quantization"]["rtn_baseline"] else []
    made.append(("seeds", None))
    return sorted(made, key=lambda item: ORDER[item[0]])


def produce(profile: dict[str, Any], kind: str, point: Any) -> dict[str, Any]:
    if kind == "fp8":
        return produce_fp8_variant(profile, point)
    if kind.startswith("seeds"):
        method = "rtn" if kind == "seeds-rtn" else "autoround"
        return produce_variant(profile, profile["quantization"]["grid"]["seqlen"], method)
    return produce_grid_point(profile, point)


def measured_row(profile: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    path = workspace.variants_dir(profile) / run["variant"]
    loaded = measure_model_bytes(profile, path)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"variant": run["variant"], "weights": weight_format(run["settings"]), "reused": run["reused"],
            "stage": METHOD_STAGES[run["settings"]["method"]],
            "quantize_s": run["wall_time_s"], "peak_gib": run["peak_memory_bytes"] / GIB, "memory_kind": run["memory_kind"],
            "selection_s": run.get("autoscheme", {}).get("selection_wall_time_s"),
            "checkpoint_gib": run["size_on_disk_bytes"] / GIB, "loaded_gib": loaded["model_bytes"] / GIB,
            "allocated_gib": None if loaded["allocated_bytes"] is None else loaded["allocated_bytes"] / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=500.0, help="stop starting points that would end after this")
    parser.add_argument("--kinds", default=",".join(ORDER), help=f"the kinds of point to make, of {', '.join(ORDER)}")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(ORDER))
    if unknown:
        parser.error(f"--kinds {args.kinds}: {', '.join(unknown)} unknown; choose from {', '.join(ORDER)}")
    name = f"frontier-grid-{{profile}}{'' if set(kinds) == set(ORDER) else '-' + '-'.join(kinds)}.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.monotonic()
    profile = load_profile(args.profile)
    seqlen = profile["quantization"]["grid"]["seqlen"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    report: dict[str, Any] = {"profile": profile["profile"], "device": device, "torch": torch.__version__,
                              "quantization": {k: v for k, v in profile["quantization"].items() if k != "export_formats"},
                              "rows": [], "not_run": []}
    calibrate(profile, seqlen)
    report["setup_s"] = round(time.monotonic() - start, 1)
    predicted = {True: 0.0, False: 0.0}  # seconds the last tuned / untuned point took, made and measured
    result = args.out / name.format(profile=profile["profile"])
    for kind, point in (item for item in points(profile) if item[0] in kinds):
        elapsed = time.monotonic() - start
        tuned = kind in ("autoscheme", "autoround", "seeds")
        if elapsed + predicted[tuned] > args.budget_s:
            why = (f"{elapsed:.0f} s spent, the last such point took {predicted[tuned]:.0f} s: it would end after the "
                   f"{args.budget_s:.0f} s budget")
            report["not_run"].append({"kind": kind, "point": str(point), "why": why})
            continue
        run = produce(profile, kind, point)
        if run["variant"] not in {row["variant"] for row in report["rows"]}:  # the seeds' W4 g128 may be a grid point
            report["rows"].append(measured_row(profile, run))
        predicted[tuned] = time.monotonic() - start - elapsed
        args.out.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps(report, indent=1))
        log.info("%s: %s", kind, report["rows"][-1])
    report["total_s"] = round(time.monotonic() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(report, indent=1))
    print(f"{'variant':<62} {'quant s':>8} {'ckpt GiB':>9} {'loaded GiB':>11}")
    for row in report["rows"]:
        print(f"{row['variant']:<62} {row['quantize_s']:>8.1f} {row['checkpoint_gib']:>9.3f} {row['loaded_gib']:>11.3f}")
    for skipped in report["not_run"]:
        print(f"not run: {skipped['kind']} {skipped['point']} ({skipped['why']})")
    print(f"{device}: setup {report['setup_s']} s, total {report['total_s']} s")


if __name__ == "__main__":
    main()
