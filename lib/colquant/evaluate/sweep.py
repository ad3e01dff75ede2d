"""Batch-size sweeps: throughput, latency and peak memory of query and page encoding, per variant.

Seed 002's argument for 4-bit is not speed at a fixed batch (there it was slower) but that the smaller
model leaves room for larger batches on a small GPU. So every row records peak memory next to
throughput, `budget_table` answers "what is the best this variant does on an N GB GPU", and
`same_batch_comparison` shows the per-batch overhead.

Workloads are synthetic but exactly sized, so numbers compare across variants and machines: queries
of exactly `query_tokens` text tokens (plus the 10 augmentation tokens), and copies of one blank page
that fills the processor's visual-token budget (compute does not depend on what the page shows).

Sweeps take long on the real model and may die half way (a device lease ends, an OOM takes the
process down), so each finished row is written at once, atomically, and a re-run skips what is done.
A row is "done" only for the inputs it was measured with (`inputs_fingerprint`: the weights, the
workload, repeats, minimum time, warm-up and device); a row measured with other inputs is measured again.

Each batch is timed the way `colquant.deploy.bench` times it (`benchmarks/sweep_vs_bench.py` compares the
two): inputs built and on the device before the clock starts, a warm-up call (which also captures the
query CUDA graphs), then at least `repeats` calls and more until `min_time_s` has passed, throughput
from the median call. A mean over three calls let one slow call (a clock ramp, a GC pause) move a
row by half, so the notebook disagreed with the bench for no reason in the model.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm
from transformers import BatchFeature

from colquant.basics.files import fingerprint, write_text
from colquant.basics.measure import MIB, call_times, memory_kind, peak_memory, reset_peak_memory
from colquant.evaluate.plots import hue_style, legend_outside
from colquant.retriever.checkpoint_files import checkpoint_fingerprint
from colquant.retriever.processing import PIXELS_PER_VISUAL_TOKEN, QUERY_AUGMENTATION_TOKENS

KINDS = ("query", "page")
FINISHED = ("ok", "oom")  # statuses a re-run keeps; `skipped_after_oom` rows are re-decided
OOM_MARKERS = ("out of memory", "can't allocate memory")  # CUDA / CPU allocator messages
MIN_TIME_S = 0.5  # seconds of timed calls per row at least, as the bench's profiles (bench.min_time_s)
QUERY_FILLER = "page "  # one token per word for Qwen's BPE, one per byte for the tiny tokenizer
COLUMNS = [
    "variant", "kind", "batch_size", "status", "tokens_per_item", "items_per_s", "tokens_per_s",
    "latency_mean_ms", "latency_p50_ms", "peak_memory_mib", "peak_reserved_mib", "peak_increase_mib",
    "memory_kind", "repeats", "timed_calls", "min_time_s", "warmup", "device", "device_name", "error", "measured_at",
    "inputs_fingerprint",
]


# --- workloads ------------------------------------------------------------------------------------


def synthetic_queries(processor: Any, batch_size: int, query_tokens: int) -> BatchFeature:
    """`batch_size` identical queries of exactly `query_tokens` text tokens, no padding."""
    tokenizer = processor.tokenizer
    ids = tokenizer(QUERY_FILLER * query_tokens, add_special_tokens=False)["input_ids"][:query_tokens]
    batch = processor.process_queries([tokenizer.decode(ids)] * batch_size)
    lengths = batch["attention_mask"].sum(dim=1)
    expected = query_tokens + QUERY_AUGMENTATION_TOKENS
    if not bool((lengths == expected).all()):
        raise ValueError(
            f"synthetic query has {lengths[0].item()} tokens, expected {query_tokens} + "
            f"{QUERY_AUGMENTATION_TOKENS} augmentation: this tokenizer does not split {QUERY_FILLER!r} as assumed"
        )
    return batch


def synthetic_page(max_num_visual_tokens: int) -> Image.Image:
    """A blank portrait (4:5) page whose area is the visual-token budget, in whole 32-pixel tokens.

    For the 4B's budget of 1280 this is 1024x1280 pixels, exactly 1280 visual tokens, as in
    DESIGN.md §5's page baseline.
    """
    columns = max(2, math.isqrt(max_num_visual_tokens * 4 // 5))
    rows = max(2, max_num_visual_tokens // columns)
    side = int(math.sqrt(PIXELS_PER_VISUAL_TOKEN))
    return Image.new("RGB", (columns * side, rows * side), "white")


def build_batch(processor: Any, kind: str, batch_size: int, query_tokens: int, page: Image.Image) -> BatchFeature:
    if kind == "query":
        return synthetic_queries(processor, batch_size, query_tokens)
    return processor.process_images([page] * batch_size)


def encode_batch(model: torch.nn.Module, batch: BatchFeature) -> torch.Tensor:
    """The step that is timed: one forward pass to embeddings."""
    with torch.inference_mode():
        return model(**batch).embeddings


# --- measuring one batch size ---------------------------------------------------------------------


def _peak_memory(device: torch.device, in_use_before: int) -> dict[str, Any]:
    peak, reserved = peak_memory(device)
    return {
        "peak_memory_mib": peak / MIB,
        "peak_reserved_mib": reserved / MIB if reserved is not None else None,
        "peak_increase_mib": (peak - in_use_before) / MIB,
        "memory_kind": memory_kind(device),
    }


def measure(
    model: torch.nn.Module, batch: BatchFeature, *, repeats: int, warmup: int, device: torch.device,
    min_time_s: float = 0.0,
) -> dict[str, Any]:
    """Latency, throughput and peak memory of encoding one batch.

    At least `repeats` timed calls, and more until `min_time_s` of them have passed (at most
    `measure.MAX_TIMED_CALLS`); `items_per_s` and `tokens_per_s` from the median call, as the bench reports.

    Peak memory covers warm-up and timed runs and includes the weights (`peak_memory_mib`: what a
    GPU of a given size must hold; `cuda_allocated` excludes the CUDA context, ~0.5 GiB) and what this
    batch added on top (`peak_increase_mib`: activations and workspaces).
    """
    # No gc.collect before a batch (~0.4 s each): the previous batch's tensors are freed by reference
    # counting; only after an OOM do reference cycles hold memory, and `_release_memory` collects them.
    in_use = reset_peak_memory(device)
    batch = batch.to(device)
    for _ in range(warmup):
        encode_batch(model, batch)
    latencies = call_times(lambda: encode_batch(model, batch), device, calls=repeats, min_time_s=min_time_s)
    batch_size = batch["input_ids"].shape[0]
    tokens = int(batch["attention_mask"].sum())
    median = float(np.median(latencies))
    return {
        "items_per_s": batch_size / median,
        "tokens_per_s": tokens / median,
        "latency_mean_ms": 1e3 * float(np.mean(latencies)),
        "latency_p50_ms": 1e3 * median,
        "timed_calls": len(latencies),
        **_peak_memory(device, in_use),
    }


def _is_oom(error: RuntimeError) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(m in str(error).lower() for m in OOM_MARKERS)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the results file -----------------------------------------------------------------------------


def load_results(path: str | Path) -> pd.DataFrame:
    """All rows of a results file (JSON lines), in the sweep's column order; empty if none yet."""
    return pd.DataFrame(_read_rows(Path(path)), columns=COLUMNS)


def devices_of(path: str | Path) -> dict[tuple[str, str], str]:
    """(variant, kind) -> the device its finished rows were measured on (`device_name`), for whoever
    quotes a speed: a figure is only meaningful with the machine (and the code path) that produced it."""
    return {(row["variant"], row["kind"]): row["device_name"] for row in _read_rows(Path(path)) if row["status"] == "ok"}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace the whole file atomically: readers (and a resumed run) never see half a row."""
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    write_text(path, text)


def _key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["variant"], row["kind"], row["batch_size"]


def _upsert(path: Path, row: dict[str, Any]) -> None:
    rows = [r for r in _read_rows(path) if _key(r) != _key(row)]
    _write_rows(path, rows + [row])


# --- the sweep ------------------------------------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _row(variant: str, kind: str, batch_size: int, status: str, **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(variant=variant, kind=kind, batch_size=batch_size, status=status, **values)
    row["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def _finished_rows(path: Path, variant: str, kind: str, inputs: str) -> dict[int, dict[str, Any]]:
    """Rows of this (variant, kind) a re-run keeps, by batch size: finished ones measured with the same inputs."""
    return {
        row["batch_size"]: row
        for row in _read_rows(path)
        if row["variant"] == variant and row["kind"] == kind and row["status"] in FINISHED
        and row.get("inputs_fingerprint") == inputs
    }


def run_sweep(
    variant_name: str,
    model: torch.nn.Module,
    processor: Any,
    *,
    kind: str,
    batch_sizes: Sequence[int],
    query_tokens: int,
    repeats: int,
    results_path: str | Path,
    device: str | torch.device,
    weights_fingerprint: str,
    warmup: int = 1,
    page_image: Image.Image | None = None,
    min_time_s: float = MIN_TIME_S,
) -> pd.DataFrame:
    """Measure `kind` ('query' or 'page') encoding at each batch size (ascending); return this sweep's rows.

    Each row goes into `results_path` (JSON lines, the whole file replaced atomically) as soon as it
    is measured, replacing an older row of the same (variant, kind, batch size). Rows already there
    with status 'ok' or 'oom' for (variant, kind, batch size) and the same inputs (the weights'
    `weights_fingerprint`, e.g. `checkpoint_files.checkpoint_fingerprint`, the workload, repeats,
    `min_time_s`, warm-up, device, dtype) are reused, not re-measured; rows measured with other inputs are replaced. An
    out-of-memory batch becomes an 'oom' row and every larger size a 'skipped_after_oom' row; any
    other error propagates. `model` must already be on `device`; `page_image` defaults to
    `synthetic_page` at the processor's visual-token budget.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if not batch_sizes or min(batch_sizes) < 1 or repeats < 1 or warmup < 0 or min_time_s < 0:
        raise ValueError(f"need batch sizes >= 1, repeats >= 1, warmup >= 0, min_time_s >= 0; got {batch_sizes}, "
                         f"{repeats}, {warmup}, {min_time_s}")
    device, path = torch.device(device), Path(results_path)
    page = page_image if page_image is not None else synthetic_page(processor.max_num_visual_tokens)
    tokens_per_item = int(build_batch(processor, kind, 1, query_tokens, page)["attention_mask"].sum())
    context = dict(
        tokens_per_item=tokens_per_item, repeats=repeats, min_time_s=min_time_s, warmup=warmup,
        device=str(device), device_name=_device_name(device),
    )
    inputs = fingerprint(weights_fingerprint, str(next(model.parameters()).dtype), page.size, context)
    context["inputs_fingerprint"] = inputs
    finished = _finished_rows(path, variant_name, kind, inputs)
    rows, oom_seen = [], False
    for batch_size in tqdm(sorted(set(batch_sizes)), desc=f"{variant_name} {kind} sweep", leave=False):
        if batch_size in finished:
            row = finished[batch_size]
        elif oom_seen:
            row = _row(variant_name, kind, batch_size, "skipped_after_oom", **context)
            _upsert(path, row)
        else:
            row = _measure_row(variant_name, model, processor, kind, batch_size, query_tokens, page, context)
            _upsert(path, row)
        oom_seen = oom_seen or row["status"] == "oom"
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _measure_row(
    variant: str, model: torch.nn.Module, processor: Any, kind: str, batch_size: int,
    query_tokens: int, page: Image.Image, context: dict[str, Any],
) -> dict[str, Any]:
    device = torch.device(context["device"])
    try:
        batch = build_batch(processor, kind, batch_size, query_tokens, page)
        values = measure(model, batch, repeats=context["repeats"], warmup=context["warmup"], device=device,
                         min_time_s=context["min_time_s"])
        return _row(variant, kind, batch_size, "ok", **context, **values)
    except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_oom(error):
            raise
        message = str(error).splitlines()[0][:300]
    # Outside the handler: the traceback, and the activations its frames hold, are gone by now.
    _release_memory(device)
    return _row(variant, kind, batch_size, "oom", error=message, **context)


# --- tables ---------------------------------------------------------------------------------------


def budget_table(
    results: pd.DataFrame,
    budgets_gb: Sequence[float],
    *,
    baseline: str | None = "bf16",
    memory_column: str = "peak_memory_mib",
) -> pd.DataFrame:
    """Seed 002's "memory-constrained scenarios": per budget, variant and kind, the best batch that fits.

    Best = highest items/s among 'ok' rows whose peak memory (MiB; budgets in GiB) fits the budget.
    `fit` is 'fits' or 'does not fit' (then the measurements are empty and `smallest_peak_mib` says
    by how much it misses). `vs_baseline` is the throughput ratio to the baseline under the same
    budget, empty where either does not fit (no column with `baseline=None`). Peak memory excludes the
    CUDA context, so leave ~0.5 GiB.
    """
    ok = results[results["status"] == "ok"]
    if ok.empty:
        raise ValueError("no 'ok' rows: nothing was measured")
    if baseline is not None and baseline not in set(ok["variant"]):
        raise ValueError(f"no 'ok' rows for baseline {baseline!r}; variants: {sorted(set(ok['variant']))}")
    rows = []
    for budget in budgets_gb:
        for (variant, kind, measured_as), group in ok.groupby(["variant", "kind", "memory_kind"], sort=False):
            fitting = group[group[memory_column] <= budget * 1024]
            row = {"budget_gb": budget, "variant": variant, "kind": kind, "memory_kind": measured_as,
                   "smallest_peak_mib": group[memory_column].min()}
            if fitting.empty:
                row.update(fit="does not fit", batch_size=pd.NA, items_per_s=np.nan, peak_memory_mib=np.nan)
            else:
                best = fitting.loc[fitting["items_per_s"].idxmax()]
                row.update(fit="fits", batch_size=int(best["batch_size"]), items_per_s=best["items_per_s"],
                           peak_memory_mib=best[memory_column])
            rows.append(row)
    columns = ["budget_gb", "variant", "kind", "fit", "batch_size", "items_per_s", "peak_memory_mib",
               "smallest_peak_mib", "memory_kind"]
    table = pd.DataFrame(rows, columns=columns).astype({"batch_size": "Int64"})
    if baseline is None:
        return table
    base = table[table["variant"] == baseline].set_index(["budget_gb", "kind"])["items_per_s"]
    table["vs_baseline"] = table["items_per_s"].to_numpy() / base.reindex(
        pd.MultiIndex.from_frame(table[["budget_gb", "kind"]])).to_numpy()
    return table


def same_batch_comparison(results: pd.DataFrame, baseline: str = "bf16") -> pd.DataFrame:
    """Seed 002's "detailed comparison at same batch size": items/s per variant and ratio to the baseline.

    One row per (kind, batch size); `<variant>_items_per_s` and `<variant>_vs_<baseline>` columns.
    A ratio of 0.49 is seed 002's "-51%". Empty cells: that variant has no 'ok' row at that size.
    """
    ok = results[results["status"] == "ok"]
    if baseline not in set(ok["variant"]):
        raise ValueError(f"no 'ok' rows for baseline {baseline!r}; variants: {sorted(set(ok['variant']))}")
    wide = ok.pivot(index=["kind", "batch_size"], columns="variant", values="items_per_s")
    variants = [baseline] + [v for v in wide.columns if v != baseline]
    table = wide[variants].add_suffix("_items_per_s")
    for variant in variants[1:]:
        table[f"{variant}_vs_{baseline}"] = wide[variant] / wide[baseline]
    table.columns.name = None
    return table.reset_index()


# --- plots ----------------------------------------------------------------------------------------


def plot_throughput(results: pd.DataFrame, *, palette: Mapping[str, Any] | None = None) -> Figure:
    """Items/s against batch size (log2), one line per variant, queries and pages side by side."""
    ok = results[results["status"] == "ok"]
    kinds = [k for k in KINDS if k in set(ok["kind"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sns.lineplot(data=ok[ok["kind"] == kind], x="batch_size", y="items_per_s", hue="variant", marker="o", ax=ax,
                     **hue_style(ok["variant"], palette))
        ax.set_xscale("log", base=2)
        ax.set(title=f"{kind} encoding", xlabel="batch size", ylabel="items / s")
    legend_outside(axes[0])
    fig.tight_layout()
    return fig


def plot_memory(results: pd.DataFrame, budgets_gb: Sequence[float], *,
                palette: Mapping[str, Any] | None = None) -> Figure:
    """Peak memory (GiB) against batch size (log2) per variant, with the budgets as horizontal lines.

    The y axis is the data's: only budgets inside the measured range are drawn (a 0.4 GiB curve
    under an 80 GB line would be flat at zero); when every peak is below the smallest budget, the
    panel says so instead.
    """
    ok = results[results["status"] == "ok"].assign(peak_memory_gib=lambda d: d["peak_memory_mib"] / 1024)
    kinds = [k for k in KINDS if k in set(ok["kind"])]
    highest = ok["peak_memory_gib"].max()
    shown = [b for b in sorted(budgets_gb) if b <= highest * 1.1]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sns.lineplot(data=ok[ok["kind"] == kind], x="batch_size", y="peak_memory_gib", hue="variant", marker="o", ax=ax,
                     **hue_style(ok["variant"], palette))
        for budget in shown:
            ax.axhline(budget, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"{budget:g} GB", (0, budget), xycoords=("axes fraction", "data"), fontsize=8,
                        color="grey", va="bottom")
        if not shown:
            ax.annotate(f"all peaks below the smallest budget ({min(budgets_gb):g} GB)", (0.5, -0.3),
                        xycoords="axes fraction", fontsize=8, color="grey", ha="center", va="top")
        ax.set_xscale("log", base=2)
        ax.set(title=f"{kind} encoding", xlabel="batch size", ylabel="peak memory (GiB)")
    legend_outside(axes[0])
    fig.tight_layout()
    return fig


def sweep_variants(
    variants: Mapping[str, Any],
    load: Callable[[Any], tuple[torch.nn.Module, Any]],
    *,
    query_batch_sizes: Sequence[int],
    page_batch_sizes: Sequence[int],
    query_tokens: int,
    repeats: int,
    results_path: str | Path,
    device: str | torch.device,
    min_time_s: float = MIN_TIME_S,
) -> pd.DataFrame:
    """Sweep queries and pages for each variant in turn, one model in memory at a time; return the
    rows of these variants (rows of others in the file, e.g. of a seqlen since removed, are left out).

    `variants` maps names to checkpoint directories (their content fingerprint keys the rows). Peak memory is measured from whatever is allocated when a batch starts, so the previous
    variant (its weights, CUDA graphs and their memory pools) must be gone before the next is
    loaded; otherwise a 4-bit model would be charged for the BF16 model before it.
    """
    for name, checkpoint in variants.items():
        weights = checkpoint_fingerprint(checkpoint)
        model, processor = load(checkpoint)
        for kind, sizes in (("query", query_batch_sizes), ("page", page_batch_sizes)):
            run_sweep(name, model, processor, kind=kind, batch_sizes=sizes, query_tokens=query_tokens,
                      repeats=repeats, results_path=results_path, device=device, weights_fingerprint=weights,
                      min_time_s=min_time_s)
        release_model(model)
        del model, processor
        _release_memory(torch.device(device))
    results = load_results(results_path)
    return results[results["variant"].isin(list(variants))].reset_index(drop=True)


def release_model(model: torch.nn.Module) -> None:
    """Drop what keeps a model's GPU memory alive beyond its last reference: captured CUDA graphs."""
    if getattr(model, "_colquant_acceleration", None) is not None:
        from colquant.kernels import reset_graphs

        reset_graphs(model)
