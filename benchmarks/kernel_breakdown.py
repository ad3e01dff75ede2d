"""Where a batch's GPU time goes, kernel by kernel: GEMMs, attention, and everything else.

    python benchmarks/kernel_breakdown.py --out DIR                      # synthetic-4b, a CUDA GPU
    python benchmarks/kernel_breakdown.py --out DIR --precisions bf16,fp8-all --query-batch 1024 --page-batch 16

Issue 14's targets are rates a whole forward must reach; whether one is reachable depends on how much
of a forward is matrix work at the library's rate and how much is the rest. The bench times whole
forwards; this script profiles them (torch.profiler, CUDA activity) on a random-weight model of the
profile's exact shapes (`fp8_bench.build_model`), prepared as the bench prepares it (fused text
tower, fast vision tower), and sums each kernel's device time per forward into classes:
`gemm` (cuBLAS/cuBLASLt/CUTLASS matrix products, BF16 and FP8), `attention` (flash/cuDNN/
memory-efficient SDPA and the text tower's own Triton attention), `norm+quant`, `rope`,
`elementwise` and `copy`. Beside it, the floor: the time the forward would take if every kernel but
the GEMMs and the attention were free, as a rate. One table, one JSON.
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

from colquant.deploy import bench
from colquant.kernels import accelerate_model
from colquant.kernels.fast_vision import VisionSettings, accelerate_vision
from colquant.research import workspace
from colquant.research.params import load_profile
from colquant.retriever.processing import ColQwen3Processor
from colquant.retriever.tiny import build_tokenizer
from fp8_bench import build_model

log = logging.getLogger("kernel_breakdown")

# (class, substrings of a kernel name), first match wins; names as cuBLAS 12/13, CUTLASS, torch and
# the project's Triton kernels (fast_text, fast_vision, fp8_ops) spell them.
CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa", "softmax")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "_mm_", "splitk", "sm90_")),
    ("rope", ("rope", "rotary")),
    ("norm+quant", ("norm", "quant", "silu", "gelu", "scale")),
    ("copy", ("copy", "memcpy", "memset", "cat", "index", "gather", "fill")),
    ("elementwise", ("elementwise", "reduce", "add", "mul")),
)


def classify(name: str) -> str:
    """The class of one kernel name (see CLASSES); `other` when none matches."""
    lowered = name.lower()
    return next((label for label, needles in CLASSES if any(n in lowered for n in needles)), "other")


def kernel_times(fn: Any, calls: int) -> dict[str, tuple[float, int]]:
    """Device microseconds and launches per kernel name, summed over `calls` profiled calls of `fn`
    (after two unprofiled warm-up calls), divided by `calls`."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time
            totals[event.name][1] += 1
    return {name: (us / calls, count // calls) for name, (us, count) in totals.items()}


def summarize(kernels: dict[str, tuple[float, int]], items: int, top: int = 12) -> dict[str, Any]:
    """Milliseconds per class and per forward, the largest kernels, and the GEMM+attention floor."""
    by_class: dict[str, float] = collections.defaultdict(float)
    for name, (us, _) in kernels.items():
        by_class[classify(name)] += us / 1e3
    total = sum(by_class.values())
    floor = by_class.get("gemm", 0.0) + by_class.get("attention", 0.0)
    largest = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(total_ms=total, classes_ms=dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
                items_per_s_kernels=items / total * 1e3, floor_ms=floor, items_per_s_floor=items / floor * 1e3,
                largest=[dict(name=name[:140], cls=classify(name), ms=us / 1e3, launches=n) for name, (us, n) in largest])


def prepare(model: torch.nn.Module, precision: str, vision_sdpa: tuple[str, ...] | None) -> None:
    """As `colquant bench` prepares the precision: fused text tower, fast vision tower (whose SDPA
    backends `vision_sdpa` names, in priority order; None: torch's choice, the default)."""
    if precision == "bf16":
        accelerate_model(model)
    else:
        bench.prepare_fp8(model, scope={"fp8-lm": "lm", "fp8-all": "lm+vision"}[precision])
    accelerate_vision(model, VisionSettings(sdpa_backends=vision_sdpa))


def page_and_query_work(profile_name: str, query_batch: int, page_batch: int, device: torch.device
                        ) -> dict[str, tuple[dict, int]]:
    """{"query": (inputs, items), "page": (inputs, items)} made by the model's processor, as the bench
    makes them (no queries when `query_batch` is 0)."""
    profile_ = load_profile(workspace.REPO_ROOT / "params" / f"{profile_name}.yaml", check_device=False)
    settings = profile_["bench"]
    processor = ColQwen3Processor(build_tokenizer(), max_num_visual_tokens=profile_["model"]["max_num_visual_tokens"])
    work = {"page": (processor.process_images(bench.page_images(settings["page_size"], page_batch)).to(device), page_batch)}
    if query_batch:
        texts = bench.query_texts(processor.tokenizer, query_batch, settings["query_tokens"])
        work = {"query": (processor.process_queries(texts).to(device), query_batch)} | work
    return work


def run(profile_name: str, precisions: list[str], query_batch: int, page_batch: int, calls: int,
        vision_sdpa: tuple[str, ...] | None = None) -> list[dict]:
    """Each precision on a fresh random model: `query_batch` queries (none when 0), `page_batch` pages."""
    device = torch.device("cuda")
    work = page_and_query_work(profile_name, query_batch, page_batch, device)
    rows = []
    for precision in precisions:
        rows += profile_precision(build_model(profile_name, device), precision, work, calls, vision_sdpa)
        torch.cuda.empty_cache()
    return rows


def profile_precision(model: torch.nn.Module, precision: str, work: dict[str, tuple[dict, int]], calls: int,
                      vision_sdpa: tuple[str, ...] | None) -> list[dict]:
    """One row per kind of work for `model` prepared as `precision`."""
    prepare(model, precision, vision_sdpa)
    rows = []
    with torch.inference_mode():
        for label, (batch, items) in work.items():
            found = summarize(kernel_times(lambda: model(**batch), calls), items)
            rows.append(dict(precision=precision, work=label, batch=items, vision_sdpa=",".join(vision_sdpa or ["default"]),
                             tokens_per_item=batch["input_ids"].shape[1], **found))
            log.info("%s %s: %.1f ms of kernels, %s", precision, label, found["total_ms"],
                     {k: round(v, 1) for k, v in found["classes_ms"].items()})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per precision and work, ms per class, kernel-time rate and the floor's rate."""
    classes = sorted({c for r in rows for c in r["classes_ms"]}, key=lambda c: [x for x, _ in CLASSES].index(c)
                     if c in [x for x, _ in CLASSES] else 99)
    head = "| precision | work | vision SDPA | batch | kernels ms | " + " | ".join(classes) + " | items/s (kernels) | items/s (GEMM+attention only) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = " | ".join(f"{r['classes_ms'].get(c, 0.0):.1f}" for c in classes)
        lines.append(f"| {r['precision']} | {r['work']} | {r['vision_sdpa']} | {r['batch']} | {r['total_ms']:.1f} | {cells} | "
                     f"{r['items_per_s_kernels']:.1f} | {r['items_per_s_floor']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", default="synthetic-4b")
    parser.add_argument("--precisions", default="bf16,fp8-all", help="comma list of bf16, fp8-lm, fp8-all")
    parser.add_argument("--query-batch", type=int, default=1024, help="0: pages only")
    parser.add_argument("--page-batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per work (after 2 warm-ups)")
    parser.add_argument("--vision-sdpa", default=None, help="comma list of SDPA backends for the vision tower "
                        "(flash, cudnn, efficient, math), in priority order; default: torch's choice")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        parser.error("kernel_breakdown profiles CUDA kernels: run it on a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    vision_sdpa = tuple(args.vision_sdpa.split(",")) if args.vision_sdpa else None
    rows = run(args.profile, args.precisions.split(","), args.query_batch, args.page_batch, args.calls, vision_sdpa)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "kernel-breakdown" + (f"-vision-{'-'.join(vision_sdpa)}" if vision_sdpa else "")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    for r in rows:
        log.info("largest kernels, %s %s:\n%s", r["precision"], r["work"],
                 "\n".join(f"  {k['ms']:8.2f} ms {k['launches']:5d}x {k['cls']:<12} {k['name']}" for k in r["largest"]))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
