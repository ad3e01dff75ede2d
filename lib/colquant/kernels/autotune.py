"""Per-GPU kernel tuning for the 4-bit layers, cached on disk (the way Triton caches its autotuning).

Why: the fastest W4A16 kernel depends on the GPU, the layer shape and the number of tokens, and a
table measured on one GPU (or by one version of the kernels) is wrong on another. So the first
:func:`colquant.kernels.accelerate_model` on a GPU times every candidate of :data:`CANDIDATES` on the
model's layer shapes at each token bucket (seconds, bounded), checks it against the dequantized
reference, and writes the winners to ``<cache>/<gpu>-<colquant>-<torch>-<triton>-<humming|none>.json``
(atomically). Later loads read that file; a file made for another GPU, other package versions or
other kernel sources is ignored with a logged message and re-tuned. ``python -m colquant tune``
pre-tunes and prints the table.

Rule: the 4-bit path is never slower than BF16. Where BF16 cuBLAS beats every 4-bit candidate by
more than :data:`BF16_MARGIN`, the entry says ``"bf16"`` (with the best 4-bit choice as fallback)
and :func:`keep_bf16_copies` gives those layers a dequantized BF16 weight, only if GPU memory
allows, and logs what that costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from colquant.kernels.backend import fast_path_unavailable, triton_import_error, warn_once

logger = logging.getLogger("colquant.kernels")

SCHEMA = 1
TUNE_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # M_BUCKETS' finite edges
BF16_MARGIN = 1.02  # bf16 is chosen only when the best 4-bit kernel is > 2% slower
CHECK_REL_ERR = 1e-2  # a candidate further than this from the dequantized reference is not used
L2_SPILL_BYTES = 200e6  # rotate weight copies over more than the L2 so each call reads HBM
MAX_COPIES = 48  # small layers: enough copies to mostly spill the L2, few enough to tune in seconds
BF16_COPY_FREE_FRACTION = 0.5  # keep BF16 copies only if they take at most half the free GPU memory


@dataclass(frozen=True)
class Candidate:
    """One kernel choice the tuner may time: ``kind`` is what :class:`~colquant.kernels.linear.Dispatcher`
    runs; ``cfg`` the Triton tile (``waves``: split K until about that many waves of programs);
    ``requires`` an optional package; ``keeps`` what extra GPU memory choosing it costs."""

    name: str
    kind: str
    min_m: int = 1
    max_m: int = 1 << 62
    cfg: dict | None = None
    waves: float = 0.0
    requires: str | None = None
    keeps: str | None = None

    def applies(self, m: int) -> bool:
        return self.min_m <= m <= self.max_m


def _tile(kernel: str, bm: int, bn: int, *, scale_acc: bool = False, warps: int = 4) -> dict:
    return dict(kernel=kernel, BM=bm, BN=bn, GROUP_M=8, num_warps=warps, num_stages=3, SCALE_ACC=scale_acc)


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("8dot16x64sa-w4", "triton", max_m=16, cfg=_tile("8dot", 16, 64, scale_acc=True), waves=4),
    Candidate("8dot16x128sa-w4", "triton", max_m=16, cfg=_tile("8dot", 16, 128, scale_acc=True), waves=4),
    Candidate("8dot16x64sa-w8", "triton", max_m=16, cfg=_tile("8dot", 16, 64, scale_acc=True), waves=8),
    Candidate("8dot16x64sa-w16", "triton", max_m=16, cfg=_tile("8dot", 16, 64, scale_acc=True), waves=16),
    Candidate("8dot16x256sa-w4", "triton", max_m=16, cfg=_tile("8dot", 16, 256, scale_acc=True, warps=8), waves=4),
    Candidate("8dot16x128sa-s5-w8", "triton", max_m=16, cfg=dict(_tile("8dot", 16, 128, scale_acc=True),
                                                                num_stages=5), waves=8),
    Candidate("bc16x128-w4", "triton", max_m=16, cfg=_tile("bc", 16, 128), waves=4),
    Candidate("gemv2x64-w4", "triton", max_m=2, cfg=_tile("gemv", 2, 64), waves=4),
    Candidate("gemv2x128-w4", "triton", max_m=2, cfg=_tile("gemv", 2, 128), waves=4),
    Candidate("gemv2x32-w8", "triton", max_m=2, cfg=_tile("gemv", 2, 32), waves=8),
    Candidate("gemv4x64-w4", "triton", max_m=4, cfg=_tile("gemv", 4, 64), waves=4),
    Candidate("gemv8x64-w4", "triton", max_m=8, cfg=_tile("gemv", 8, 64, warps=8), waves=4),
    Candidate("bc64x64-w2", "triton", min_m=17, max_m=64, cfg=_tile("bc", 64, 64), waves=2),
    Candidate("bc32x128-w2", "triton", min_m=17, max_m=64, cfg=_tile("bc", 32, 128), waves=2),
    Candidate("bc64x64-w4", "triton", min_m=17, max_m=64, cfg=_tile("bc", 64, 64), waves=4),
    Candidate("8dot32x128sa-w2", "triton", min_m=17, max_m=64, cfg=_tile("8dot", 32, 128, scale_acc=True), waves=2),
    Candidate("bc64x128-w1", "triton", min_m=65, max_m=512, cfg=_tile("bc", 64, 128), waves=1),
    Candidate("bc64x64-w1", "triton", min_m=65, max_m=512, cfg=_tile("bc", 64, 64), waves=1),
    Candidate("bc128x128-w1", "triton", min_m=65, max_m=512, cfg=_tile("bc", 128, 128, warps=8), waves=1),
    Candidate("bc128x256", "triton", min_m=513, cfg=_tile("bc", 128, 256, warps=8)),
    Candidate("dequant+cublas", "dequant+cublas"),
    Candidate("humming", "humming", requires="humming-kernels"),
    Candidate("bf16", "bf16", keeps="a BF16 copy of the layer's weight"),
)


# --------------------------------------------------------------------------------------------
# the cache key and file
# --------------------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    """Installed version, or ``src`` for a source checkout on PYTHONPATH (no distribution metadata)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "src"


def kernel_sources_digest() -> str:
    """Short hash of the kernel sources: a table tuned for other kernels is stale even if the
    package versions match (a source checkout changes without a version bump)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("triton_ops.py", "autotune.py", "humming_ops.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def cache_key(device: torch.device | str) -> dict:
    """What a tuned table depends on: GPU name, colquant/torch/triton/humming versions, kernel sources."""
    from colquant.kernels import humming_ops

    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    triton_version = None
    if triton_import_error() is None:
        import triton

        triton_version = triton.__version__
    return dict(schema=SCHEMA, gpu=gpu, colquant=_package_version("colquant"), torch=torch.__version__,
                triton=triton_version or "none", humming=humming_ops.version() or "none",
                kernels=kernel_sources_digest())


def default_cache_dir() -> Path:
    """``$COLQUANT_CACHE_DIR`` if set (optional), else ``$XDG_CACHE_HOME/colquant/kernels`` or
    ``~/.cache/colquant/kernels``."""
    if os.environ.get("COLQUANT_CACHE_DIR"):
        return Path(os.environ["COLQUANT_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "colquant" / "kernels"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def cache_path(key: dict, cache_dir: Path | str | None = None) -> Path:
    """``<dir>/<gpu>-<colquant>-<torch>-<triton>-<humming|none>.json``."""
    name = "-".join(_slug(str(key[k])) for k in ("gpu", "colquant", "torch", "triton", "humming"))
    return Path(cache_dir or default_cache_dir()) / f"{name}.json"


def write_table(path: Path, key: dict, entries: list[dict]) -> None:
    """Write atomically (temp file + rename): a concurrent reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(dict(key=key, entries=sorted(entries, key=lambda e: (e["K"], e["N"], e["M_bucket"]))),
                         indent=1)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(payload + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_table(path: Path, key: dict, entries: list[dict]) -> bool:
    """:func:`write_table`, except that an unwritable cache is not fatal: the table just tuned is
    used for this process, and the warning says how to make it persist."""
    try:
        write_table(path, key, entries)
    except OSError as exc:
        logger.warning("colquant.kernels: could not write the kernel tuning cache %s (%s); this process uses "
                       "the table it just tuned, the next one tunes again. Set COLQUANT_CACHE_DIR to a "
                       "writable directory to keep it", path, exc)
        return False
    return True


def read_table(path: Path, key: dict) -> list[dict] | None:
    """The cached entries, or None (with a logged reason) when the file is missing, unreadable, or
    was tuned for another GPU / other versions / other kernel sources."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        found, entries = data["key"], data["entries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("colquant.kernels: ignoring the kernel tuning cache %s (unreadable: %s); re-tuning",
                       path, exc)
        return None
    diff = {k: (found.get(k), v) for k, v in key.items() if found.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {old!r} (here {new!r})" for k, (old, new) in diff.items())
        logger.warning("colquant.kernels: ignoring the kernel tuning cache %s: it was tuned for %s; re-tuning",
                       path, what)
        return None
    return entries


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def graph_time_us(fn, n_inner: int, device: torch.device, reps: int = 10) -> float:
    """Median µs per GEMM of ``fn`` (``n_inner`` GEMMs over rotating weights) replayed as a CUDA graph:
    launch overhead counts as it does in the model's graphed query path."""
    from colquant.kernels.fast_text import capture_stream

    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / n_inner)
    del graph
    return statistics.median(times)


@dataclass
class _ShapeWeights:
    """Random RTN-W4 weights of one (K, N) shape, copied enough times to spill the L2."""

    k: int
    n: int
    group_size: int
    kernel: list = field(default_factory=list)   # (qweight_k, zeros_u8, scales)
    bf16: list = field(default_factory=list)     # dequantized [N, K]
    humming: list = field(default_factory=list)  # humming handles (when that candidate runs)


def _make_weights(k: int, n: int, group_size: int, device: torch.device, copies: int) -> _ShapeWeights:
    from colquant.kernels.packing import dequantize_kernel, gptq_to_kernel, rtn_quantize_gptq

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


def _runner(cand: Candidate, sw: _ShapeWeights, m: int, scratch: torch.Tensor):
    """A function (x, copy index, out) -> y for ``cand`` at ``m`` tokens, and its resolved cfg."""
    from colquant.kernels import humming_ops as hk
    from colquant.kernels import triton_ops as tk

    g = sw.group_size
    if cand.kind == "triton":
        cfg = dict(cand.cfg, SPLIT_K=tk._split_for(m, sw.n, sw.k, cand.cfg["BM"], cand.cfg["BN"], 128, cand.waves)
                   if cand.waves else 1)
        return (lambda x, i, out: tk.w4a16_matmul(x, *sw.kernel[i], g, cfg=cfg, out=out, sym_zero=8)), cfg
    if cand.kind == "dequant+cublas":
        w = scratch[: sw.k * sw.n].view(sw.k, sw.n)

        def run(x, i, out):
            tk.dequant_w4(*sw.kernel[i], g, out=w, sym_zero=8)
            return torch.mm(x, w, out=out)

        return run, None
    if cand.kind == "humming":
        if not sw.humming:
            for qk, zu, sc in sw.kernel:
                from colquant.kernels.packing import kernel_to_gptq

                qw, _ = kernel_to_gptq(qk, zu)
                sw.humming.append(hk.build_handle(qw, sc, g))
        return (lambda x, i, out: hk.run_layer(sw.humming[i], x, out)), None
    if cand.kind == "bf16":
        return (lambda x, i, out: torch.mm(x, sw.bf16[i].t(), out=out)), None
    raise ValueError(f"unknown candidate kind {cand.kind!r}")


def unavailable_candidates(device: torch.device) -> dict[str, str]:
    """Candidates that cannot run here, with the reason (an optional package missing, ...)."""
    from colquant.kernels import humming_ops

    out = {}
    for cand in CANDIDATES:
        if cand.requires == "humming-kernels":  # the missing package first: that is what to install
            why = humming_ops.import_error() or humming_ops.unavailable_reason(device)
            if why:
                out[cand.name] = why
    return out


def tune_shape(k: int, n: int, group_size: int, device: torch.device, ms: tuple[int, ...] | None = None) -> list[dict]:
    """Time and check every applicable candidate at each ``m`` for one layer shape; one entry per
    bucket: the winner, its time, BF16's time and (for a ``bf16`` winner) the best 4-bit fallback."""
    from colquant.kernels.linear import m_bucket

    ms = ms or TUNE_MS
    skip = unavailable_candidates(device)
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
            if not cand.applies(m) or cand.name in skip:
                continue
            try:
                run, cfg = _runner(cand, sw, m, scratch)
                out = torch.full((m, n), float("nan"), device=device, dtype=torch.bfloat16)
                run(x, 0, out)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not math.isfinite(err) or err > CHECK_REL_ERR:
                    logger.warning("colquant.kernels: tuning: %s on K=%d N=%d M=%d is off by %.2e "
                                   "(limit %.0e); not used", cand.name, k, n, m, err, CHECK_REL_ERR)
                    continue
                us = graph_time_us(lambda: [run(x, i, None) for i in range(copies)], copies, device)
            except Exception as exc:  # a tile that does not compile here (shared memory, arch)
                logger.warning("colquant.kernels: tuning: %s on K=%d N=%d M=%d failed (%s: %s); not used",
                               cand.name, k, n, m, type(exc).__name__, str(exc)[:160])
                torch.cuda.synchronize(device)
                continue
            timed[cand.name] = (us, cfg, cand.kind)
        entries.extend(_pick(k, n, group_size, m_bucket(m), timed))
        del x, ref
    entries.extend(dict(e, M_bucket=1 << 62) for e in entries if e["M_bucket"] == ms[-1])
    return entries


def _pick(k: int, n: int, group_size: int, bucket: int, timed: dict) -> list[dict]:
    """The bucket's entry: the fastest 4-bit candidate, or ``bf16`` when it is more than
    :data:`BF16_MARGIN` faster (the 4-bit winner then is its fallback); every candidate's time kept."""
    four_bit = {name: t for name, t in timed.items() if t[2] != "bf16"}
    if not four_bit:
        return []
    name, (us, cfg, kind) = min(four_bit.items(), key=lambda kv: kv[1][0])
    bf16_us = timed["bf16"][0] if "bf16" in timed else None
    entry = dict(K=k, N=n, G=group_size, M_bucket=bucket, kind=kind, cfg=cfg, name=name, us=round(us, 2),
                 bf16_us=None if bf16_us is None else round(bf16_us, 2),
                 timed_us={c: round(t[0], 2) for c, t in timed.items()})  # every route measured, for the notes
    if bf16_us is not None and us > BF16_MARGIN * bf16_us:
        entry.update(kind="bf16", cfg={"fallback": [kind, cfg]}, name="bf16", fallback_name=name)
    return [entry]


# --------------------------------------------------------------------------------------------
# first use: load or tune, then install
# --------------------------------------------------------------------------------------------


def layer_shapes(model: nn.Module) -> set[tuple[int, int, int]]:
    """(K, N, group size) of every 4-bit layer in ``model``."""
    from colquant.kernels.linear import W4A16Linear

    return {(m.in_features, m.out_features, m.group_size) for m in model.modules() if isinstance(m, W4A16Linear)}


def ensure_tuned(shapes: set[tuple[int, int, int]], device: torch.device | str, *,
                 cache_dir: Path | str | None = None, force: bool = False) -> dict:
    """Make the dispatcher's table cover ``shapes`` on ``device``: read the cache, tune the shapes it
    lacks (and write it back), install every entry. Returns what happened (for logs and the bench)."""
    from colquant.kernels.linear import DISPATCH

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
    if missing:
        logger.info("colquant.kernels: tuning the 4-bit kernels for %s on %s (once; cached in %s)",
                    [f"{k}x{n}" for k, n, _ in missing], key["gpu"], path)
        for k, n, g in missing:
            entries = [e for e in entries if (e["K"], e["N"]) != (k, n)] + tune_shape(k, n, g, device)
        save_table(path, key, entries)
    for e in entries:
        DISPATCH.set(int(e["K"]), int(e["N"]), int(e["M_bucket"]), (e["kind"], e.get("cfg")))
    _log_choice_once(device, key)
    return dict(tuned=bool(missing), tuned_shapes=len(missing), tune_s=round(time.perf_counter() - t0, 2),
                cache=str(path), entries=len(entries), key=key)


def _log_choice_once(device: torch.device, key: dict) -> None:
    missing = unavailable_candidates(device)
    note = "; not offered: " + "; ".join(f"{n} ({why})" for n, why in missing.items()) if missing else ""
    warn_once("choice:" + str(device),
              f"colquant.kernels: 4-bit layers use the kernels tuned for {key['gpu']} "
              f"(triton {key['triton']}, humming {key['humming']}){note}", level=logging.INFO)


def keep_bf16_copies(model: nn.Module, *, allow: bool | None = None) -> dict:
    """Give every 4-bit layer whose tuned table picks ``bf16`` at some token count a dequantized
    BF16 weight. ``allow``: None keeps them only if they take at most
    :data:`BF16_COPY_FREE_FRACTION` of the free GPU memory; False never (memory first: those layers
    then run their best 4-bit kernel); True always. Logs the decision and its cost."""
    from colquant.kernels.linear import DISPATCH, W4A16Linear

    bf16_shapes = {(k, n) for (k, n, _), c in DISPATCH.table.items() if c[0] == "bf16"}
    layers = [m for m in model.modules() if isinstance(m, W4A16Linear)
              and (m.in_features, m.out_features) in bf16_shapes and m.bf16_weight is None]
    need = sum(m.in_features * m.out_features * 2 for m in layers)
    info = dict(layers=len(layers), bytes=need, kept=False)
    if not layers:
        return info
    device = layers[0].compute_device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    fits = need <= BF16_COPY_FREE_FRACTION * free
    keep = fits if allow is None else allow
    if keep:
        for m in layers:
            m.keep_bf16_copy()
    info.update(kept=bool(keep), free_bytes=int(free))
    logger.warning(
        "colquant.kernels: BF16 beats every 4-bit kernel on this GPU at some token counts for %d layers; %s",
        len(layers),
        f"kept a BF16 copy of them ({need / 2**20:.0f} MiB more GPU memory) so 4-bit is never slower than BF16"
        if keep else f"no BF16 copy kept ({need / 2**20:.0f} MiB; "
        + ("not allowed" if allow is False else f"only {free / 2**20:.0f} MiB free") + "): those token counts run the "
        "best 4-bit kernel, slower than BF16")
    return info


def prepare_dispatch(model: nn.Module, device: torch.device | str, *, bf16_copy: bool | None = None,
                     cache_dir: Path | str | None = None) -> dict:
    """What :func:`accelerate_model` does for the 4-bit layers: tuned table, then BF16 copies."""
    shapes = layer_shapes(model)
    if not shapes:
        return dict(tuned=False, reason="no 4-bit layers")
    info = ensure_tuned(shapes, device, cache_dir=cache_dir)
    if "reason" not in info:
        info["bf16_copy"] = keep_bf16_copies(model, allow=bf16_copy)
    return info


def text_tower_shapes(text_config, group_size: int = 128) -> set[tuple[int, int, int]]:
    """(K, N, G) of the fused text-tower linears (qkv, o, gate_up, down) of a Qwen3-style config."""
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    return {(hidden, (heads + 2 * kv_heads) * head_dim, group_size), (heads * head_dim, hidden, group_size),
            (hidden, 2 * inter, group_size), (inter, hidden, group_size)}


def format_table(entries: list[dict]) -> str:
    """One line per (shape, bucket): winner, its µs, BF16's µs."""
    lines = [f"{'K':>6s} {'N':>6s} {'M<=':>6s}  {'choice':18s} {'us':>9s} {'bf16 us':>9s}  w4/bf16"]
    for e in sorted(entries, key=lambda e: (e["K"], e["N"], e["M_bucket"])):
        if e["M_bucket"] >= 1 << 62:
            continue
        name = e["name"] + (f" (else {e['fallback_name']})" if e.get("fallback_name") else "")
        ratio = f"{e['bf16_us'] / e['us']:.2f}" if e.get("bf16_us") else "-"
        bf = f"{e['bf16_us']:9.1f}" if e.get("bf16_us") else f"{'-':>9s}"
        lines.append(f"{e['K']:6d} {e['N']:6d} {e['M_bucket']:6d}  {name:18s} {e['us']:9.1f} {bf}  {ratio}")
    return "\n".join(lines)


def tune_main(argv: list[str] | None = None) -> int:
    """``python -m colquant tune``: tune (or read from the cache) and print the table."""
    import argparse

    from colquant.model import ColQwen3Config

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
