"""Per-GPU kernel tuning for the 4-bit layers: the candidate table, timing, and first-use install.

Why: the fastest W4A16 kernel depends on the GPU, the layer shape and the number of tokens, and a
table measured on one GPU (or by one version of the kernels) is wrong on another. So the first
:func:`colquant.kernels.accelerate_model` on a GPU times every candidate of :data:`CANDIDATES` that
can run there on the model's layer shapes at each token bucket (seconds, bounded), checks it against
the dequantized reference, and caches the winners on disk (:mod:`.tune_cache`). Later loads read
that file. ``python -m colquant tune`` pre-tunes and prints the table.

Rule: the 4-bit path is never slower than BF16. Where BF16 cuBLAS beats every 4-bit candidate by
more than :data:`BF16_MARGIN`, the entry says ``"bf16"`` (with the best 4-bit choice as fallback);
:mod:`.copies` then keeps a BF16 weight for those layers only if GPU memory allows, and logs the cost.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from colquant.kernels import gemlite_ops, humming_ops, tinygemm, vllm_ops
from colquant.kernels.backend import fast_path_unavailable, graph_time_us, triton_import_error, warn_once
from colquant.kernels.linear import COPY_KINDS, DISPATCH, W4A16Linear, m_bucket
from colquant.kernels.packing import dequantize_kernel, gptq_to_kernel, kernel_to_gptq, rtn_quantize_gptq
from colquant.kernels.tune_cache import cache_key, cache_path, read_table, save_table

logger = logging.getLogger("colquant.kernels")

TUNE_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # M_BUCKETS' finite edges
BF16_MARGIN = 1.02  # bf16 is chosen only when the best 4-bit kernel is > 2% slower
CHECK_REL_ERR = 1e-2  # a candidate further than this from the dequantized reference is not used
L2_SPILL_BYTES = 200e6  # rotate weight copies over more than the L2 so each call reads HBM
MAX_COPIES = 48  # small layers: enough copies to mostly spill the L2, few enough to tune in seconds


def _humming_unavailable(device: torch.device) -> str | None:
    return humming_ops.import_error() or humming_ops.unavailable_reason(device)  # the package first: what to install


# what a candidate may need, and why it cannot run on a device (None: it can)
REQUIREMENTS: dict[str, Callable[[torch.device], str | None]] = {
    "triton": fast_path_unavailable,
    "tinygemm": tinygemm.unavailable_reason,
    "humming-kernels": _humming_unavailable,
    "gemlite": gemlite_ops.unavailable_reason,
    "vllm-machete": lambda device: vllm_ops.unavailable_reason(device, "machete"),
    "vllm-marlin": lambda device: vllm_ops.unavailable_reason(device, "marlin"),
    "vllm-w4a8": lambda device: vllm_ops.unavailable_reason(device, "w4a8"),
}


@dataclass(frozen=True)
class Candidate:
    """One kernel choice the tuner may time. ``kind`` is what :class:`~colquant.kernels.linear.Dispatcher`
    runs; ``cfg`` its configuration (Triton tile, tinygemm's inner k-tiles); ``waves``: split K until
    about that many waves of programs; ``requires``: keys of :data:`REQUIREMENTS`; ``groups``: the
    group sizes it takes (None: any the layer takes); ``keeps``: the extra GPU memory choosing it costs;
    ``configs``: where the library lists its configurations at run time (Machete's schedules), a
    function returning them; each is timed and the fastest kept as ``cfg``; ``activations``: ``"fp8"``
    for a W4A8 kernel (per-token e4m3 activations; timed only for an FP8-activation table, checked at
    ``max_rel_err``). The table's order is the priority between equal times."""

    name: str
    kind: str
    min_m: int = 1
    max_m: int = 1 << 62
    cfg: dict | None = None
    waves: float = 0.0
    requires: tuple[str, ...] = ("triton",)
    groups: tuple[int, ...] | None = None
    keeps: str | None = None
    configs: Callable[[], tuple[dict, ...]] | None = None
    activations: str = "bf16"
    max_rel_err: float = CHECK_REL_ERR

    def applies(self, m: int) -> bool:
        return self.min_m <= m <= self.max_m

    def unsupported_reason(self, device: torch.device, group_size: int) -> str | None:
        """None when this candidate can run layers of ``group_size`` on ``device``, else why not."""
        for req in self.requires:
            why = REQUIREMENTS[req](device)
            if why:
                return why
        if self.groups is not None and group_size not in self.groups:
            return f"group size {group_size} (takes {self.groups})"
        return None


def _tile(kernel: str, bm: int, bn: int, *, scale_acc: bool = False, warps: int = 4, fixup: bool = False) -> dict:
    return dict(kernel=kernel, BM=bm, BN=bn, GROUP_M=8, num_warps=warps, num_stages=3, SCALE_ACC=scale_acc,
                FIXUP=fixup)


def _machete_configs() -> tuple[dict, ...]:
    """Machete's own heuristic (no schedule named) and every schedule the library lists."""
    return ({"schedule": None},) + tuple({"schedule": s} for s in vllm_ops.machete_schedules())


_TINY = dict(requires=("triton", "tinygemm"), groups=tinygemm.GROUP_SIZES, keeps=COPY_KINDS["tinygemm"])
# gemlite (opt-in extra, pure Python + Triton), on its own packed copy; up to the 64-token bucket a batch-1
# query (42 tokens) falls in. Won no bucket on the H200 (benchmarks/kernel-notes.md, "Kernel routes")
_GEMLITE = dict(requires=("triton", "gemlite"), keeps=COPY_KINDS["gemlite"])

CANDIDATES: tuple[Candidate, ...] = (
    # what won a bucket or came within a few % on the H200 (benchmarks/kernel-notes.md has every route)
    # few tokens: split-K Triton tiles whose partial sums are reduced in the same launch ("-fx")
    Candidate("8dot16x64sa-w4-fx", "triton", max_m=16, cfg=_tile("8dot", 16, 64, scale_acc=True, fixup=True), waves=4),
    Candidate("8dot16x64sa-w8-fx", "triton", max_m=16, cfg=_tile("8dot", 16, 64, scale_acc=True, fixup=True), waves=8),
    Candidate("8dot16x64sa-w16-fx", "triton", max_m=16, cfg=_tile("8dot", 16, 64, scale_acc=True, fixup=True),
              waves=16),
    # tinygemm (torch core), on its own copy of the weights in its layout; it loses from 8 tokens on
    Candidate("tinygemm-k8", "tinygemm", max_m=8, cfg=dict(inner_k_tiles=8), **_TINY),
    Candidate("tinygemm-k4", "tinygemm", max_m=8, cfg=dict(inner_k_tiles=4), **_TINY),
    Candidate("gemlite-gemv-revsplitk", "gemlite", max_m=4, cfg=dict(matmul_type="GEMV_REVSPLITK"), **_GEMLITE),
    Candidate("gemlite-gemm-splitk", "gemlite", max_m=64, cfg=dict(matmul_type="GEMM_SPLITK"), **_GEMLITE),
    Candidate("gemlite-gemm", "gemlite", min_m=33, max_m=128, cfg=dict(matmul_type="GEMM"), **_GEMLITE),
    # tens of tokens
    Candidate("bc64x64-w2", "triton", min_m=17, max_m=64, cfg=_tile("bc", 64, 64), waves=2),
    Candidate("bc64x64-w4", "triton", min_m=17, max_m=64, cfg=_tile("bc", 64, 64), waves=4),
    Candidate("8dot32x128sa-w2", "triton", min_m=17, max_m=64, cfg=_tile("8dot", 32, 128, scale_acc=True), waves=2),
    # hundreds of tokens and more
    Candidate("bc64x128-w1", "triton", min_m=65, max_m=512, cfg=_tile("bc", 64, 128), waves=1),
    Candidate("bc64x64-w1", "triton", min_m=65, max_m=512, cfg=_tile("bc", 64, 64), waves=1),
    Candidate("bc128x128-w1", "triton", min_m=65, max_m=512, cfg=_tile("bc", 128, 128, warps=8), waves=1),
    Candidate("bc128x256", "triton", min_m=513, cfg=_tile("bc", 128, 256, warps=8)),
    Candidate("dequant+cublas", "dequant+cublas"),
    Candidate("humming", "humming", requires=("humming-kernels",), keeps="humming's repacked 4-bit copy"),
    # vLLM 0.26.0's Hopper kernels (optional library, kernels/vllm_ops.py); a layer keeps one repack, no second copy
    Candidate("machete", "machete", requires=("vllm-machete",), groups=(64, 128), keeps=COPY_KINDS["machete"],
              configs=_machete_configs),
    Candidate("vllm-marlin", "marlin", requires=("vllm-marlin",), keeps=COPY_KINDS["marlin"]),
    Candidate("cutlass-w4a8", "w4a8", requires=("vllm-w4a8",), groups=(128,), activations="fp8",
              max_rel_err=vllm_ops.W4A8_CHECK_REL_ERR, keeps="vLLM's W4A8 repack (signed int4, e4m3 scales)"),
    Candidate("bf16", "bf16", keeps=COPY_KINDS["bf16"]),
)


def unavailable_candidates(device: torch.device, group_size: int = 128) -> dict[str, str]:
    """Candidates that cannot run here, with the reason (an optional package missing, ...)."""
    device = torch.device(device)
    return {c.name: why for c in CANDIDATES if (why := c.unsupported_reason(device, group_size))}


def backend_report(device=None) -> dict:
    """What would run where, per candidate kind: for logs, the benchmark JSON and the loader's message."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    reason = fast_path_unavailable(device)
    info = dict(device=str(device), backend="triton" if reason is None else "reference", reason=reason,
                torch=torch.__version__, triton=None, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    if triton_import_error() is None:
        import triton

        info["triton"] = triton.__version__
    kinds: dict[str, dict] = {}
    for cand in CANDIDATES:
        if cand.kind not in kinds:
            why = cand.unsupported_reason(device, 128)
            kinds[cand.kind] = dict(available=why is None, reason=why)
    kinds["humming"]["version"] = humming_ops.version()
    kinds["gemlite"]["version"] = gemlite_ops.version()
    for kind in vllm_ops.KINDS:
        kinds[kind]["version"] = vllm_ops.version()
    info["candidates"] = kinds
    return info


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


@dataclass
class _ShapeWeights:
    """Random RTN-W4 weights of one (K, N) shape, copied enough times to spill the L2, and each
    candidate's own layout of them (made the first time that candidate runs)."""

    k: int
    n: int
    group_size: int
    kernel: list = field(default_factory=list)   # (qweight_k, zeros_u8, scales)
    bf16: list = field(default_factory=list)     # dequantized [N, K]
    layouts: dict = field(default_factory=dict)  # candidate name -> per-copy handles


def _make_weights(k: int, n: int, group_size: int, device: torch.device, copies: int) -> _ShapeWeights:
    sw = _ShapeWeights(k, n, group_size)
    gen = torch.Generator(device=device).manual_seed(k * 31 + n)
    for _ in range(copies):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
        qw, qz, sc = rtn_quantize_gptq(w, group_size)
        qk, zu = gptq_to_kernel(qw, qz)
        sw.kernel.append((qk, zu, sc))
        sw.bf16.append(dequantize_kernel(qk, zu, sc, group_size, dtype=torch.bfloat16).t().contiguous())
        del w, qw, qz
    return sw


def _layout(cand: Candidate, sw: _ShapeWeights) -> list:
    """``cand``'s own copy of every weight copy (tinygemm's packing, humming's repack, gemlite's pack:
    one for all its kernel kinds), made once."""
    key = cand.kind if cand.kind in ("gemlite", *vllm_ops.KINDS) else cand.name
    if key not in sw.layouts:
        if cand.kind in vllm_ops.KINDS:
            sw.layouts[key] = [vllm_ops.build_handle(cand.kind, *t, sw.group_size) for t in sw.kernel]
        elif cand.kind == "tinygemm":
            ikt = cand.cfg["inner_k_tiles"]
            sw.layouts[key] = [tinygemm.pack(*t, inner_k_tiles=ikt) for t in sw.kernel]
        elif cand.kind == "gemlite":
            sw.layouts[key] = [gemlite_ops.build_handle(*t, sw.group_size) for t in sw.kernel]
        else:
            sw.layouts[cand.name] = [humming_ops.build_handle(kernel_to_gptq(qk, zu)[0], sc, sw.group_size)
                                     for qk, zu, sc in sw.kernel]
    return sw.layouts[key]


def _runner(cand: Candidate, sw: _ShapeWeights, m: int, scratch: torch.Tensor, cfg: dict | None = None):
    """A function (x, copy index, out) -> y for ``cand`` at ``m`` tokens, and its resolved cfg
    (``cfg``: one of ``cand.configs()``)."""
    from colquant.kernels import triton_ops as tk

    g = sw.group_size
    if cand.kind in vllm_ops.KINDS:
        handles = _layout(cand, sw)
        return (lambda x, i, out: handles[i](x, out, cfg=cfg)), cfg
    if cand.kind == "triton":
        split = tk.split_for(m, sw.n, sw.k, cand.cfg["BM"], cand.cfg["BN"], cand.waves) if cand.waves else 1
        cfg = dict(cand.cfg, SPLIT_K=split)
        return (lambda x, i, out: tk.w4a16_matmul(x, *sw.kernel[i], g, cfg=cfg, out=out, sym_zero=8)), cfg
    if cand.kind == "dequant+cublas":
        w = scratch[: sw.k * sw.n].view(sw.k, sw.n)

        def run(x, i, out):
            tk.dequant_w4(*sw.kernel[i], g, out=w, sym_zero=8)
            return torch.mm(x, w, out=out)

        return run, None
    if cand.kind == "tinygemm":
        packs = _layout(cand, sw)
        return (lambda x, i, out: tinygemm.matmul(x, *packs[i], g, out=out)), dict(cand.cfg)
    if cand.kind == "gemlite":
        handles, kind = _layout(cand, sw), cand.cfg["matmul_type"]
        return (lambda x, i, out: handles[i](x, out, matmul_type=kind)), dict(cand.cfg)
    if cand.kind == "humming":
        handles = _layout(cand, sw)
        return (lambda x, i, out: humming_ops.run_layer(handles[i], x, out)), None
    if cand.kind == "bf16":
        return (lambda x, i, out: torch.mm(x, sw.bf16[i].t(), out=out)), None
    raise ValueError(f"unknown candidate kind {cand.kind!r}")


def _time_candidate(cand: Candidate, sw: _ShapeWeights, m: int, x: torch.Tensor, ref: torch.Tensor,
                    scratch: torch.Tensor, copies: int, device: torch.device, cfg: dict | None = None):
    """(µs, cfg) of ``cand`` (with ``cfg``, one of its ``configs``) at ``m`` tokens, or None (logged)
    when it is off the reference or fails."""
    k, n = sw.k, sw.n
    try:
        run, cfg = _runner(cand, sw, m, scratch, cfg)
        out = torch.full((m, n), float("nan"), device=device, dtype=torch.bfloat16)
        out = run(x, 0, out)  # the written output (a kernel may return a new tensor)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not math.isfinite(err) or err > cand.max_rel_err:
            logger.warning("colquant.kernels: tuning: %s%s on K=%d N=%d M=%d is off by %.2e (limit %.0e); not used",
                           cand.name, f" {cfg}" if cand.configs else "", k, n, m, err, cand.max_rel_err)
            return None
        return graph_time_us(lambda: [run(x, i, None) for i in range(copies)], copies, device), cfg
    except Exception as exc:  # a tile that does not compile here (shared memory, arch): not a candidate here
        logger.warning("colquant.kernels: tuning: %s on K=%d N=%d M=%d failed (%s: %s); not used",
                       cand.name, k, n, m, type(exc).__name__, str(exc)[:160])
        torch.cuda.synchronize(device)
        return None


def time_best_config(cand: Candidate, sw: _ShapeWeights, m: int, x: torch.Tensor, ref: torch.Tensor,
                     scratch: torch.Tensor, copies: int, device: torch.device):
    """(µs, cfg) of ``cand`` at ``m`` tokens: its only configuration, or the fastest of its ``configs``
    that passes the check; None when none does."""
    cfgs = cand.configs() if cand.configs else (None,)
    timed = [got for cfg in cfgs if (got := _time_candidate(cand, sw, m, x, ref, scratch, copies, device, cfg))]
    return min(timed, key=lambda t: t[0]) if timed else None


def tune_shape(k: int, n: int, group_size: int, device: torch.device, ms: tuple[int, ...] | None = None,
               activations: str = "bf16") -> list[dict]:
    """Time and check every applicable candidate at each ``m`` for one layer shape; one entry per
    bucket: the winner, its time, BF16's time, every candidate's time and the fallbacks.
    ``activations="fp8"`` times the W4A8 candidates (and BF16 beside them) instead of the W4A16 ones."""
    ms = ms or TUNE_MS
    skip = unavailable_candidates(device, group_size)
    small_copies = min(MAX_COPIES, max(2, math.ceil(L2_SPILL_BYTES / (k * n * 0.5))))
    sw = _make_weights(k, n, group_size, device, small_copies)
    scratch = torch.empty(k * n, device=device, dtype=torch.bfloat16)
    entries = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = x.float() @ sw.bf16[0].float().t()
        copies = len(sw.kernel) if m <= 256 else 2  # from a few hundred tokens on, compute sets the pace
        timed: dict[str, tuple[float, dict | None, str]] = {}
        for cand in CANDIDATES:
            if cand.applies(m) and cand.name not in skip and (cand.activations == activations or cand.kind == "bf16"):
                got = time_best_config(cand, sw, m, x, ref, scratch, copies, device)
                if got is not None:
                    timed[cand.name] = (got[0], got[1], cand.kind)
        entries.extend(_pick(k, n, group_size, m_bucket(m), timed))
        del x, ref
    entries.extend(dict(e, M_bucket=1 << 62) for e in entries if e["M_bucket"] == ms[-1])
    return entries


def _fastest(timed: dict) -> tuple[str, tuple[float, dict | None, str]] | None:
    return min(timed.items(), key=lambda kv: kv[1][0]) if timed else None


def _pick(k: int, n: int, group_size: int, bucket: int, timed: dict) -> list[dict]:
    """The bucket's entry: the fastest 4-bit candidate; where that one needs its own copy of the
    weights (tinygemm), the fastest that runs on the layer's own 4-bit tensors is its ``fallback``;
    ``bf16`` when BF16 is more than :data:`BF16_MARGIN` faster (the 4-bit choice then is its
    fallback). Every candidate's time is kept."""
    best = _fastest({name: t for name, t in timed.items() if t[2] != "bf16"})
    if best is None:
        return []
    name, (us, cfg, kind) = best
    bf16_us = timed["bf16"][0] if "bf16" in timed else None
    entry = dict(K=k, N=n, G=group_size, M_bucket=bucket, kind=kind, cfg=cfg, name=name, us=round(us, 2),
                 bf16_us=None if bf16_us is None else round(bf16_us, 2),
                 timed_us={c: round(t[0], 2) for c, t in timed.items()})  # every route measured, for the notes
    own = _fastest({c: t for c, t in timed.items() if t[2] not in COPY_KINDS})
    if kind in COPY_KINDS and own is not None:
        entry.update(cfg=dict(cfg or {}, fallback=[own[1][2], own[1][1]]), fallback_name=own[0])
    if bf16_us is not None and us > BF16_MARGIN * bf16_us:
        entry.update(kind="bf16", cfg={"fallback": [entry["kind"], entry["cfg"]]}, name="bf16", fallback_name=name)
    return [entry]


# --------------------------------------------------------------------------------------------
# first use: load or tune, then install
# --------------------------------------------------------------------------------------------


def layer_shapes(model: nn.Module) -> set[tuple[int, int, int]]:
    """(K, N, group size) of every 4-bit layer in ``model``."""
    return {(m.in_features, m.out_features, m.group_size) for m in model.modules() if isinstance(m, W4A16Linear)}


def ensure_tuned(shapes: set[tuple[int, int, int]], device: torch.device | str, *,
                 cache_dir: Path | str | None = None, force: bool = False) -> dict:
    """Make the dispatcher's table cover ``shapes`` on ``device``: read the cache, tune the shapes it
    lacks (and write it back), install every entry. Returns what happened (for logs and the bench)."""
    device = torch.device(device)
    reason = fast_path_unavailable(device)
    if reason is not None:
        return dict(tuned=False, reason=reason)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = cache_key(device)
    path = cache_path(key, cache_dir)
    entries = ([] if force else read_table(path, key)) or []
    have = {(e["K"], e["N"], e.get("G")) for e in entries}
    missing = sorted(s for s in shapes if s not in have)
    t0 = time.perf_counter()
    gemlite_here = gemlite_ops.unavailable_reason(device) is None
    if gemlite_here:
        gemlite_ops.load_configs(device, cache_dir)
    if missing:
        logger.info("colquant.kernels: tuning the 4-bit kernels for %s on %s (once; cached in %s)",
                    [f"{k}x{n}" for k, n, _ in missing], key["gpu"], path)
        for k, n, g in missing:
            entries = [e for e in entries if (e["K"], e["N"]) != (k, n)] + tune_shape(k, n, g, device)
        save_table(path, key, entries)
        if gemlite_here:
            gemlite_ops.save_configs(device, cache_dir)
    for e in entries:
        DISPATCH.set(int(e["K"]), int(e["N"]), int(e["M_bucket"]), (e["kind"], e.get("cfg")))
    _log_choice_once(device, key)
    return dict(tuned=bool(missing), tuned_shapes=len(missing), tune_s=round(time.perf_counter() - t0, 2),
                cache=str(path), entries=len(entries), key=key)


def _log_choice_once(device: torch.device, key: dict) -> None:
    """Once per device: whose table the 4-bit layers use, and which optional candidates were not
    offered, grouped by the reason (what to install or which GPU they need)."""
    by_reason: dict[str, list[str]] = {}
    for cand in CANDIDATES:
        why = cand.unsupported_reason(device, 128) if cand.requires != ("triton",) else None
        if why:
            by_reason.setdefault(why, []).append(cand.name)
    note = "; not offered: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items()) \
        if by_reason else ""
    warn_once("choice:" + str(device),
              f"colquant.kernels: 4-bit layers use the kernels tuned for {key['gpu']} "
              f"(triton {key['triton']}, humming {key['humming']}, gemlite {key['gemlite']}){note}", level=logging.INFO)


def text_tower_shapes(text_config, group_size: int = 128) -> set[tuple[int, int, int]]:
    """(K, N, G) of the fused text-tower linears (qkv, o, gate_up, down) of a Qwen3-style config."""
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    return {(hidden, (heads + 2 * kv_heads) * head_dim, group_size), (heads * head_dim, hidden, group_size),
            (hidden, 2 * inter, group_size), (inter, hidden, group_size)}


def format_table(entries: list[dict]) -> str:
    """One line per (shape, bucket): winner, its µs, BF16's µs, and the packed-weight bandwidth."""
    lines = [f"{'K':>6s} {'N':>6s} {'M<=':>6s}  {'choice':32s} {'us':>8s} {'bf16 us':>8s} {'w4/bf16':>7s} {'TB/s':>5s}"]
    for e in sorted(entries, key=lambda e: (e["K"], e["N"], e["M_bucket"])):
        if e["M_bucket"] >= 1 << 62:
            continue
        name = e["name"] + (f" (else {e['fallback_name']})" if e.get("fallback_name") else "")
        ratio = f"{e['bf16_us'] / e['us']:.2f}" if e.get("bf16_us") else "-"
        bf = f"{e['bf16_us']:8.1f}" if e.get("bf16_us") else f"{'-':>8s}"
        tbs = e["K"] * e["N"] / 2 / (e["us"] * 1e-6) / 1e12  # packed 4-bit weight bytes per second
        lines.append(f"{e['K']:6d} {e['N']:6d} {e['M_bucket']:6d}  {name:32s} {e['us']:8.1f} {bf}"
                     f" {ratio:>7s} {tbs:5.2f}")
    return "\n".join(lines)


def tune_main(argv: list[str] | None = None) -> int:
    """``python -m colquant tune``: tune (or read from the cache) and print the table."""
    import argparse

    from colquant.retriever.model import ColQwen3Config

    ap = argparse.ArgumentParser(prog="colquant tune", description=tune_main.__doc__)
    ap.add_argument("--config", default="colqwen3_4b", help="ColQwen3Config constructor naming the layer shapes")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--force", action="store_true", help="re-tune even if a valid cache exists")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    reason = fast_path_unavailable(device)
    if reason is not None:
        logger.error("colquant tune: nothing to tune: %s (run it on the CUDA GPU that will serve the model)", reason)
        return 1
    config = getattr(ColQwen3Config, args.config)()
    shapes = text_tower_shapes(config.text_config, args.group_size)
    info = ensure_tuned(shapes, device, cache_dir=args.cache_dir, force=args.force)
    entries = read_table(Path(info["cache"]), info["key"]) or []
    wanted = {(k, n) for k, n, _ in shapes}
    print(f"{info['key']['gpu']}: {info['cache']} ({'tuned in %.1f s' % info['tune_s'] if info['tuned'] else 'cached'})")
    print(format_table([e for e in entries if (e["K"], e["N"]) in wanted]))
    return 0
