"""Where the GPU waits for the host during a forward: the idle gaps between kernels, and the host code
running while each gap lasts.

    python benchmarks/gpu_idle.py --out DIR                  # synthetic-4b, BF16 and fp8-all, 16 pages

`kernel_breakdown.py` sums kernel times; a forward's wall time is longer by the time the GPU has
nothing to run (on the H200, 16 BF16 pages: 439 ms of kernels in a 466 ms forward). A gap opens when
the host stops launching ahead: a device-to-host read (`.tolist()`, `.item()`, a boolean mask's
`nonzero`) makes it wait for the GPU to drain, and the Python that follows runs while the GPU idles.
This script profiles one forward (after two warm-ups) with host and device activity, finds every gap
longer than `--min-gap-us` on the device timeline, and names, for each, the kernels on both sides
and the host operators overlapping it. One table, one JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from fp8_bench import build_model
from kernel_breakdown import page_and_query_work, prepare

log = logging.getLogger("gpu_idle")
CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
def idle_gaps(fn: Any, min_gap_us: float) -> dict[str, Any]:
    """Gaps of one profiled call of `fn`: total idle, busy and span (µs), and each gap with its context."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == CUDA)
    host = [e for e in events if e.device_type == CPU]
    gaps, busy, reached, previous = [], 0.0, kernels[0][1], kernels[0][2]
    busy += kernels[0][1] - kernels[0][0]
    for start, end, name in kernels[1:]:
        if start - reached > min_gap_us:
            gaps.append(dict(us=start - reached, start=reached, before=previous[:90], after=name[:90]))
        busy += max(0.0, end - max(start, reached))
        reached, previous = max(reached, end), name
    for gap in gaps:
        gap["host"] = host_during(host, gap["start"], gap["start"] + gap["us"])
    return dict(span_us=reached - kernels[0][0], busy_us=busy, idle_us=sum(g["us"] for g in gaps),
                gaps=sorted(gaps, key=lambda g: -g["us"]))


def host_during(host: list[Any], start: float, end: float, top: int = 3) -> list[dict[str, Any]]:
    """The host operators that overlap [start, end], by overlap."""
    overlap: dict[str, float] = collections.defaultdict(float)
    for event in host:
        shared = min(end, event.time_range.end) - max(start, event.time_range.start)
        if shared > 0:
            overlap[event.name] += shared
    return [dict(op=op, us=round(us, 1)) for op, us in sorted(overlap.items(), key=lambda kv: -kv[1])[:top]]


def profile_precision(model: torch.nn.Module, precision: str, work: dict[str, tuple[dict, int]],
                      min_gap_us: float) -> list[dict]:
    """One row per kind of work for `model` prepared as the bench prepares `precision`."""
    prepare(model, precision, None)
    with torch.inference_mode():
        return [dict(precision=precision, work=label, batch=items, **idle_gaps(lambda: model(**batch), min_gap_us))
                for label, (batch, items) in work.items()]


def table(rows: list[dict], top: int) -> str:
    lines = []
    for row in rows:
        lines.append(f"\n### {row['precision']} {row['work']} (batch {row['batch']}): span {row['span_us'] / 1e3:.1f} ms, "
                     f"kernels busy {row['busy_us'] / 1e3:.1f} ms, idle in gaps {row['idle_us'] / 1e3:.1f} ms "
                     f"({len(row['gaps'])} gaps)")
        lines += ["| gap µs | kernel before | kernel after | host meanwhile (op, µs) |", "|---|---|---|---|"]
        for gap in row["gaps"][:top]:
            meanwhile = "; ".join(f"{h['op']} ({h['us']:.0f})" for h in gap["host"])
            lines.append(f"| {gap['us']:.0f} | {gap['before'][:50]} | {gap['after'][:50]} | {meanwhile} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="synthetic-4b")
    parser.add_argument("--precisions", default="bf16,fp8-all")
    parser.add_argument("--page-batch", type=int, default=16)
    parser.add_argument("--query-batch", type=int, default=0, help="0: pages only")
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        parser.error("gpu_idle profiles a CUDA timeline: run it on a CUDA GPU")
    device = torch.device("cuda")
    work = page_and_query_work(args.profile, args.query_batch, args.page_batch, device)
    rows = []
    for precision in args.precisions.split(","):
        rows += profile_precision(build_model(args.profile, device), precision, work, args.min_gap_us)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-idle.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    print(table(rows, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
