"""Every W4A16 kernel route on the text tower's four GEMM shapes, side by side (issue 10).

Why: the 4-bit path is at BF16 parity on an H200 only through BF16 copies; the question is whether a
maintained Marlin-class kernel reaches the bandwidth limit where ours do not. For the synthetic 4B's
qkv, o, gate_up and down shapes and a range of token counts this times, on the same rotating RTN-W4
weights (L2 spilled) and with the tuner's method (CUDA-graph replay, median of
:func:`colquant.kernels.autotune.graph_time_us`):

* BF16 cuBLAS on the dequantized weight;
* the fastest of the project's Triton candidates (:data:`~colquant.kernels.autotune.CANDIDATES`);
* tinygemm (torch's ``_weight_int4pack_mm``, inner k-tiles 8 and 4: the faster);
* gemlite, each kernel kind it lets one choose (GEMV, GEMV_REVSPLITK, GEMM_SPLITK, GEMM), where the
  kind fits the token count, within ``--gemlite-budget-s`` (its first call per shape autotunes);
* Marlin (gptqmodel's ``gptq_marlin_gemm``, uint4b8: our symmetric weights) when ``--marlin-lib``
  names a built extension (``--build-marlin`` builds one from gptqmodel's sdist, for sm_90a only);
* ``w4-own``: the fastest tuner candidate that runs on the layer's own 4-bit tensors (Triton tiles,
  dequantize + cuBLAS): what the memory-first path (no BF16 copies) runs;
* vLLM 0.26.0's kernels where :mod:`colquant.kernels.vllm_ops` loads them (issue 24): ``machete`` (the
  fastest of its schedules, each timed: ``configs_us``), ``vllm-marlin``, ``cutlass-w4a8`` (per-token FP8
  activations, quantized by the fused ``quantize_rows`` inside the timing) and ``cutlass-w4a8-gemm``
  (the same GEMM fed pre-quantized rows: what a fused FP8 producer would leave it).

Each route is checked against the dequantized weight (relative Frobenius error) and its bandwidth is
counted in packed 4-bit weight bytes (K*N/2; BF16 too, so the column says what 4-bit would need)
against :data:`PEAK_TBS`. Writes JSON; prints a markdown table last.

Usage (on the GPU, repository root; PYTHONPATH=lib)::

    python benchmarks/kernel_routes.py --out results.json [--marlin-lib build/gptqmodel_marlin_bf16.so]
    python benchmarks/kernel_routes.py --build-marlin /tmp/gptqmodel-7.7.0 --build-dir /tmp/marlin-build
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from colquant.basics.files import write_json
from colquant.kernels import autotune, gemlite_ops, vllm_ops
from colquant.kernels.autotune import CANDIDATES, Candidate
from colquant.kernels.packing import kernel_to_gptq

logger = logging.getLogger("kernel_routes")

PEAK_TBS = 4.8  # H200 HBM3e, NVIDIA's spec sheet (TB/s)
MS = (1, 2, 4, 8, 16, 42, 64, 128)
GROUP = 128
LAYERS = ("qkv", "o", "gate_up", "down")
GEMLITE_RANGES = {"GEMV": (1, 4), "GEMV_REVSPLITK": (1, 8), "GEMM_SPLITK": (1, 64), "GEMM": (16, 1 << 30)}
MARLIN_OPS = "gptqmodel_marlin_bf16"


def tower_shapes(config_name: str = "colqwen3_4b") -> dict[str, tuple[int, int]]:
    """(K, N) of qkv, o, gate_up, down for the profile's model config (synthetic-4b: the 4B's)."""
    from colquant.retriever.model import ColQwen3Config

    tc = getattr(ColQwen3Config, config_name)().text_config
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return dict(qkv=(tc.hidden_size, (tc.num_attention_heads + 2 * tc.num_key_value_heads) * hd),
                o=(tc.num_attention_heads * hd, tc.hidden_size), gate_up=(tc.hidden_size, 2 * tc.intermediate_size),
                down=(tc.intermediate_size, tc.hidden_size))


# --------------------------------------------------------------------------------------------
# Marlin: build (background process) and the route
# --------------------------------------------------------------------------------------------


def build_marlin(src: Path, build_dir: Path) -> Path:
    """JIT-build gptqmodel's bf16 Marlin ops from its extracted sdist the way gptqmodel/utils/marlin.py
    does (same sources: its generated kernel instantiations; same flags), for ``TORCH_CUDA_ARCH_LIST``
    only. Returns the shared library."""
    from torch.utils import cpp_extension

    root = src / "gptqmodel_ext" / "marlin"
    subprocess.run([sys.executable, str(root / "generate_kernels.py")], cwd=root, check=True)
    sources = [root / "marlin_torch_bf16.cpp", root / "gptq_marlin_bf16.cu", root / "gptq_marlin_repack.cu",
               root / "awq_marlin_repack.cu", *sorted(root.glob("kernel_bf16_*.cu"))]
    cflags = ["-O3", "-std=c++17", "-DENABLE_BF16"]
    cuda_flags = ["-static-global-template-stub=false", *cflags, "--threads", "2", "--optimize=3",
                  "-Xptxas", "-O3,-dlcm=ca", "-lineinfo", "-diag-suppress=179,39,177"]
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building Marlin bf16 from %d sources for arch %s", len(sources), os.environ.get("TORCH_CUDA_ARCH_LIST"))
    cpp_extension.load(name=MARLIN_OPS, sources=[str(s) for s in sources], extra_cflags=cflags,
                       extra_cuda_cflags=cuda_flags, extra_include_paths=[str(root)], build_directory=str(build_dir),
                       is_python_module=False, verbose=True)
    return build_dir / f"{MARLIN_OPS}.so"


def _uint4b8_id(src: Path) -> int:
    """gptqmodel's ScalarType id of uint4b8 (``(q - 8) * s``), from its own (dependency-free) module."""
    spec = importlib.util.spec_from_file_location("marlin_scalar_type", src / "gptqmodel" / "utils" / "marlin_scalar_type.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module by name
    spec.loader.exec_module(mod)
    return mod.scalar_types.uint4b8.id


def _marlin_scale_perm(device) -> torch.Tensor:
    """Marlin's grouped-scale column order within each 64 columns: i + 8 j for i, j in 0..7 (i outer)."""
    return torch.tensor([i + 8 * j for i in range(8) for j in range(8)], device=device)


@dataclass
class MarlinRoute:
    """The loaded Marlin ops and the uint4b8 type id: repacks weights and runs the GEMM."""

    type_id: int
    workspace: torch.Tensor

    @classmethod
    def load(cls, lib: Path, src: Path, device: torch.device) -> "MarlinRoute":
        torch.ops.load_library(str(lib))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return cls(_uint4b8_id(src), torch.zeros(max(sms, 128), dtype=torch.int32, device=device))

    def pack(self, qweight_k, zeros_u8, scales, group_size: int):
        """(Marlin weight, permuted bf16 scales) of a symmetric layer."""
        if not bool((zeros_u8 == 8).all()):
            raise ValueError("the uint4b8 route takes symmetric layers (every zero point 8)")
        ops = getattr(torch.ops, MARLIN_OPS)
        qw = kernel_to_gptq(qweight_k, zeros_u8)[0]
        k, n = qw.shape[0] * 8, qw.shape[1]
        perm = torch.empty(0, dtype=torch.int32, device=qw.device)
        b_q = ops.gptq_marlin_repack(qw, perm, k, n, 4)
        order = _marlin_scale_perm(qw.device)
        s = scales.to(torch.bfloat16).reshape(-1, order.numel()).index_select(1, order).reshape(-1, n).contiguous()
        return b_q, s, k, n

    def run(self, x, packed, out=None):
        b_q, s, k, n = packed
        ops = getattr(torch.ops, MARLIN_OPS)
        y = ops.gptq_marlin_gemm_bf16(x, None, b_q, None, s, None, None, None, None, self.workspace, self.type_id,
                                      x.shape[0], n, k, True, False, True, False, None, None)
        return y if out is None else out.copy_(y)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def _measure(run, sw, m: int, x, ref, copies: int, device, limit: float = autotune.CHECK_REL_ERR) -> dict:
    """µs per GEMM (graph replay over the rotating copies) and the relative error of copy 0."""
    out = run(x, 0, None)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    us = autotune.graph_time_us(lambda: [run(x, i, None) for i in range(copies)], copies, device)
    return dict(us=round(us, 2), rel_err=float(f"{err:.3g}"), ok=math.isfinite(err) and err <= limit)


def _measure_configs(cand: Candidate, sw, m: int, x, ref, scratch, copies: int, device) -> dict:
    """The fastest configuration of ``cand`` that passes its check, with every configuration's µs."""
    got = {}
    for cfg in (cand.configs() if cand.configs else (None,)):
        run = autotune._runner(cand, sw, m, scratch, cfg)[0]
        got[str((cfg or {}).get("schedule"))] = _safe(lambda: _measure(run, sw, m, x, ref, copies, device,
                                                                       cand.max_rel_err))
    ok = {c: g for c, g in got.items() if g.get("ok")}
    if not ok:
        return dict(error="no configuration passed", configs=got)
    best = min(ok, key=lambda c: ok[c]["us"])
    return dict(ok[best], config=best, configs_us={c: g.get("us") for c, g in got.items()}) if cand.configs \
        else ok[best]


def _prequantized_w4a8(sw, m: int, x, ref, scratch, copies: int, device) -> dict:
    """CUTLASS W4A8 on rows quantized once, outside the timing (a fused producer's output)."""
    cand = next(c for c in CANDIDATES if c.kind == "w4a8")
    handles = autotune._layout(cand, sw)
    pair = vllm_ops._quantize_rows(x)
    return _measure(lambda xx, i, out: handles[i](pair, out), sw, m, x, ref, copies, device, cand.max_rel_err)


def _safe(fn) -> dict:
    """A route's figures, or the error that stopped it (a route that cannot run is data, not a crash)."""
    try:
        return fn()
    except Exception as exc:
        torch.cuda.synchronize()
        return dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")


def _candidate_run(cand: Candidate, sw, m: int, scratch):
    run, cfg = autotune._runner(cand, sw, m, scratch)
    return run


def measure_shape(layer: str, k: int, n: int, device, ms, marlin: MarlinRoute | None, gemlite_deadline: float,
                  only: tuple[str, ...] | None = None) -> list[dict]:
    """Every route (``only``: those whose name starts with one of these) at every ``m`` for one shape:
    one row per (m, route)."""

    def wanted(route: str) -> bool:
        return only is None or route.startswith(only)

    copies_n = min(autotune.MAX_COPIES, max(2, math.ceil(autotune.L2_SPILL_BYTES / (k * n * 0.5))))
    sw = autotune._make_weights(k, n, GROUP, device, copies_n)
    scratch = torch.empty(k * n, device=device, dtype=torch.bfloat16)
    skip = autotune.unavailable_candidates(device, GROUP)
    gemlite_why = gemlite_ops.unavailable_reason(device)
    marlin_packs = [marlin.pack(*t, GROUP) for t in sw.kernel] if marlin else None
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = x.float() @ sw.bf16[0].float().t()
        base = dict(layer=layer, K=k, N=n, M=m)
        copies_m = copies_n if m <= 256 else 2  # the tuner's rule: from a few hundred tokens on, compute sets the pace

        def add(route: str, got: dict, **extra) -> None:
            row = dict(base, route=route, **extra, **got)
            if "us" in got:
                row["pct_hbm"] = round(100 * k * n / 2 / (got["us"] * 1e-6) / (PEAK_TBS * 1e12), 1)
            rows.append(row)
            logger.info("%s", row)

        add("bf16", _safe(lambda: _measure(_candidate_run(Candidate("bf16", "bf16"), sw, m, scratch), sw, m, x, ref,
                                           copies_m, device)))
        best = None
        for cand in CANDIDATES if wanted("triton") else ():
            if cand.kind == "triton" and cand.applies(m) and cand.name not in skip:
                got = _safe(lambda: _measure(_candidate_run(cand, sw, m, scratch), sw, m, x, ref, copies_m, device))
                if got.get("ok") and (best is None or got["us"] < best[1]["us"]):
                    best = (cand.name, got)
        if wanted("triton"):
            add("triton-best", best[1] if best else dict(error="no Triton candidate ran"), name=best and best[0])
        if wanted("w4-own"):
            own = {}
            for cand in CANDIDATES:
                if cand.kind in ("triton", "dequant+cublas") and cand.applies(m) and cand.name not in skip:
                    own[cand.name] = _safe(lambda: _measure(_candidate_run(cand, sw, m, scratch), sw, m, x, ref,
                                                            copies_m, device))
            ok = {c: g for c, g in own.items() if g.get("ok")}
            pick = min(ok, key=lambda c: ok[c]["us"]) if ok else None
            add("w4-own", ok[pick] if pick else dict(error="no own-tensor candidate ran"), name=pick)
        for cand in CANDIDATES:
            if cand.kind not in vllm_ops.KINDS or not wanted(cand.name):
                continue
            if cand.name in skip:
                add(cand.name, dict(error=skip[cand.name]))
                continue
            add(cand.name, _safe(lambda: _measure_configs(cand, sw, m, x, ref, scratch, copies_m, device)))
            if cand.kind == "w4a8":
                add(cand.name + "-gemm", _safe(lambda: _prequantized_w4a8(sw, m, x, ref, scratch, copies_m, device)))
        if not wanted("tinygemm"):
            pass
        elif "tinygemm-k8" in skip:
            add("tinygemm", dict(error=skip["tinygemm-k8"]))
        else:
            tg = {t: _safe(lambda: _measure(_candidate_run(Candidate(f"tinygemm-k{t}", "tinygemm",
                                                                      cfg=dict(inner_k_tiles=t)), sw, m, scratch),
                                            sw, m, x, ref, copies_m, device)) for t in (8, 4)}
            t_best = min(tg, key=lambda t: tg[t].get("us", float("inf")))
            add("tinygemm", tg[t_best], name=f"inner_k_tiles={t_best}")
        for kind, (lo, hi) in GEMLITE_RANGES.items():
            if not (lo <= m <= hi and wanted("gemlite")):
                continue
            if gemlite_why:
                add(f"gemlite-{kind}", dict(error=gemlite_why))
            elif time.monotonic() > gemlite_deadline:
                add(f"gemlite-{kind}", dict(error="skipped: --gemlite-budget-s spent (its autotuning)"))
            else:
                cand = Candidate(f"gemlite-{kind}", "gemlite", cfg=dict(matmul_type=kind))
                add(f"gemlite-{kind}", _safe(lambda: _measure(_candidate_run(cand, sw, m, scratch), sw, m, x, ref,
                                                              copies_m, device)))
        if marlin_packs is not None:
            add("marlin", _safe(lambda: _measure(lambda xx, i, out: marlin.run(xx, marlin_packs[i], out), sw, m, x, ref,
                                                 copies_m, device)))
        del x, ref
    del sw, scratch, marlin_packs
    torch.cuda.empty_cache()
    return rows


def gemlite_own_choice(ms) -> dict[int, str] | None:
    """The kernel kind gemlite's own dispatch (``matmul_type=-1``) runs at each token count."""
    if gemlite_ops.import_error():
        return None
    from gemlite.core import get_matmul_type

    return {m: get_matmul_type(m, 4) for m in ms}


def markdown(rows: list[dict], ms) -> str:
    """One line per (layer, M): each route's µs and % of HBM (packed bytes); the fastest 4-bit route marked."""
    routes = list(dict.fromkeys(r["route"] for r in rows))
    lines = ["| layer | M | " + " | ".join(routes) + " |", "|---|---|" + "---|" * len(routes)]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for m in ms:
            here = {r["route"]: r for r in rows if r["layer"] == layer and r["M"] == m}
            quad = {k: v for k, v in here.items() if k != "bf16" and v.get("ok")}
            win = min(quad, key=lambda k: quad[k]["us"]) if quad else None
            cells = []
            for route in routes:
                r = here.get(route)
                if r is None:
                    cells.append("")
                elif "us" not in r:
                    cells.append("err")
                else:
                    mark = "**" if route == win else ""
                    cells.append(f"{mark}{r['us']:.1f} ({r['pct_hbm']:.0f}%){mark}" + ("" if r["ok"] else " BAD"))
            lines.append(f"| {layer} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON results")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--only", help="comma list of route prefixes (bf16,triton,tinygemm,gemlite,marlin); default all")
    ap.add_argument("--gemlite-budget-s", type=float, default=200.0,
                    help="stop starting gemlite measurements after this many seconds, shared evenly by the shapes "
                         "(its first call per kind, shape and M autotunes)")
    ap.add_argument("--marlin-lib", type=Path, help="a built gptqmodel Marlin bf16 extension (.so)")
    ap.add_argument("--marlin-src", type=Path, help="gptqmodel's extracted sdist (sources; uint4b8 type id)")
    ap.add_argument("--marlin-log", type=Path, help="the Marlin build log, whose tail is recorded if it did not build")
    ap.add_argument("--build-marlin", type=Path, metavar="SRC", help="only build Marlin from this extracted sdist")
    ap.add_argument("--build-dir", type=Path, default=Path("/tmp/marlin-build"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.build_marlin:
        lib = build_marlin(args.build_marlin, args.build_dir)
        logger.info("built %s", lib)
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    ms = tuple(int(m) for m in args.ms.split(","))
    marlin_info: dict = dict(built=False)
    marlin = None
    if args.marlin_lib and args.marlin_lib.exists():
        try:
            marlin = MarlinRoute.load(args.marlin_lib, args.marlin_src, device)
            marlin_info = dict(built=True, lib=str(args.marlin_lib))
        except Exception as exc:
            marlin_info = dict(built=True, load_error=f"{type(exc).__name__}: {str(exc)[:300]}")
    else:
        tail = args.marlin_log.read_text(errors="replace")[-3000:] if args.marlin_log and args.marlin_log.exists() else None
        marlin_info = dict(built=False, reason="no built library" + (f" at {args.marlin_lib}" if args.marlin_lib else ""),
                           log_tail=tail)
    if gemlite_ops.unavailable_reason(device) is None:
        gemlite_ops.load_configs(device)
    shapes = tower_shapes()
    only = tuple(args.only.split(",")) if args.only else None
    report = dict(gpu=torch.cuda.get_device_name(device), peak_tbs=PEAK_TBS, group_size=GROUP, ms=ms,
                  method="CUDA-graph replay over rotating weight copies (> L2), median of 10 (autotune.graph_time_us);"
                         " pct_hbm counts K*N/2 packed weight bytes for every route",
                  torch=torch.__version__, gemlite=gemlite_ops.version(), gemlite_own_choice=gemlite_own_choice(ms),
                  marlin=marlin_info, shapes=shapes, vllm=vllm_ops.version(), vllm_reason=vllm_ops.load_error(),
                  machete_schedules=vllm_ops.machete_schedules(), rows=[])
    rows = report["rows"]
    layers = args.layers.split(",")
    for layer in layers:
        k, n = shapes[layer]
        deadline = time.monotonic() + args.gemlite_budget_s / len(layers)  # each shape its share
        rows += measure_shape(layer, k, n, device, ms, marlin, deadline, only)
        if gemlite_ops.unavailable_reason(device) is None and only is None:
            gemlite_ops.save_configs(device)  # after each shape: a timeout later keeps what was autotuned
        if args.out:
            write_json(args.out, report)  # after each shape, likewise
    print(f"\n{report['gpu']}: µs per GEMM (% of {PEAK_TBS} TB/s in packed 4-bit bytes); bold: fastest 4-bit route\n")
    print(markdown(rows, ms))
    if not marlin_info.get("built") or "load_error" in marlin_info:
        print(f"\nMarlin: {marlin_info.get('reason') or marlin_info.get('load_error')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
