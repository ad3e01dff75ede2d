"""FP8 on a GPU, in one run: kernel checks, the GEMM comparison, and the synthetic 4B (random weights,
exact shapes) encoding queries and pages in BF16, fp8-lm and fp8-all, with token cosine and MaxSim
rank agreement against BF16.

    python benchmarks/fp8_bench.py --out results/   # on a CUDA GPU of compute capability >= 8.9

All three precisions run the project's fused text tower (`accelerate_model`: fused q/k/v and gate/up,
CUDA graphs for queries) and transformers' vision tower, timed the same way as `colquant bench`
(`bench.time_forward`: CUDA events, median). FP8 layers quantize their input with the fused Triton
kernel; the fused tower does not yet pass pre-quantized activations from its RMSNorm/silu·mul kernels
(the hook it needs is described in colquant.kernels.fp8_ops).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from colquant import bench, fp8
from colquant.kernels import accelerate_model, reset_graphs
from colquant.kernels.fp8_ops import gemm_comparison, lm_shapes, producer_sweep, summarize, vision_shapes
from colquant.model import ColQwen3Config

log = logging.getLogger("fp8_bench")
QUERY_BATCHES = (1, 64, 1024)
PAGE_BATCHES = (16,)


def rank_agreement(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean Kendall tau (pairs of pages ordered alike) per query."""
    top1 = (scores.argmax(1) == reference.argmax(1)).float().mean().item()
    a = torch.sign(scores[:, :, None] - scores[:, None, :])
    b = torch.sign(reference[:, :, None] - reference[:, None, :])
    n = scores.shape[1]
    tau = ((a * b).sum((1, 2)) / (n * (n - 1))).mean().item()
    return {"top1_agreement": top1, "kendall_tau": tau}


def fidelity(model, cfg: dict, device: torch.device, reference: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Embeddings of 64 ragged queries and 8 pages; against `reference` (BF16) when given."""
    queries = bench.query_batch(cfg, 64, device, seed=11, ragged=True)
    pages = bench.page_batch(cfg, model, 8, device, seed=12)
    out = {"q": bench._embed(model, queries), "p": bench._embed(model, pages),
           "qmask": queries["attention_mask"], "pmask": pages["attention_mask"]}
    if reference is None:
        return out
    from colquant.scoring import score

    row = {"query_" + k: v for k, v in bench.compare(out["q"], reference["q"], out["qmask"]).items()}
    row |= {"page_" + k: v for k, v in bench.compare(out["p"], reference["p"], out["pmask"]).items()}
    row |= rank_agreement(score(out["q"], out["p"]), score(reference["q"], reference["p"]))
    return row


def w4a16_fidelity(cfg: dict, device: torch.device, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same model (same seed) with RTN W4 g128 decoder Linears, through transformers' forward and
    the untuned default dispatch: W4A16's error beside FP8's."""
    from colquant.kernels import find_text_model, quantize_linears_rtn

    model = bench.build_model(cfg, device)
    quantize_linears_rtn(find_text_model(model), cfg["group_size"])
    row = fidelity(model, cfg, device, reference)
    del model
    torch.cuda.empty_cache()
    return row


def time_model(model, label: str, cfg: dict, device: torch.device, query_batches: list[int]) -> list[dict[str, Any]]:
    rows = []
    for batch in query_batches:
        sec, peak, n = bench.time_forward(model, bench.query_batch(cfg, batch, device), device,
                                          cfg["reps_small"] if batch <= 64 else cfg["reps_large"], cfg["min_time_s"])
        rows.append(dict(precision=label, work="query", batch=batch, ms=sec * 1e3, items_per_s=batch / sec, peak_mib=peak, reps=n))
        reset_graphs(model)
        log.info("%s queries b%d: %.2f ms, %.0f q/s", label, batch, sec * 1e3, batch / sec)
    for batch in PAGE_BATCHES:
        sec, peak, n = bench.time_forward(model, bench.page_batch(cfg, model, batch, device), device, cfg["reps_large"], 0.0,
                                          warmup=1)
        rows.append(dict(precision=label, work="page", batch=batch, ms=sec * 1e3, items_per_s=batch / sec, peak_mib=peak, reps=n))
        log.info("%s pages b%d: %.2f ms, %.1f pages/s", label, batch, sec * 1e3, batch / sec)
        rows.append(dict(precision=label, work="vision tower", batch=batch, ms=vision_ms(model, cfg, batch, device)))
        log.info("%s vision tower alone b%d: %.2f ms", label, batch, rows[-1]["ms"])
    return rows


def vision_ms(model, cfg: dict, batch: int, device: torch.device, reps: int = 3) -> float:
    """Median ms of transformers' vision tower alone (patches to merged visual tokens) on ``batch`` pages."""
    pages = bench.page_batch(cfg, model, batch, device)
    encode = model.vlm.model.get_image_features
    times = []
    with torch.no_grad():
        encode(pages["pixel_values"], pages["image_grid_thw"])
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            encode(pages["pixel_values"], pages["image_grid_thw"])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-gemm", action="store_true", help="skip the GEMM comparison and the producer sweep")
    parser.add_argument("--query-batches", type=int, nargs="*", default=list(QUERY_BATCHES))
    parser.add_argument("--no-extras", action="store_true", help="skip W4A16 fidelity and the kernel profiles")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    device = torch.device("cuda")
    reason = fp8.fp8_unavailable_reason(device)
    if reason:
        raise SystemExit(f"fp8_bench needs FP8 kernels: {reason}")
    torch.backends.cuda.matmul.allow_tf32 = False
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    config = ColQwen3Config.colqwen3_4b()
    if not args.skip_gemm:
        t0 = time.perf_counter()
        report["gemm"] = gemm_comparison(lm_shapes(config.text_config) + vision_shapes(config.vision_config), device)
        log.info("GEMM comparison in %.0f s\n%s", time.perf_counter() - t0, summarize(report["gemm"]))
        report["producers"] = producer_sweep(device)
        log.info("fused producers (M=43008):\n%s", "\n".join(map(str, report["producers"])))
    cfg = bench._resolve("synthetic-4b")
    model = accelerate_model(bench.build_model(cfg, device))
    reference = fidelity(model, cfg, device, None)
    report["fidelity"], report["profiles"] = {}, {}
    if not args.no_extras:
        report["fidelity"]["w4a16-rtn"] = w4a16_fidelity(cfg, device, reference)
        log.info("w4a16-rtn fidelity: %s", report["fidelity"]["w4a16-rtn"])
    rows = time_model(model, "bf16", cfg, device, args.query_batches)
    if not args.no_extras:
        report["profiles"]["bf16 page-b4"] = bench.profile_forward(model, bench.page_batch(cfg, model, 4, device), device,
                                                                   "bf16 page-b4", top=16)
    for label, scope in (("fp8-lm", "lm"), ("fp8-all", "lm+vision")):
        names = fp8.quantize_fp8(model, scope)  # fp8-all adds the vision tower to fp8-lm's layers
        reset_graphs(model)
        torch.cuda.empty_cache()
        log.info("%s: %d more FP8 layers, %.0f MiB allocated", label, len(names), torch.cuda.memory_allocated(device) / 2**20)
        report["fidelity"][label] = fidelity(model, cfg, device, reference)
        log.info("%s fidelity: %s", label, report["fidelity"][label])
        rows += time_model(model, label, cfg, device, args.query_batches)
        if not args.no_extras:
            report["profiles"][f"{label} page-b4"] = bench.profile_forward(
                model, bench.page_batch(cfg, model, 4, device), device, f"{label} page-b4", top=16)
    report["models"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8-bench.json").write_text(json.dumps(report, indent=2, default=str))
    by = {(r["precision"], r["work"], r["batch"]): r for r in rows}
    lines = ["| work | batch | bf16 ms | fp8-lm ms (×) | fp8-all ms (×) | fp8-all items/s |", "|---|---|---|---|---|---|"]
    for work, batches in (("query", args.query_batches), ("page", PAGE_BATCHES), ("vision tower", PAGE_BATCHES)):
        for b in batches:
            base, lm, al = by[("bf16", work, b)], by[("fp8-lm", work, b)], by[("fp8-all", work, b)]
            lines.append(f"| {work} | {b} | {base['ms']:.2f} | {lm['ms']:.2f} ({base['ms'] / lm['ms']:.2f}) | "
                         f"{al['ms']:.2f} ({base['ms'] / al['ms']:.2f}) | {b * 1e3 / al['ms']:.1f} |")
    lines += ["", "| variant | query token cos mean / min | page token cos mean / min | MaxSim top-1 | Kendall tau |",
              "|---|---|---|---|---|"]
    for label, row in report["fidelity"].items():
        lines.append(f"| {label} | {row['query_cos_mean']:.4f} / {row['query_cos_min']:.4f} | {row['page_cos_mean']:.4f} / "
                     f"{row['page_cos_min']:.4f} | {row['top1_agreement']:.3f} | {row['kendall_tau']:.3f} |")
    if report.get("gemm"):
        lines += ["", summarize(report["gemm"])]
    (args.out / "fp8-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
