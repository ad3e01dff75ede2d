"""The benchmark's tables: BF16 beside 4-bit, pages from tensors beside pages from PIL images, and
the profile's targets checked against the measured rows (`colquant.deploy.bench` produces the rows)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


SUMMARY_COLUMNS = ["work", "batch", "bf16_ms", "bf16_per_s", "bf16_peak_mib", "w4_ms", "w4_per_s", "w4_peak_mib",
                   "thr_ratio", "mem_ratio"]


def summary(rows: list[dict]):
    """BF16 beside 4-bit for each (work, batch) both timed (pages with the fast vision tower where it
    was timed): throughput and memory ratios last."""
    import pandas as pd

    vision = "fast" if any(r.get("vision") == "fast" and "error" not in r for r in rows) else "eager"
    timed = {(r["precision"], r["work"], r["batch"]): r for r in rows if "error" not in r
             and r["work"] in ("query", "page") and r.get("vision", vision) == vision}
    out = []
    for (precision, work, batch), b in timed.items():
        q = timed.get(("w4a16", work, batch))
        if precision == "bf16" and q is not None:
            out.append(dict(work=work, batch=batch, bf16_ms=b["ms"], bf16_per_s=b["items_per_s"],
                            bf16_peak_mib=b["peak_mib"], w4_ms=q["ms"], w4_per_s=q["items_per_s"],
                            w4_peak_mib=q["peak_mib"], thr_ratio=q["items_per_s"] / b["items_per_s"],
                            mem_ratio=q["peak_mib"] / b["peak_mib"]))
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


def targets_met(rows: list[dict], targets: dict[str, float]) -> dict:
    """Each profile target's measured value and whether it is met (`*_ms`: at most; else at least)."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"bench.targets: unknown {unknown}; known: {', '.join(TARGETS)}")
    timed = [r for r in rows if "error" not in r]
    out = {}
    for name, target in targets.items():
        try:
            value = TARGETS[name](timed)
        except ValueError:  # max()/min() of nothing: the work was not timed in this run
            out[name] = dict(target=target, value=None, met=False)
            continue
        out[name] = dict(target=target, value=round(value, 3),
                         met=value <= target if name.endswith("_ms") else value >= target)
    return out


def format_report(table: Any, rows: list[dict], targets: dict) -> str:
    head = (f"{'work':6s} {'batch':>5s} | {'bf16 ms':>9s} {'bf16 /s':>9s} {'bf16 MiB':>9s} | "
            f"{'w4 ms':>9s} {'w4 /s':>9s} {'w4 MiB':>9s} | {'w4/bf16 thr':>11s} {'w4/bf16 mem':>11s}")
    lines = [head, "-" * len(head)] + [
        f"{r.work:6s} {r.batch:5d} | {r.bf16_ms:9.2f} {r.bf16_per_s:9.1f} {r.bf16_peak_mib:9.0f} | "
        f"{r.w4_ms:9.2f} {r.w4_per_s:9.1f} {r.w4_peak_mib:9.0f} | {r.thr_ratio:11.2f} {r.mem_ratio:11.3f}"
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
