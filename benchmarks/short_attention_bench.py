"""The text tower's short-attention kernel, main's against this tree's, side by side in one process.

    python benchmarks/short_attention_bench.py --out short-attention.json                 # a CUDA GPU
    python benchmarks/short_attention_bench.py --out X.json --old-kernel main_triton_ops.py --batches 1,1024
    python benchmarks/short_attention_bench.py --from-json X.json     # a saved run under today's grid rule

Issue 14's query target (FP8 ≥ 3,200 q/s, 320 ms a batch of 1,024 × 42 tokens) leaves no room for an
attention kernel that takes 1.19 ms a layer when the bytes it must move (the fused qkv rows in, o_proj's
input out, the rotary rows) take ~0.26 ms at the H200's bandwidth. This script times one layer's
`short_attention` at the 4B's shapes (32 query heads, 8 kv heads, head_dim 128; left-padded queries) for
each batch: main's kernel (imported from `git show main:lib/colquant/kernels/triton_ops.py` at run time, or
from --old-kernel where the copy has no git), this tree's kernel with its default grid, and (with --sweep,
the default) every other grid this tree's kernel takes, so the default can be checked against the best.
Times are CUDA-graph replays (`triton.testing.do_bench_cudagraph`, no launch overhead: the query path is
graphed too), µs per call; GB/s counts the bytes a call must move at least. Each output's largest
difference from the torch reference (`reference.short_attention`) is reported beside its time.
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
import triton
import triton.runtime.errors
import triton.testing

from colquant.basics.files import read_json, write_json
from colquant.kernels import reference
from old_source import import_old

log = logging.getLogger("short_attention_bench")

OLD_KERNEL_REV = "main"
KERNEL_PATH = "lib/colquant/kernels/triton_ops.py"
EPS = 1e-6


def layer_inputs(batch: int, tokens: int, hq: int, hkv: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """One layer's (qkv, cos, sin, q_weight, k_weight, key_mask) in bf16 on the GPU, queries left-padded
    by 0-25% of their length as a tokenizer pads a ragged batch."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch * tokens, (hq + 2 * hkv) * d, device="cuda", generator=gen).bfloat16()
    angles = torch.rand(batch * tokens, d // 2, device="cuda", generator=gen) * 6.28
    cos = torch.cat([angles.cos()] * 2, dim=-1).bfloat16()
    sin = torch.cat([angles.sin()] * 2, dim=-1).bfloat16()
    q_weight, k_weight = (1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).bfloat16(), \
        (1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).bfloat16()
    pads = torch.randint(0, tokens // 4 + 1, (batch,), device="cuda", generator=gen)
    key_mask = (torch.arange(tokens, device="cuda")[None, :] >= pads[:, None]).int()
    return qkv, cos, sin, q_weight, k_weight, key_mask


def bytes_moved(batch: int, tokens: int, hq: int, hkv: int, d: int) -> int:
    """What one call must read and write at least: qkv rows, cos/sin rows, the mask, the output (bf16)."""
    rows = batch * tokens
    return rows * ((hq + 2 * hkv) * d * 2 + 2 * d * 2 + 4 + hq * d * 2)


def candidate_configs(new: ModuleType, tokens: int, hq: int, hkv: int) -> list[Any]:
    """Every grid this tree's kernel takes at these shapes: heads a program (divisors of the GQA group),
    stacked or looped, 16-query blocks or the whole sequence, 4 or 8 warps."""
    group, bt = hq // hkv, max(16, 1 << (tokens - 1).bit_length())
    return [new.ShortAttentionConfig(pack, heads // pack, block_q, warps)
            for heads in range(1, group + 1) if group % heads == 0
            for pack in range(1, heads + 1) if heads % pack == 0
            for block_q in sorted({16, bt})
            for warps in (4, 8)]


def time_us(fn: Callable[[], torch.Tensor], rep_ms: int) -> float:
    """Mean µs of one call, replayed in a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms) * 1e3


def measure(name: str, fn: Callable[[], torch.Tensor], want: torch.Tensor, nbytes: int, rep_ms: int,
            **extra: Any) -> dict[str, Any]:
    """One kernel variant's row: µs, GB/s and its largest difference from the reference output."""
    got = fn()
    us = time_us(fn, rep_ms)
    row = dict(kernel=name, us=us, gb_per_s=nbytes / us / 1e3, finite=bool(torch.isfinite(got).all()),
               max_abs_diff_vs_reference=float((got.float() - want.float()).abs().max()), **extra)
    log.info("%-40s %9.1f µs %7.0f GB/s  max|Δ| %.2e", name, us, row["gb_per_s"], row["max_abs_diff_vs_reference"])
    return row


def bench_batch(old: ModuleType, new: ModuleType, batch: int, dims: tuple[int, int, int, int], sweep: bool,
                rep_ms: int) -> list[dict[str, Any]]:
    """main's kernel, this tree's default grid and (sweep) every other grid at one batch size."""
    tokens, hq, hkv, d = dims
    args = layer_inputs(batch, tokens, hq, hkv, d, seed=batch)
    shape = (EPS, batch, tokens, hq, hkv, d)
    want = reference.short_attention(*args, *shape)
    nbytes = bytes_moved(batch, tokens, hq, hkv, d)
    common = dict(batch=batch, tokens=tokens, bytes=nbytes)
    default = new.short_attention_config(batch, tokens, hq, hkv)
    rows = [measure("main", lambda: old.short_attention(*args, *shape), want, nbytes, rep_ms, **common),
            measure(f"new default {tuple(default)}", lambda: new.short_attention(*args, *shape), want, nbytes,
                    rep_ms, config=default._asdict(), default=True, **common)]
    for cfg in candidate_configs(new, tokens, hq, hkv) if sweep else []:
        if cfg == default:
            continue
        try:
            rows.append(measure(f"new {tuple(cfg)}", lambda c=cfg: new.short_attention(*args, *shape, config=c),
                                want, nbytes, rep_ms, config=cfg._asdict(), default=False, **common))
        except triton.runtime.errors.OutOfResources as error:  # a swept tile too large for this GPU: a row
            log.warning("new %s: %s", tuple(cfg), error)
            rows.append(dict(kernel=f"new {tuple(cfg)}", error=str(error), config=cfg._asdict(), default=False,
                             **common))
    return rows


def table(rows: list[dict[str, Any]], layers: int) -> str:
    """Per batch: main against the new default (ratio), the best grid, and what 36 layers cost."""
    lines = ["| batch | main µs | new default grid (pack, loops, block_q, warps) µs | main / new | new GB/s "
             f"| best grid µs | {layers} layers main → new ms | max abs diff vs reference main / new |",
             "|---|---|---|---|---|---|---|---|"]
    for batch in dict.fromkeys(r["batch"] for r in rows):
        mine = [r for r in rows if r["batch"] == batch]
        main = next(r for r in mine if r["kernel"] == "main")
        new = next(r for r in mine if r.get("default"))
        best = min((r for r in mine if r["kernel"] != "main" and "us" in r), key=lambda r: r["us"])
        grid = tuple(best["config"].values())
        lines.append(f"| {batch} | {main['us']:.1f} | {tuple(new['config'].values())} {new['us']:.1f} | "
                     f"{main['us'] / new['us']:.2f}× | {new['gb_per_s']:.0f} | {grid} {best['us']:.1f} | "
                     f"{layers * main['us'] / 1e3:.2f} → {layers * new['us'] / 1e3:.2f} | "
                     f"{main['max_abs_diff_vs_reference']:.1e} / {new['max_abs_diff_vs_reference']:.1e} |")
    return "\n".join(lines)


def mark_current_defaults(report: dict[str, Any], new: ModuleType) -> list[dict[str, Any]]:
    """A saved run's rows with `default` set on the grid this tree's rule picks for each batch, so a
    rule changed after a run is read off that run's own sweep."""
    shapes = report["shapes"]
    rows = []
    for row in report["rows"]:
        if "config" in row:
            pick = new.short_attention_config(row["batch"], shapes["tokens"], shapes["heads"], shapes["kv_heads"])
            row = {**row, "default": tuple(row["config"].values()) == tuple(pick)}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="no timing: tabulate a saved run with this tree's default grid rule (CPU is enough)")
    parser.add_argument("--old-kernel", type=Path, default=None,
                        help=f"a copy of {OLD_KERNEL_REV}'s {KERNEL_PATH} (default: git show, which needs the repo)")
    parser.add_argument("--batches", default="1,8,64,1024")
    parser.add_argument("--tokens", type=int, default=42)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=36, help="layers a forward runs the kernel (the table's ms)")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="time only main and the default grid")
    parser.add_argument("--rep-ms", type=int, default=20, help="replay time per variant")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from colquant.kernels import triton_ops as new

    if args.from_json is not None:
        report = read_json(args.from_json, fix="give the JSON this script wrote with --out")
        print(table(mark_current_defaults(report, new), args.layers))
        return 0
    if args.out is None:
        parser.error("--out is required to time (or give --from-json to tabulate a saved run)")
    if not torch.cuda.is_available():
        parser.error("short_attention_bench times CUDA kernels: run it on a CUDA GPU")

    old = import_old(KERNEL_PATH, ref=OLD_KERNEL_REV, file=args.old_kernel, flag="--old-kernel")
    dims = (args.tokens, args.heads, args.kv_heads, args.head_dim)
    rows = [row for batch in (int(b) for b in args.batches.split(","))
            for row in bench_batch(old, new, batch, dims, args.sweep, args.rep_ms)]
    write_json(args.out, dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                              old_kernel=str(args.old_kernel or f"{OLD_KERNEL_REV}:{KERNEL_PATH}"),
                              shapes=dict(zip(("tokens", "heads", "kv_heads", "head_dim"), dims)), rows=rows))
    print(table(rows, args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
