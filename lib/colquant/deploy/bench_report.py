"""The benchmark's tables: every precision beside BF16 in the same run, pages from tensors beside pages
from PIL images, and the profile's targets (absolute rates, or a precision's ratio to BF16 at one batch)
checked against the measured rows (`colquant.deploy.bench` produces the rows)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


SUMMARY_COLUMNS = ["precision", "work", "batch", "bf16_ms", "bf16_per_s", "bf16_peak_mib", "ms", "per_s", "peak_mib",
                   "thr_ratio", "mem_ratio"]
BASELINE = "bf16"


def summary(rows: list[dict]):
    """Each precision beside BF16 for every (work, batch) both timed in this run (pages with the fast
    vision tower where it was timed): throughput and memory ratios last. Only pairs from one run are
    ratios worth quoting, so nothing is compared across runs here."""
    import pandas as pd

    vision = "fast" if any(r.get("vision") == "fast" and "error" not in r for r in rows) else "eager"
    timed = {(r["precision"], r["work"], r["batch"]): r for r in rows if "error" not in r
             and r["work"] in ("query", "page") and r.get("vision", vision) == vision}
    out = []
    for (precision, work, batch), q in timed.items():
        b = timed.get((BASELINE, work, batch))
        if precision != BASELINE and b is not None:
            out.append(dict(precision=precision, work=work, batch=batch, bf16_ms=b["ms"], bf16_per_s=b["items_per_s"],
                            bf16_peak_mib=b["peak_mib"], ms=q["ms"], per_s=q["items_per_s"], peak_mib=q["peak_mib"],
                            thr_ratio=q["items_per_s"] / b["items_per_s"], mem_ratio=q["peak_mib"] / b["peak_mib"]))
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


FP8_DEFAULT = ("fp8-lm", "fp8-all")
TARGETS: dict[str, Callable[[list[dict]], float]] = {
    "bf16_pages_per_s": lambda rows: max(r["items_per_s"] for r in rows if r["precision"] == "bf16"
                                         and r["work"] == "page"),
    "bf16_queries_per_s": lambda rows: max(r["items_per_s"] for r in rows if r["precision"] == "bf16"
                                           and r["work"] == "query"),
    "end_to_end_over_tensors_ratio_min": lambda rows: min(r["over_tensors"] for r in rows if "over_tensors" in r),
    # the FP8 variants as `colquant.load` gives them (default accumulation), not the `-precise` rows
    "fp8_pages_per_s": lambda rows: max(r["items_per_s"] for r in rows if r["precision"] in FP8_DEFAULT
                                        and r["work"] == "page"),
    "fp8_queries_per_s": lambda rows: max(r["items_per_s"] for r in rows if r["precision"] in FP8_DEFAULT
                                          and r["work"] == "query"),
}


# "<precision> <thr|mem>_ratio <query|page> <batch>": a precision against BF16 at one batch of this run,
# e.g. "w4a8 thr_ratio query 1024" (throughput: at least the target) or "w4a8 mem_ratio query 64" (peak: at most)
RATIO_TARGET = re.compile(r"(?P<precision>[\w-]+) (?P<ratio>thr|mem)_ratio (?P<work>query|page) (?P<batch>\d+)")


def check_targets(targets: dict[str, float]) -> None:
    """Refuse a target name neither form knows, before a bench run spends its time."""
    unknown = sorted(name for name in targets if name not in TARGETS and not RATIO_TARGET.fullmatch(name))
    if unknown:
        raise ValueError(f"bench.targets: unknown {unknown}; known: {', '.join(TARGETS)}, or "
                         "'<precision> <thr|mem>_ratio <query|page> <batch>' (e.g. 'w4a8 thr_ratio query 1024')")


def targets_met(rows: list[dict], targets: dict[str, float]) -> dict:
    """Each profile target's measured value and whether it is met (`*_ms` and memory ratios: at most;
    else at least). A target whose work was not timed in this run is reported missed, with no value."""
    check_targets(targets)
    timed = [r for r in rows if "error" not in r]
    pairs = summary(rows).set_index(["precision", "work", "batch"])
    out = {}
    for name, target in targets.items():
        ratio = RATIO_TARGET.fullmatch(name)
        try:
            value = TARGETS[name](timed) if ratio is None else float(pairs.loc[
                (ratio["precision"], ratio["work"], int(ratio["batch"])), f"{ratio['ratio']}_ratio"])
        except (ValueError, KeyError):  # max()/min() of nothing, or no such pair: not timed in this run
            out[name] = dict(target=target, value=None, met=False)
            continue
        at_most = name.endswith("_ms") or (ratio is not None and ratio["ratio"] == "mem")
        out[name] = dict(target=target, value=round(value, 3), met=value <= target if at_most else value >= target)
    return out


def format_report(table: Any, rows: list[dict], targets: dict) -> str:
    head = (f"{'precision':13s} {'work':6s} {'batch':>5s} | {'bf16 ms':>9s} {'bf16 /s':>9s} {'bf16 MiB':>9s} | "
            f"{'ms':>9s} {'/s':>9s} {'MiB':>9s} | {'thr / bf16':>10s} {'mem / bf16':>10s}")
    lines = [head, "-" * len(head)] + [
        f"{r.precision:13s} {r.work:6s} {r.batch:5d} | {r.bf16_ms:9.2f} {r.bf16_per_s:9.1f} {r.bf16_peak_mib:9.0f} | "
        f"{r.ms:9.2f} {r.per_s:9.1f} {r.peak_mib:9.0f} | {r.thr_ratio:10.2f} {r.mem_ratio:10.3f}"
        for r in table.itertuples()]
    lines.append(f"\n{'precision':10s} {'vision':6s} {'batch':>5s} | {'tensors p/s':>11s} {'PIL e2e p/s':>11s} "
                 f"{'e2e/tensors':>11s} {'preproc p/s':>11s} {'1st call s':>10s}  bound")
    by_key = {(r["precision"], r.get("vision"), r["work"], r["batch"]): r for r in rows if "error" not in r}
    for (precision, vision, work, batch), r in by_key.items():
        if work == "page":
            e2e, cpu = (by_key.get((precision, vision, w, batch), {}) for w in ("page-e2e", "preprocess"))
            lines.append(f"{precision:10s} {vision:6s} {batch:5d} | {r['items_per_s']:11.1f} "
                         f"{e2e.get('items_per_s', float('nan')):11.1f} {e2e.get('over_tensors', float('nan')):11.2f} "
                         f"{cpu.get('items_per_s', float('nan')):11.1f} {e2e.get('first_call_ms', float('nan')) / 1e3:10.2f}  "
                         f"{e2e.get('bound', '-')}")
    lines += [f"error: {r}" for r in rows if "error" in r]
    lines.append("targets: " + (", ".join(f"{k}={'ok' if v['met'] else 'MISS'} ({v['value']} vs {v['target']})"
                                          for k, v in targets.items()) or "none in this profile"))
    return "\n".join(lines)
