"""Named metrics: the contract between the notebooks that measure and the report and tests that read.

A notebook records a metric by its definition here (`metrics.record(results_dir, metrics.NDCG_AT_5,
{"bf16": 0.83, ...})`) into `results/metrics.json`; REPORT.md's headline and the tests read it back
by the same definition (`metrics.values(results_dir, metrics.NDCG_AT_5)`). A metric's name, the
labels that index it and the notebook that records it are written once, here, so neither side spells
a file name or a column name of the other (the recommenders pattern of `sb.glue` / `read_notebook`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colquant.basics import files

METRICS_FILE = "metrics.json"
FIX = "delete it and re-run the notebooks that record metrics (or `python -m colquant run <profile>`)"


@dataclass(frozen=True)
class Metric:
    """One named value a notebook measures, indexed by `labels` (e.g. per variant)."""

    name: str
    description: str
    notebook: str
    labels: tuple[str, ...] = ()

    def key(self, label_values: Any) -> tuple[str, ...]:
        """The label values as a tuple, checked against the metric's labels."""
        values = label_values if isinstance(label_values, tuple) else (label_values,)
        if len(values) != len(self.labels):
            raise ValueError(f"metric {self.name!r} is indexed by {self.labels}; got {label_values!r}")
        return tuple(str(value) for value in values)


NDCG_AT_5 = Metric("ndcg_at_5", "mean NDCG@5 over the evaluation tasks, main scoring mode", "05_vidore_eval",
                   ("variant",))
TASKS_EVALUATED = Metric("tasks_evaluated", "number of (task, subset) pairs behind NDCG@5", "05_vidore_eval",
                         ("variant",))
TOKEN_COSINE = Metric("token_cosine_mean", "mean per-token cosine to BF16", "04_embedding_fidelity",
                      ("variant", "kind"))
TOP5_OVERLAP = Metric("top5_overlap", "mean overlap of each query's top-5 pages with BF16's", "04_embedding_fidelity",
                      ("variant",))
FIDELITY_PASSES = Metric("fidelity_passes", "1 when token cosine > 0.95 for queries and pages and no NaN/Inf",
                         "04_embedding_fidelity", ("variant",))
REFERENCE_BATCH = Metric("reference_batch_size", "largest batch size every variant encoded without running out "
                         "of memory (the batch the next two metrics compare at)", "06_memory_sweep", ("kind",))
PEAK_MEMORY_MIB = Metric("peak_memory_mib", "peak memory while encoding at the reference batch size",
                         "06_memory_sweep", ("variant", "kind"))
ITEMS_PER_S = Metric("items_per_s", "encoding throughput at the reference batch size", "06_memory_sweep",
                     ("variant", "kind"))
INDEX_BYTES_PER_PAGE = Metric("index_bytes_per_page", "stored bytes per page of the page index",
                              "07_index_compression", ("variant", "setting"))
INDEX_NDCG_AT_5 = Metric("index_ndcg_at_5", "mean NDCG@5 with the compressed page index", "07_index_compression",
                         ("variant", "setting"))

MODEL_BYTES = Metric("model_bytes", "bytes of the variant's tensors once loaded on the profile's device (measured)",
                     "08_frontier", ("variant",))
GRID_RUNS = Metric("grid_runs", "runs the profile's variants imply, by stage (quantize / evaluate)", "08_frontier",
                   ("stage",))
FRONTIER_PICK_NDCG = Metric("frontier_pick_ndcg_at_5", "NDCG@5 of the best (weights, index) pair that fits the memory "
                            "budget for a corpus of that many pages", "08_frontier",
                            ("budget_gb", "pages", "variant", "setting"))
FRONTIER_PICK_GIB = Metric("frontier_pick_total_gib", "model + index GiB of that pair", "08_frontier",
                           ("budget_gb", "pages", "variant", "setting"))

REGISTRY: dict[str, Metric] = {metric.name: metric for metric in (
    NDCG_AT_5, TASKS_EVALUATED, TOKEN_COSINE, TOP5_OVERLAP, FIDELITY_PASSES, REFERENCE_BATCH, PEAK_MEMORY_MIB,
    ITEMS_PER_S, INDEX_BYTES_PER_PAGE, INDEX_NDCG_AT_5, MODEL_BYTES, GRID_RUNS, FRONTIER_PICK_NDCG, FRONTIER_PICK_GIB)}


def _registered(metric: Metric) -> Metric:
    if REGISTRY.get(metric.name) != metric:
        raise ValueError(f"{metric.name!r} is not a registered metric; define it once in colquant.evaluate.metrics "
                         f"(known: {', '.join(sorted(REGISTRY))})")
    return metric


def _number(value: Any, where: str) -> float | None:
    """A finite float, or None for a missing or NaN value (JSON has no NaN; None reads back as missing)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a number") from None
    return None if math.isnan(number) else number


def read(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Everything recorded so far: per metric name, rows of its labels and `value`."""
    path = Path(results_dir) / METRICS_FILE
    return files.read_json(path, FIX) if path.exists() else {}


def record(results_dir: Path, metric: Metric, values: Mapping[Any, Any] | float | None) -> Path:
    """Record `metric` for every label value at once, replacing what an earlier run recorded for it.

    `values` maps a label value (a tuple for several labels) to a number; a metric without labels
    takes one number. Replacing, not merging: a variant dropped from the profile leaves the metric
    when the notebook next runs. NaN is stored as null, read back as missing, never as a value.
    """
    _registered(metric)
    if not metric.labels:
        rows = [{"value": _number(values, metric.name)}]
    elif not isinstance(values, Mapping):
        raise ValueError(f"metric {metric.name!r} is indexed by {metric.labels}: pass a mapping of "
                         f"{'/'.join(metric.labels)} to values, not {type(values).__name__}")
    else:
        rows = [{**dict(zip(metric.labels, metric.key(labels))), "value": _number(value, f"{metric.name}[{labels}]")}
                for labels, value in values.items()]
    recorded = read(results_dir)
    recorded[metric.name] = rows
    return files.write_json(Path(results_dir) / METRICS_FILE, recorded)


def values(results_dir: Path | Mapping[str, list[dict[str, Any]]], metric: Metric) -> dict[Any, float]:
    """The recorded values of `metric`, keyed like `record`'s input; missing and NaN values left out.

    `results_dir` may also be what `read` returned, to read several metrics from one snapshot.
    """
    _registered(metric)
    recorded = results_dir if isinstance(results_dir, Mapping) else read(results_dir)
    known: dict[Any, float] = {}
    for row in recorded.get(metric.name, []):
        if row.get("value") is None:
            continue
        labels = tuple(row[label] for label in metric.labels)
        known[labels[0] if len(labels) == 1 else labels] = float(row["value"])
    return known
