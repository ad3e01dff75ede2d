"""Notebook 06's sweep against `colquant bench`: the same precision, work and batch timed both ways.

Issue 10 asks that the sweep (models loaded by `colquant.load`, timed by `colquant.evaluate.sweep`) agree with
the bench within 5% at the same batch. For each precision (BF16, then 4-bit) this loads the model the
bench's way (`bench.load_model` + `bench.PREPARE[precision]`) and times query batches and one page
batch with `Bench.queries`/`Bench.pages`; then, back to back, loads it the notebook's way
(`workspace.load_variant`, i.e. `colquant.load` with its defaults) and times the same batches with
`sweep.run_sweep`, exactly as notebook 06 calls it (its repeats, warm-up and minimum time). Each row
gives both throughputs, their ratio (sweep / bench), both peak memories and both token counts.

The notebook's 4-bit model is a 4-bit checkpoint (`--w4-checkpoint`, default: the workspace's first
finished auto-round variant). Without one (the synthetic profiles before notebook 03 has run) its
sweep rows time the bench's RTN model instead, loaded through `workspace.load_variant`: the log says
so and the JSON records it under `models`, so such a row compares the two timing methods only.

Usage (the table is logged last; the JSON holds every row):
    python benchmarks/sweep_vs_bench.py --profile synthetic-4b --out benchmarks/results/sweep-vs-bench-h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from colquant.basics.files import write_text
from colquant.deploy import bench
from colquant.evaluate import sweep
from colquant.research import workspace
from colquant.retriever.checkpoint import resolve_device

logger = logging.getLogger("colquant.sweep_vs_bench")
PRECISIONS = ("bf16", "w4a16")
AGREEMENT = 0.05  # issue 10: the sweep within 5% of the bench at the same batch
TABLE_COLUMNS = ["precision", "work", "batch", "bench_per_s", "sweep_per_s", "ratio", "agrees", "bench_peak_mib",
                 "sweep_peak_mib", "mem_ratio", "bench_tokens", "sweep_tokens"]


def free_memory(device: torch.device) -> None:
    """Before each load: the previous model (its fused forward is a reference cycle) is collected, so
    the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_settings(profile: dict, device: torch.device, query_batches: list[int], page_batch: int) -> dict:
    """The profile's bench settings narrowed to these batches, pages from tensors only, with the vision
    tower `colquant.load` installs on this device (the fast one on CUDA)."""
    return dict(profile["bench"], query_batches=query_batches, page_batches=[page_batch], end_to_end_batches=0,
                vision=["fast" if device.type == "cuda" else "eager"])


def time_bench(profile: dict, device: torch.device, precision: str, settings: dict) -> list[dict]:
    """The bench's way: `bench.load_model`, the precision's PREPARE, `Bench.queries` and `Bench.pages`."""
    model, processor = bench.load_model(profile, device)
    bench.PREPARE[precision](model, profile)
    runner = bench.Bench(dict(profile, bench=settings), device)
    runner.queries(model, processor, precision)
    runner.pages(model, processor, precision)
    sweep.release_model(model)
    for row in runner.rows:
        if "error" in row:
            logger.warning("bench %s %s: %s", precision, row.get("work"), row["error"])
    return [row for row in runner.rows if "error" not in row and row["work"] in sweep.KINDS]


def w4_checkpoint(profile: dict, given: str | None) -> Path | None:
    """The notebook's 4-bit model: the one given, else the workspace's first finished auto-round
    variant (FP8 variants are another precision), else None."""
    if given is not None:
        return Path(given)
    autoround = {workspace.autoround_variant(profile, seqlen) for seqlen in profile["calibration"]["seqlens"]}
    found = [path for name, path in workspace.quantized_variants(profile).items() if name in autoround]
    return found[0] if found else None


def notebook_model(profile: dict, precision: str, checkpoint: Path | None) -> tuple[Any, Any, str, str]:
    """(model, processor, weights fingerprint, what was loaded) as notebook 06 loads the variant."""
    base = workspace.base_model(profile)
    if precision == "bf16":
        model, processor = workspace.load_variant(profile, base)
        return model, processor, workspace.checkpoint_fingerprint(base), f"colquant.load({base})"
    if checkpoint is not None:
        model, processor = workspace.load_variant(profile, checkpoint)
        return model, processor, workspace.checkpoint_fingerprint(checkpoint), f"colquant.load({checkpoint})"
    logger.warning("no 4-bit checkpoint (pass --w4-checkpoint or run notebook 03): the sweep's w4a16 rows time "
                   "the bench's RTN model, loaded by workspace.load_variant; they compare the timing methods only")
    model, processor = workspace.load_variant(profile, base, accelerate=False)
    bench.PREPARE[precision](model, profile)
    return (model, processor, "rtn:" + workspace.checkpoint_fingerprint(base),
            f"colquant.load({base}, accelerate=False) + bench.PREPARE['{precision}'] (no 4-bit checkpoint)")


def time_sweep(profile: dict, device: torch.device, precision: str, checkpoint: Path | None,
               query_batches: list[int], page_batch: int, query_tokens: int) -> tuple[pd.DataFrame, str, Any]:
    """The notebook's way: its loading, then `sweep.run_sweep` per kind, into a fresh results file
    (so nothing is reused from an earlier run)."""
    model, processor, weights, loaded = notebook_model(profile, precision, checkpoint)
    vision = (getattr(model, "_colquant_acceleration", None) or {}).get("vision")
    settings = profile["sweep"]
    frames = []
    with tempfile.TemporaryDirectory() as scratch:
        for kind, sizes in (("query", query_batches), ("page", [page_batch])):
            frames.append(sweep.run_sweep(precision, model, processor, kind=kind, batch_sizes=sizes,
                                          query_tokens=query_tokens, repeats=settings["repeats"],
                                          results_path=Path(scratch) / "sweep.jsonl", device=device,
                                          weights_fingerprint=weights, min_time_s=sweep.MIN_TIME_S))
    sweep.release_model(model)
    return pd.concat(frames, ignore_index=True), loaded, vision


def paired_rows(precision: str, bench_rows: list[dict], sweep_rows: pd.DataFrame) -> list[dict]:
    """One row per (work, batch) both methods timed: throughputs, their ratio, memories, token counts."""
    timed = {(row["work"], row["batch"]): row for row in bench_rows}
    out = []
    for row in sweep_rows.to_dict(orient="records"):
        if row["status"] != "ok":
            logger.warning("sweep %s %s batch %d: %s %s", precision, row["kind"], row["batch_size"], row["status"],
                           row["error"] or "")
            continue
        b = timed.get((row["kind"], row["batch_size"]))
        if b is None:
            logger.warning("%s %s batch %d: the bench did not time it (see its error above); no ratio",
                           precision, row["kind"], row["batch_size"])
            continue
        ratio = row["items_per_s"] / b["items_per_s"]
        out.append(dict(
            precision=precision, work=row["kind"], batch=row["batch_size"], bench_ms=b["ms"],
            sweep_ms=row["latency_p50_ms"], bench_per_s=b["items_per_s"], sweep_per_s=row["items_per_s"],
            ratio=ratio, agrees=abs(ratio - 1) <= AGREEMENT, bench_peak_mib=b["peak_mib"],
            sweep_peak_mib=row["peak_memory_mib"], mem_ratio=row["peak_memory_mib"] / b["peak_mib"],
            bench_tokens=b["tokens_per_item"], sweep_tokens=row["tokens_per_item"], bench_calls=b["reps"],
            sweep_calls=row["timed_calls"]))
    return out


def compare(profile: dict, device: torch.device, query_batches: list[int], page_batch: int,
            w4: str | None) -> dict:
    """Both methods for each precision, back to back; the report the JSON holds."""
    settings = bench_settings(profile, device, query_batches, page_batch)
    checkpoint = w4_checkpoint(profile, w4)
    rows, models = [], {}
    for precision in PRECISIONS:
        free_memory(device)
        bench_rows = time_bench(profile, device, precision, settings)
        free_memory(device)
        sweep_rows, loaded, vision = time_sweep(profile, device, precision, checkpoint, query_batches, page_batch,
                                                settings["query_tokens"])
        models[precision] = dict(bench=f"bench.load_model + bench.PREPARE['{precision}']", sweep=loaded,
                                 sweep_vision=vision)
        rows += paired_rows(precision, bench_rows, sweep_rows)
    return dict(profile=profile["profile"], device=str(device), device_name=sweep._device_name(device),
                query_tokens=settings["query_tokens"], bench_reps=settings["reps"],
                bench_min_time_s=settings["min_time_s"], sweep_repeats=profile["sweep"]["repeats"],
                sweep_min_time_s=sweep.MIN_TIME_S, agreement=AGREEMENT, models=models, rows=rows,
                all_agree=bool(rows) and all(row["agrees"] for row in rows))


def main(argv: list[str] | None = None) -> int:
    from colquant.__main__ import profile_file, show_package_logs
    from colquant.research.params import load_profile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="synthetic-4b", help="a profile name from params/ or a YAML path")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/sweep-vs-bench-<profile>.json)")
    parser.add_argument("--device", default=None, help="default: the profile's model.device")
    parser.add_argument("--query-batches", default="1,8,64", help="comma list of query batch sizes")
    parser.add_argument("--page-batch", type=int, default=1)
    parser.add_argument("--w4-checkpoint", default=None, help="the 4-bit checkpoint notebook 06 would sweep")
    args = parser.parse_args(argv)
    show_package_logs()
    profile = load_profile(profile_file(args.profile), check_device=args.device is None)
    device = resolve_device(args.device or profile["model"]["device"])
    profile["model"]["device"] = str(device)  # both methods on the same device
    report = compare(profile, device, [int(b) for b in args.query_batches.split(",") if b], args.page_batch,
                     args.w4_checkpoint)
    out = Path(args.out or f"benchmarks/results/sweep-vs-bench-{profile['profile']}.json")
    write_text(out, json.dumps(report, indent=1, default=str) + "\n")
    table = pd.DataFrame(report["rows"], columns=TABLE_COLUMNS)
    logger.info("%s on %s, %s; sweep/bench throughput within %.0f%% everywhere: %s\n%s", report["profile"],
                report["device_name"], out, 100 * AGREEMENT, report["all_agree"],
                table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
