"""The fused FP8 producers of the text tower, old (main's) against new (this tree's), side by side in
one process at the 4B's shapes: µs and achieved GB/s per call, agreement of each with the torch twin,
a ``num_warps`` sweep of the new kernels, and what the difference comes to per 1,024-query forward.

    python benchmarks/producer_bench.py --out results/producers-h200.json            # CUDA GPU
    python benchmarks/producer_bench.py --old /path/to/old_fp8_ops.py --out ...       # no git there

The old kernels are main's ``lib/colquant/kernels/fp8_ops.py`` (``git show main:...`` written to a
temporary file and imported from it at run time; ``--old`` names such a file where git is not, e.g. on
the lent GPU machine). Shapes: M = 42 (one query), 1,408 (one page), 43,008 (1,024 queries × 42
tokens); N = 4,096 (``quantize_rows``: o_proj's input), 2,560 (``add_rmsnorm_quant``: qkv and gate_up
inputs), 9,728 (``silu_mul_quant``: down's input). Each call is timed as a one-call CUDA graph
(median of ``--reps`` replays): at M = 43,008 every input is far larger than the L2, at M ≤ 1,408 it
fits, as in the model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from colquant.files import write_json, write_text
from colquant.fp8 import add_rmsnorm_quant_reference, quantize_rows_reference, silu_mul_quant_reference
from colquant.kernels import fp8_ops as new_ops
from colquant.kernels.autotune import graph_time_us
from old_source import import_old

log = logging.getLogger("producer_bench")
OLD_PATH = "lib/colquant/kernels/fp8_ops.py"
M_VALUES = (42, 1408, 43008)
WIDTHS = {"quantize_rows": 4096, "add_rmsnorm_quant": 2560, "silu_mul_quant": 9728}
CALLS_PER_FORWARD = {"quantize_rows": 36, "add_rmsnorm_quant": 72, "silu_mul_quant": 36}  # 36 layers of the 4B
EPS = 1e-6


def make_inputs(kernel: str, m: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random bf16 inputs of one producer at M rows (seeded per shape)."""
    n = WIDTHS[kernel]
    gen = torch.Generator(device=device).manual_seed(m * 31 + n)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)

    if kernel == "silu_mul_quant":
        return {"gate_up": randn(m, 2 * n)}
    if kernel == "add_rmsnorm_quant":
        weight = torch.rand(n, device=device, dtype=torch.bfloat16, generator=gen) + 0.5
        return {"residual": randn(m, n), "delta": randn(m, n), "weight": weight}
    return {"x": randn(m, n)}


def call(module: Any, kernel: str, inputs: dict[str, torch.Tensor], num_warps: int | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, scales) of ``kernel`` from ``module`` (the old or the new fp8_ops)."""
    if kernel == "silu_mul_quant":
        return module.silu_mul_quant(inputs["gate_up"], num_warps=num_warps)
    if kernel == "add_rmsnorm_quant":
        return module.add_rmsnorm_quant(inputs["residual"], inputs["delta"], inputs["weight"], EPS,
                                        num_warps=num_warps)[1:]
    return module.quantize_rows(inputs["x"], num_warps=num_warps)


def reference(kernel: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin's (e4m3 rows, scales)."""
    if kernel == "silu_mul_quant":
        return silu_mul_quant_reference(inputs["gate_up"])
    if kernel == "add_rmsnorm_quant":
        return add_rmsnorm_quant_reference(inputs["residual"], inputs["delta"], inputs["weight"], EPS)[1:]
    return quantize_rows_reference(inputs["x"])


def bytes_moved(kernel: str, m: int) -> int:
    """DRAM bytes one call must move: bf16 reads, e4m3 writes, one fp32 scale a row (and h for RMSNorm)."""
    n = WIDTHS[kernel]
    per_element = {"silu_mul_quant": 2 * 2 + 1, "add_rmsnorm_quant": 2 * 2 + 2 + 1, "quantize_rows": 2 + 1}[kernel]
    return m * n * per_element + 4 * m


def agreement(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Fraction of e4m3 codes and of scales equal to ``want``'s, and the largest code difference in e4m3 steps."""
    q, s = got[0].float(), got[1]
    ref_q, ref_s = want[0].float(), want[1]
    step = torch.maximum(ref_q.abs() * 2.0**-3, torch.full_like(ref_q, 2.0**-9))
    return {"codes_equal": (q == ref_q).float().mean().item(), "scales_equal": (s == ref_s).float().mean().item(),
            "max_code_diff_steps": ((q - ref_q).abs() / step).max().item()}


def time_us(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    return graph_time_us(fn, 1, device, reps=reps)


def compare_kernel(old: ModuleType, kernel: str, m: int, device: torch.device, reps: int) -> dict[str, Any]:
    """One (kernel, M) row: old and new µs, GB/s, speed-up, and each one's agreement with the twin."""
    inputs = make_inputs(kernel, m, device)
    nbytes = bytes_moved(kernel, m)
    want = reference(kernel, inputs)
    row: dict[str, Any] = {"kernel": kernel, "M": m, "N": WIDTHS[kernel], "bytes": nbytes}
    for label, module in (("old", old), ("new", new_ops)):
        us = time_us(lambda module=module: call(module, kernel, inputs), device, reps)
        row[f"{label}_us"] = round(us, 2)
        row[f"{label}_gb_per_s"] = round(nbytes / us / 1e3, 1)
        row[f"{label}_vs_twin"] = agreement(call(module, kernel, inputs), want)
    row["new_vs_old"] = agreement(call(new_ops, kernel, inputs), call(old, kernel, inputs))
    row["speedup"] = round(row["old_us"] / row["new_us"], 3)
    return row


def warps_sweep(kernel: str, m: int, device: torch.device, reps: int, warps: list[int]) -> list[dict[str, Any]]:
    """The new kernel's µs per ``num_warps`` (the data behind `_default_warps`)."""
    inputs = make_inputs(kernel, m, device)
    nbytes = bytes_moved(kernel, m)
    rows = []
    for nw in warps:
        us = time_us(lambda nw=nw: call(new_ops, kernel, inputs, nw), device, reps)
        rows.append({"kernel": kernel, "M": m, "num_warps": nw, "us": round(us, 2),
                     "gb_per_s": round(nbytes / us / 1e3, 1)})
    return rows


def per_forward(rows: list[dict[str, Any]], m: int) -> dict[str, float]:
    """Milliseconds of producer kernels in one forward at M rows (36 layers), old and new."""
    at_m = [r for r in rows if r["M"] == m]
    old = sum(r["old_us"] * CALLS_PER_FORWARD[r["kernel"]] for r in at_m) / 1e3
    new = sum(r["new_us"] * CALLS_PER_FORWARD[r["kernel"]] for r in at_m) / 1e3
    return {"M": m, "old_ms": round(old, 2), "new_ms": round(new, 2), "saved_ms": round(old - new, 2)}


def markdown(rows: list[dict[str, Any]], sweep: list[dict[str, Any]], forward: dict[str, float]) -> str:
    lines = ["| kernel | M | N | old µs (GB/s) | new µs (GB/s) | × | codes = twin old / new | scales = twin old / new "
             "| new = old |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['M']} | {r['N']} | {r['old_us']} ({r['old_gb_per_s']}) | "
                     f"{r['new_us']} ({r['new_gb_per_s']}) | {r['speedup']} | "
                     f"{r['old_vs_twin']['codes_equal']:.6f} / {r['new_vs_twin']['codes_equal']:.6f} | "
                     f"{r['old_vs_twin']['scales_equal']:.4f} / {r['new_vs_twin']['scales_equal']:.4f} | "
                     f"{r['new_vs_old']['codes_equal']:.6f} |")
    lines += ["", "| new kernel | M | num_warps | µs | GB/s |", "|---|---|---|---|---|"]
    lines += [f"| {s['kernel']} | {s['M']} | {s['num_warps']} | {s['us']} | {s['gb_per_s']} |" for s in sweep]
    lines += ["", f"Per forward at M = {forward['M']} (36 × silu_mul_quant, 72 × add_rmsnorm_quant, 36 × "
              f"quantize_rows): old {forward['old_ms']} ms, new {forward['new_ms']} ms, saved {forward['saved_ms']} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (a .md table beside it)")
    parser.add_argument("--old", type=Path, default=None, help=f"main's {OLD_PATH} (default: git show main:...)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="row counts, comma-separated")
    parser.add_argument("--warps", default="4,8,16,32", help="num_warps values of the sweep at the largest M")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        log.error("producer_bench times CUDA kernels: no CUDA GPU here")
        return 2
    device = torch.device("cuda")
    old = import_old(OLD_PATH, file=args.old)
    m_values = [int(v) for v in args.m.split(",")]
    rows = []
    for kernel in WIDTHS:
        for m in m_values:
            rows.append(compare_kernel(old, kernel, m, device, args.reps))
            log.info("%s", rows[-1])
    sweep = [s for kernel in WIDTHS for s in warps_sweep(kernel, max(m_values), device, args.reps,
                                                         [int(w) for w in args.warps.split(",")])]
    forward = per_forward(rows, max(m_values))
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "triton": new_ops.triton.__version__, "rows": rows, "warps_sweep": sweep, "per_forward": forward}
    table = markdown(rows, sweep, forward)
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), table + "\n")
    log.info("results in %s\n%s", args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
