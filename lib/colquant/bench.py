"""`python -m colquant bench --profile synthetic-4b`: BF16 and 4-bit ColQwen3 side by side.

One run, on the GPU at hand (CPU works for the `tiny` profile, through the reference path):

1. builds ColQwen3 with random weights directly on the device (exact 4B shapes for
   `synthetic-4b`; no download);
2. checks the 4-bit kernels against a dequantized-weights reference on fresh random inputs, for
   every layer shape of the tower and every token count the benchmark uses, and times each
   candidate (the autotuner's Triton tiles, dequantize+cuBLAS, humming where installed) beside
   bf16 cuBLAS: per-GEMM information; the model itself runs the default path (step 4);
3. BF16: transformers' eager forward (reference embeddings, a few baseline timings), then
   `accelerate_model` (fused q/k/v + gate/up, fused kernels, CUDA-graph query path), checked
   against the reference and timed on queries (32 + 10 augmentation tokens) and pages
   (1,280 visual tokens);
4. 4-bit: the same linears quantized RTN W4 g128 sym (auto-round's rule, auto_gptq packing, then
   the kernel layout), dispatched as `colquant.load` does (the per-GPU tuned table from the disk
   cache, tuned now on a first run, BF16 copies where memory allows), timed the same way, then
   again without the BF16 copies; checked against the reference ops and against BF16;
5. prints one table (4-bit/BF16 ratios last) and writes everything to JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

PROFILES: dict[str, dict[str, Any]] = {
    "synthetic-4b": dict(
        config="colqwen3_4b", dtype="bfloat16", group_size=128,
        query_tokens=32, augmentation_tokens=10,
        query_batches=[1, 4, 8, 32, 64, 128, 256, 1024], page_batches=[1, 4, 16],
        visual_tokens=1280, grid=(1, 64, 80), eager_query_batches=[1, 8],
        reps_small=30, reps_large=5, min_time_s=0.5, calibrate=True, check_ms=[1, 16, 44, 176, 352, 1408,
                                                                               2816, 5632, 11264, 43008],
        memory_batch=64, offload_batches=[1, 64],
    ),
    "tiny": dict(
        config="tiny", dtype="bfloat16", group_size=128,
        query_tokens=8, augmentation_tokens=2,
        query_batches=[1, 4], page_batches=[1],
        visual_tokens=16, grid=(1, 8, 8), eager_query_batches=[1],
        reps_small=2, reps_large=1, min_time_s=0.0, calibrate=False, check_ms=[1, 7],
        memory_batch=4,
    ),
}

TARGETS = {
    "ratio_small_batch": 1.5,      # 4-bit/BF16 throughput at query batch <= 4
    "ratio_elsewhere": 0.97,       # larger query batches and pages
    "bf16_b1_ms": 5.0,
    "w4_b1_ms": 3.0,
    "large_batch_qps": 2700.0,
    "pages_per_s": 38.0,
    "memory_ratio_b64": 0.40,
    "kernel_rel_err": 1e-2,
}

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAD, IM_START, IM_END, V_START, V_END, IMAGE = 151643, 151644, 151645, 151652, 151653, 151655


def _log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------------
# model and inputs
# --------------------------------------------------------------------------------------------


def build_model(cfg: dict, device: torch.device):
    """Random-weight ColQwen3, initialised directly on ``device`` in the run dtype."""
    from colquant.model import ColQwen3, ColQwen3Config

    config = getattr(ColQwen3Config, cfg["config"])()
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = ColQwen3(config)
    finally:
        torch.set_default_dtype(prev)
    model = model.eval()
    for p in model.parameters():  # anything created with an explicit fp32 dtype
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    # norms at 1 and small random Linear/Embedding weights (what transformers' init gives);
    # buffers (rotary inverse frequencies) keep the fp32 values their modules computed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def query_batch(cfg, B, device, seed=0, ragged=False):
    g = torch.Generator().manual_seed(seed)
    T = cfg["query_tokens"] + cfg["augmentation_tokens"]
    ids = torch.randint(0, 150000, (B, T), generator=g)
    ids[:, cfg["query_tokens"]:] = PAD
    mask = torch.ones(B, T, dtype=torch.long)
    if ragged:  # left padding, queries of different lengths
        for b in range(B):
            cut = (b * 7) % max(1, cfg["query_tokens"] // 2)
            ids[b, :cut] = PAD
            mask[b, :cut] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def page_batch(cfg, model, B, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, h, w = cfg["grid"]
    merge = model.config.vision_config.spatial_merge_size
    n_vis = t * h * w // (merge * merge)
    assert n_vis == cfg["visual_tokens"], (n_vis, cfg["visual_tokens"])
    head = [IM_START, 872, 198, V_START]
    tail = [V_END, 74785, 279, 2168, 13, IM_END, PAD]
    row = head + [IMAGE] * n_vis + tail
    ids = torch.tensor([row] * B)
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pix = torch.randn(B * t * h * w, patch_dim, generator=g).to(getattr(torch, cfg["dtype"]))
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pix.to(device),
        "image_grid_thw": torch.tensor([[t, h, w]] * B).to(device),
    }


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, batch, device, reps, min_time_s, warmup=2):
    """Median seconds per forward and peak memory (MiB, allocated) over warm-up + timing."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**batch).embeddings
        _sync(device)
        times = []
        t_start = time.perf_counter()
        while len(times) < reps or (time.perf_counter() - t_start) < min_time_s:
            if device.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                out = model(**batch).embeddings
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3)
            else:
                t0 = time.perf_counter()
                out = model(**batch).embeddings
                times.append(time.perf_counter() - t0)
            if len(times) >= 200:
                break
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    del out
    time_forward.last_spread = (min(times), max(times))
    return statistics.median(times), peak, len(times)


# --------------------------------------------------------------------------------------------
# kernel checks and dispatcher calibration
# --------------------------------------------------------------------------------------------


def _candidates(m):
    """The autotuner's Triton candidates at ``m`` tokens (:data:`colquant.kernels.autotune.CANDIDATES`):
    the bench times the same tiles the default path tunes over."""
    from colquant.kernels.autotune import CANDIDATES

    return [(c.name, dict(c.cfg, waves=c.waves)) for c in CANDIDATES if c.kind == "triton" and c.applies(m)]


def kernel_checks_and_calibration(cfg, device, hidden, inter, heads, kv_heads, head_dim, calibrate=True):
    """Correctness of every candidate on every shape/M (fresh inputs, poisoned outputs) and its
    CUDA-graphed time with rotating weights; bf16 cuBLAS on the same shapes. Per-GEMM information
    only: the model runs the default path (the autotuner's cached table, :func:`prepare_dispatch`)."""
    from colquant.kernels import humming_ops as hk
    from colquant.kernels import triton_ops as tk
    from colquant.kernels.packing import dequantize_kernel, gptq_to_kernel, rtn_quantize_gptq
    from colquant.kernels.autotune import graph_time_us

    G = cfg["group_size"]
    shapes = {
        "qkv": (hidden, (heads + 2 * kv_heads) * head_dim, False),
        "o": (heads * head_dim, hidden, False),
        "gate_up": (hidden, 2 * inter, False),
        "down": (inter, hidden, False),
    }
    rows, checks = [], []
    worst = 0.0
    for sname, (K, N, act) in shapes.items():
        # rotate over enough copies to spill the 50 MB L2 (as in the model: each layer's weights
        # come from HBM)
        n_copies = max(2, math.ceil(200e6 / (K * N * 2)))
        n_copies_q = max(2, math.ceil(200e6 / (K * N * 0.5)))
        wq, hq = [], []
        use_hk = calibrate and hk.unavailable_reason(device) is None
        for i in range(n_copies_q):
            w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
            qw, qz, sc = rtn_quantize_gptq(w, G)
            qn, zn = gptq_to_kernel(qw, qz)
            wq.append((qn, zn, sc))
            if use_hk:
                try:
                    hq.append(hk.build_handle(qw, sc, G))
                except Exception as exc:
                    _log(f"  humming repack failed on {sname}: {type(exc).__name__}: {str(exc)[:200]}")
                    checks.append(dict(shape=sname, K=K, N=N, cand="humming", ok=None,
                                       skipped="repack: " + str(exc)[:200]))
                    use_hk, hq = False, []
            del w, qw, qz
        wd = [torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(n_copies)]
        w_ref = dequantize_kernel(*wq[0], G, dtype=torch.float32)  # auto-round-exact weights, [K, N]
        # the scratch dequant kernel must reproduce it exactly
        d16 = tk.dequant_w4(*wq[0], G, dtype=torch.bfloat16)
        dq_exact = bool(torch.equal(d16, w_ref.to(torch.float16).to(torch.bfloat16)))
        checks.append(dict(shape=sname, K=K, N=N, check="dequant kernel == auto-round dequant (bit-exact)",
                           ok=dq_exact))
        for m in cfg["check_ms"]:
            kin = 2 * K if act else K
            xs = [torch.randn(m, kin, device=device, dtype=torch.bfloat16) for _ in range(2)]
            xa = tk.silu_mul(xs[0]) if act else xs[0]
            # bf16 cuBLAS time (weights as nn.Linear holds them)
            ab = xa
            t_bf16 = graph_time_us(lambda: [torch.nn.functional.linear(ab, w) for w in wd], n_copies, device, reps=20)
            ref = xa.float() @ w_ref
            ref_norm = ref.norm().item()
            cands = _candidates(m) if calibrate else []
            cands = cands + [("dequant+cublas", None)] + ([("humming", "humming")] if use_hk else [])
            best = None
            t_hk = None
            for name, c in cands:
                if isinstance(c, dict):
                    c = dict(c)
                    waves = c.pop("waves")
                    c["SPLIT_K"] = tk.split_for(m, N, K, c["BM"], c["BN"], waves) if waves else 1

                def run(x, qn, zn, sc, h=None, c=c, out=None):
                    if c == "humming":
                        a = tk.silu_mul(x) if act else x
                        return hk.run_layer(h, a, out)
                    if c is None:
                        w = tk.dequant_w4(qn, zn, sc, G, dtype=torch.bfloat16, out=_scr(K * N, device).view(K, N),
                                          sym_zero=8)
                        a = tk.silu_mul(x) if act else x
                        return torch.mm(a, w, out=out) if out is not None else a @ w
                    return tk.w4a16_matmul(x, qn, zn, sc, G, act=act, cfg=c, out=out, sym_zero=8)

                try:
                    out = torch.full((m, N), float("nan"), device=device, dtype=torch.bfloat16)
                    hs = hq if c == "humming" else [None] * len(wq)
                    run(xs[0], *wq[0], hs[0], out=out)
                    torch.cuda.synchronize(device)
                    err = ((out.float() - ref).norm() / ref_norm).item()
                    finite = bool(torch.isfinite(out).all())
                    x1 = xs[1]
                    t = graph_time_us(lambda: [run(x1, *q, h) for q, h in zip(wq, hs)], len(wq), device, reps=20)
                except Exception as exc:  # a config that does not compile (e.g. too much shared memory)
                    _log(f"  candidate {name} skipped on {sname} M={m}: {type(exc).__name__}: {str(exc)[:120]}")
                    checks.append(dict(shape=sname, K=K, N=N, M=m, cand=name, ok=None, skipped=str(exc)[:200]))
                    torch.cuda.synchronize(device)
                    continue
                ok = finite and err <= TARGETS["kernel_rel_err"]
                worst = max(worst, err if finite else float("inf"))
                checks.append(dict(shape=sname, K=K, N=N, M=m, cand=name, rel_err=err, finite=finite, ok=ok,
                                   us=t, cfg=c))
                if ok and c == "humming":
                    t_hk = t
                if ok and (best is None or t < best[1]):
                    best = (name, t, c)
            if best is None:
                continue
            rows.append(dict(shape=sname, K=K, N=N, M=m, bf16_us=t_bf16, w4_us=best[1], w4_choice=best[0],
                             speedup=t_bf16 / best[1], humming_us=t_hk))
            hk_note = (f"   humming {t_hk:8.1f} us (+{(t_hk / best[1] - 1) * 100:.0f}%)"
                       if t_hk is not None and best[2] != "humming" else "")
            _log(f"  {sname:12s} K={K:5d} N={N:5d} M={m:6d}  bf16 {t_bf16:8.1f} us   w4 {best[1]:8.1f} us "
                 f"({best[0]})  x{t_bf16 / best[1]:.2f}{hk_note}")
        del wq, wd, hq
        torch.cuda.empty_cache()
    return rows, checks, worst


_SCR = {}


def _scr(numel, device):
    t = _SCR.get("w")
    if t is None or t.numel() < numel:
        t = torch.empty(numel, device=device, dtype=torch.bfloat16)
        _SCR["w"] = t
    return t[:numel]


def fused_op_checks(device, hidden, heads, kv_heads, head_dim):
    """Triton fused ops vs their torch references on fresh random inputs."""
    from colquant.kernels import reference as ref
    from colquant.kernels import triton_ops as tk

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    out = []
    dt = torch.bfloat16
    x = torch.randn(333, hidden, device=device, dtype=dt)
    d = torch.randn(333, hidden, device=device, dtype=dt)
    w = torch.randn(hidden, device=device, dtype=dt)
    r1, y1 = tk.add_rmsnorm(x, d, w, 1e-6)
    r2, y2 = ref.add_rmsnorm(x, d, w, 1e-6)
    out.append(dict(op="add_rmsnorm", rel_err=rel(y1, y2), residual_exact=bool(torch.equal(r1, r2))))
    gu = torch.randn(333, 2 * 4096, device=device, dtype=dt)
    out.append(dict(op="silu_mul", rel_err=rel(tk.silu_mul(gu), ref.silu_mul(gu))))
    for B, T in ((1, 44), (4, 44), (2, 300)):
        qkv = torch.randn(B * T, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dt)
        ang = torch.rand(B, T, head_dim // 2, device=device) * 6.28
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(dt)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(dt)
        qw = 1 + 0.1 * torch.randn(head_dim, device=device, dtype=dt)
        kw = 1 + 0.1 * torch.randn(head_dim, device=device, dtype=dt)
        km = torch.ones(B, T, dtype=torch.int32, device=device)
        if B > 1:
            km[1, : T // 3] = 0
        a = tk.qk_norm_rope(qkv, cos, sin, qw, kw, 1e-6, B, T, heads, kv_heads, head_dim)
        b = ref.qk_norm_rope(qkv, cos, sin, qw, kw, 1e-6, B, T, heads, kv_heads, head_dim)
        out.append(dict(op=f"qk_norm_rope B{B} T{T}", rel_err=max(rel(u, v) for u, v in zip(a, b))))
        if T <= 128:
            o1 = tk.short_attention(qkv, cos, sin, qw, kw, km, 1e-6, B, T, heads, kv_heads, head_dim)
            o2 = ref.short_attention(qkv, cos, sin, qw, kw, km, 1e-6, B, T, heads, kv_heads, head_dim)
            valid = km.reshape(-1).bool()
            out.append(dict(op=f"short_attention B{B} T{T}", rel_err=rel(o1[valid], o2[valid]),
                            finite=bool(torch.isfinite(o1).all())))
    return out


# --------------------------------------------------------------------------------------------
# model-level comparisons
# --------------------------------------------------------------------------------------------


def _embed(model, batch):
    with torch.no_grad():
        return model(**batch).embeddings.float()


def compare(a, b, mask):
    m = mask.bool()
    cos = torch.nn.functional.cosine_similarity(a[m], b[m], dim=-1)
    rel = ((a[m] - b[m]).norm() / b[m].norm()).item()
    pad_zero = bool(torch.equal(a[~m], torch.zeros_like(a[~m])))
    return dict(cos_min=cos.min().item(), cos_mean=cos.mean().item(), rel_err=rel, padding_exact_zero=pad_zero,
                finite=bool(torch.isfinite(a).all()))


def profile_forward(model, batch, device, label="", top=14):
    """Per-kernel GPU time of one eager (graph-free) forward: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    from colquant.kernels import find_text_model

    tm = find_text_model(model)
    state = getattr(tm, "_colquant_accel", None)
    runner = state.runner if state is not None else None
    if state is not None:
        state.runner = None
    try:
        with torch.no_grad():
            model(**batch)
            torch.cuda.synchronize(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(**batch)
                torch.cuda.synchronize(device)
        # host side: one more forward with the CPU profiler (what keeps the GPU waiting when the wall
        # time exceeds the kernel time, e.g. the 4-bit page batch 1)
        with torch.no_grad():
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(**batch)
            torch.cuda.synchronize(device)
            wall_us = (time.perf_counter() - t0) * 1e6
            with profile(activities=[ProfilerActivity.CPU]) as hprof:
                model(**batch)
                torch.cuda.synchronize(device)
        host = sorted(((e.key, e.self_cpu_time_total, e.count) for e in hprof.key_averages()),
                      key=lambda r: -r[1])[:12]
    finally:
        if state is not None:
            state.runner = runner
    agg = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = e.name[:60]
        t, n = agg.get(name, (0.0, 0))
        agg[name] = (t + e.device_time, n + 1)
    total = sum(t for t, _ in agg.values())
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
    out = dict(total_kernel_us=total, n_kernels=sum(n for _, n in agg.values()),
               top=[dict(kernel=k, us=t, calls=n) for k, (t, n) in rows], wall_us=wall_us,
               host_top=[dict(op=k[:80], self_cpu_us=t, calls=n) for k, t, n in host])
    _log(f"[bench] {label} eager kernels: {out['n_kernels']} launches, {total:.0f} us GPU time; top: "
         + "; ".join(f"{r['kernel'][:40]} {r['us']:.0f}us/{r['calls']}" for r in out["top"][:8]))
    _log(f"[bench] {label} eager wall {wall_us:.0f} us; host self-CPU top: "
         + "; ".join(f"{k[:40]} {t:.0f}us/{n}" for k, t, n in host[:10]))
    return out


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _resolve(profile):
    if isinstance(profile, dict):
        base = dict(PROFILES.get(profile.get("profile", "synthetic-4b"), PROFILES["synthetic-4b"]))
        base.update(profile)
        base.setdefault("profile", "custom")
        return base
    if profile not in PROFILES:
        raise SystemExit(f"unknown bench profile {profile!r}; known: {', '.join(PROFILES)}")
    out = dict(PROFILES[profile])
    out["profile"] = profile
    return out


def run_bench(profile_name_or_cfg="synthetic-4b", out_json: str | Path | None = None, *,
              device: str | None = None, overrides: dict | None = None):
    """Run the whole benchmark; returns the results table (pandas DataFrame) and writes JSON."""
    import pandas as pd

    from colquant.kernels import (
        accelerate_model,
        backend_report,
        find_text_model,
        force_reference,
        prepare_dispatch,
        reset_graphs,
    )
    from colquant.kernels.linear import DISPATCH, W4A16Linear

    cfg = _resolve(profile_name_or_cfg)
    if overrides:
        cfg.update(overrides)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict[str, Any] = {"profile": cfg["profile"], "config": {k: v for k, v in cfg.items()},
                              "env": backend_report(dev), "targets": TARGETS}
    report["env"].update(python=platform.python_version(), transformers=_version("transformers"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        report["env"]["gpu"] = torch.cuda.get_device_name(dev)
    fast_ok = report["env"]["backend"] == "triton"
    _log(f"[bench] profile {cfg['profile']} on {dev} ({report['env'].get('gpu', platform.processor())}), "
         f"backend {report['env']['backend']}" + (f" ({report['env']['reason']})" if not fast_ok else ""))

    t0 = time.perf_counter()
    model = build_model(cfg, dev)
    tm = find_text_model(model)
    tc = tm.config
    hidden, inter = tc.hidden_size, tc.intermediate_size
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", hidden // heads)
    report["build_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        report["bf16_weights_mib"] = torch.cuda.memory_allocated(dev) / 2**20
    _log(f"[bench] model built in {report['build_s']:.1f} s")

    # ---- kernel correctness + per-GEMM timings + dispatcher calibration
    if fast_ok:
        _log("[bench] kernels: correctness vs dequantized reference, per-GEMM timings (CUDA graphs, "
             "rotating weights)")
        try:
            gemm_rows, checks, worst = kernel_checks_and_calibration(cfg, dev, hidden, inter, heads, kv_heads,
                                                                     head_dim, calibrate=cfg["calibrate"])
        except Exception as exc:
            import traceback

            traceback.print_exc()
            report.setdefault("errors", []).append(dict(stage="kernel checks", error=repr(exc)[:300]))
            gemm_rows, checks, worst = [], [dict(ok=False, error=repr(exc)[:300])], float("inf")
        report["gemm"] = gemm_rows
        report["kernel_checks"] = checks
        report["kernel_worst_rel_err"] = worst
        report["kernel_checks_all_ok"] = all(c.get("ok") is not False for c in checks) and any(
            c.get("ok") for c in checks)
        report["fused_op_checks"] = fused_op_checks(dev, hidden, heads, kv_heads, head_dim)
        _SCR.clear()  # the calibration's scratch must not count in the models' peak memory
        gc.collect()
        torch.cuda.empty_cache()
        _log(f"[bench] kernel checks: {sum(bool(c.get('ok')) for c in checks)} ok, "
             f"{sum(c.get('ok') is False for c in checks)} failed, {sum(c.get('ok') is None for c in checks)} "
             f"skipped (did not compile), worst "
             f"rel err {worst:.2e}; fused ops: "
             + ", ".join(f"{c['op']} {c['rel_err']:.1e}" for c in report["fused_op_checks"]))

    T = cfg["query_tokens"] + cfg["augmentation_tokens"]
    rows: list[dict] = []

    def add_row(precision, work, batch, sec, peak, n, tokens):
        lo, hi = getattr(time_forward, "last_spread", (sec, sec))
        rows.append(dict(precision=precision, work=work, batch=batch, ms=sec * 1e3, items_per_s=batch / sec,
                         peak_mib=peak, reps=n, tokens_per_item=tokens, ms_min=lo * 1e3, ms_max=hi * 1e3))

    # ---- BF16 reference (transformers eager)
    qref = query_batch(cfg, 4, dev, seed=11, ragged=True)
    pref = page_batch(cfg, model, 1, dev, seed=12)
    emb_q_hf = _embed(model, qref)
    emb_p_hf = _embed(model, pref)
    for B in cfg["eager_query_batches"]:
        sec, peak, n = time_forward(model, query_batch(cfg, B, dev), dev, max(3, cfg["reps_small"] // 5), 0.0)
        add_row("bf16-hf-eager", "query", B, sec, peak, n, T)
        _log(f"[bench] bf16 transformers eager, queries B={B}: {sec * 1e3:.2f} ms")

    errors = report.setdefault("errors", [])

    def bench_precision(precision):
        for B in cfg["query_batches"]:
            reps = cfg["reps_small"] if B <= 64 else cfg["reps_large"]
            try:
                sec, peak, n = time_forward(model, query_batch(cfg, B, dev), dev, reps, cfg["min_time_s"])
            except Exception as exc:  # an OOM at one size must not lose the rest of the run
                errors.append(dict(precision=precision, work="query", batch=B, error=repr(exc)[:300]))
                _log(f"[bench] {precision} queries B={B}: FAILED {exc!r}")
                reset_graphs(model)
                continue
            add_row(precision, "query", B, sec, peak, n, T)
            _log(f"[bench] {precision} queries B={B:5d}: {sec * 1e3:9.2f} ms  {B / sec:9.1f} q/s  peak {peak:8.0f} MiB")
            reset_graphs(model)
        for B in cfg["page_batches"]:
            try:
                sec, peak, n = time_forward(model, page_batch(cfg, model, B, dev), dev, cfg["reps_large"], 0.0,
                                            warmup=1)
            except Exception as exc:
                errors.append(dict(precision=precision, work="page", batch=B, error=repr(exc)[:300]))
                _log(f"[bench] {precision} pages B={B}: FAILED {exc!r}")
                continue
            add_row(precision, "page", B, sec, peak, n, cfg["visual_tokens"] + 11)
            _log(f"[bench] {precision} pages   B={B:5d}: {sec * 1e3:9.2f} ms  {B / sec:9.1f} p/s  peak {peak:8.0f} MiB")
        if dev.type == "cuda" and cfg.get("profile", True) and precision in ("bf16", "w4a16"):
            for label, batch in (("query-b1", query_batch(cfg, 1, dev)), ("page-b1", page_batch(cfg, model, 1, dev))):
                try:
                    report.setdefault("profiles", {})[f"{precision} {label}"] = profile_forward(
                        model, batch, dev, f"{precision} {label}")
                except Exception as exc:
                    errors.append(dict(precision=precision, work="profile " + label, error=repr(exc)[:300]))

    def bench_offload(precision):
        """Token embeddings in host memory: the peak-memory option (queries only)."""
        from colquant.kernels import offload_embeddings, restore_embeddings

        if dev.type != "cuda" or not cfg.get("offload_batches"):
            return
        offload_embeddings(model)
        try:
            for B in cfg["offload_batches"]:
                try:
                    sec, peak, n = time_forward(model, query_batch(cfg, B, dev), dev, cfg["reps_small"],
                                                cfg["min_time_s"])
                except Exception as exc:
                    errors.append(dict(precision=precision + "+emb-offload", batch=B, error=repr(exc)[:300]))
                    continue
                add_row(precision + "+emb-offload", "query", B, sec, peak, n, T)
                _log(f"[bench] {precision}+emb-offload queries B={B:5d}: {sec * 1e3:9.2f} ms  peak {peak:8.0f} MiB")
                reset_graphs(model)
        finally:
            restore_embeddings(model)
            reset_graphs(model)

    def time_vision():
        if dev.type != "cuda":
            return
        out = {}
        for B in cfg["page_batches"]:
            pb = page_batch(cfg, model, B, dev)
            try:
                with torch.no_grad():
                    fn = model.vlm.model.get_image_features
                    fn(pb["pixel_values"], pb["image_grid_thw"])
                    _sync(dev)
                    t_s = time.perf_counter()
                    for _ in range(2):
                        fn(pb["pixel_values"], pb["image_grid_thw"])
                    _sync(dev)
                out[B] = (time.perf_counter() - t_s) / 2 * 1e3
            except Exception as exc:
                errors.append(dict(work="vision timing", batch=B, error=repr(exc)[:300]))
        report["vision_tower_ms"] = out
        _log(f"[bench] vision tower alone (bf16, transformers), ms per page batch: {out}")

    # ---- BF16 accelerated
    accelerate_model(model)
    checks_model = {}
    checks_model["bf16_fast_vs_hf_queries"] = compare(_embed(model, qref), emb_q_hf, qref["attention_mask"])
    checks_model["bf16_fast_vs_hf_page"] = compare(_embed(model, pref), emb_p_hf, pref["attention_mask"])
    reset_graphs(model)
    _log(f"[bench] bf16 fused vs transformers: {checks_model}")
    bench_precision("bf16")
    time_vision()
    bench_offload("bf16")
    emb_q_bf16 = _embed(model, qref)
    emb_p_bf16 = _embed(model, pref)
    reset_graphs(model)

    # ---- 4-bit: RTN W4 g128 sym of the same weights, auto_gptq packing -> kernel layout
    t1 = time.perf_counter()
    with torch.no_grad():
        for layer in tm.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                lin = getattr(parent, name)
                setattr(parent, name, W4A16Linear.from_linear(lin, cfg["group_size"]))
                del lin
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        report["w4_weights_mib"] = torch.cuda.memory_allocated(dev) / 2**20
        # humming's repacked copies, for the layer shapes the calibration sends to it (counted apart)
        from colquant.kernels import humming_ops
        from colquant.kernels.copies import prepare_humming

        try:
            hinfo = prepare_humming(tm)
        except Exception as exc:
            hinfo = dict(prepared=0, bytes=0, error=repr(exc)[:300])
            errors_h = report.setdefault("errors", [])
            errors_h.append(dict(stage="humming repack", error=repr(exc)[:300]))
            for m_ in tm.modules():
                humming_ops.release(m_) if isinstance(m_, W4A16Linear) else None
            DISPATCH.table = {k: v for k, v in DISPATCH.table.items() if v[0] != "humming"}
        torch.cuda.empty_cache()
        report["humming_repack"] = hinfo
        report["w4_plus_humming_mib"] = torch.cuda.memory_allocated(dev) / 2**20
        w4m = [m_ for m_ in tm.modules() if isinstance(m_, W4A16Linear)]
        report["w4_linear_device_mib"] = sum(m_.weight_bytes for m_ in w4m) / 2**20
        report["w4_linear_host_mib"] = sum(m_.host_bytes for m_ in w4m) / 2**20
        _log(f"[bench] humming repack: {hinfo}; allocated {report['w4_weights_mib']:.0f} MiB -> "
             f"{report['w4_plus_humming_mib']:.0f} MiB (4-bit linears: {report['w4_linear_device_mib']:.0f} MiB "
             f"on the GPU, {report['w4_linear_host_mib']:.0f} MiB kernel-layout copy in host memory)")
        if report.get("gemm"):
            report["humming_single_copy_cost"] = single_copy_cost(report["gemm"])
            _log(f"[bench] humming at every M vs the measured best (per GEMM): "
                 f"{report['humming_single_copy_cost']}")
    if dev.type == "cuda":
        # the default path, as colquant.load / accelerate_model give it: the tuned table for this GPU
        # (tuned now on a first run, else read from the disk cache) and BF16 copies where memory allows
        report["tuning"] = prepare_dispatch(tm, dev)
        report["dispatch_table"] = DISPATCH.to_json()
        report["w4_with_copies_mib"] = torch.cuda.memory_allocated(dev) / 2**20
        _log(f"[bench] default-path dispatch: {report['tuning']}")
    report["quantize_s"] = time.perf_counter() - t1
    _log(f"[bench] quantized (RTN W4 g{cfg['group_size']}) in {report['quantize_s']:.1f} s")
    emb_q_w4 = _embed(model, qref)
    emb_p_w4 = _embed(model, pref)
    reset_graphs(model)
    with force_reference():
        emb_q_w4_ref = _embed(model, qref)
        emb_p_w4_ref = _embed(model, pref)
    checks_model["w4_fast_vs_dequant_reference_queries"] = compare(emb_q_w4, emb_q_w4_ref, qref["attention_mask"])
    checks_model["w4_fast_vs_dequant_reference_page"] = compare(emb_p_w4, emb_p_w4_ref, pref["attention_mask"])
    checks_model["w4_vs_bf16_queries"] = compare(emb_q_w4, emb_q_bf16, qref["attention_mask"])
    checks_model["w4_vs_bf16_page"] = compare(emb_p_w4, emb_p_bf16, pref["attention_mask"])
    report["model_checks"] = checks_model
    _log(f"[bench] 4-bit checks: {checks_model}")
    if dev.type == "cuda":
        DISPATCH.record_stats = True
        DISPATCH.stats.clear()
    bench_precision("w4a16")
    DISPATCH.record_stats = False
    bench_offload("w4a16")
    copies = [m_ for m_ in tm.modules() if isinstance(m_, W4A16Linear) and m_.bf16_weight is not None]
    if copies and cfg.get("memory_first", True):
        # the same model without the BF16 copies (accelerate_model(..., bf16_copy=False)): what memory-first costs
        for m_ in copies:
            m_.bf16_weight = None
        from colquant.kernels.copies import keep_copies

        report["no_bf16_copy_tinygemm_copy"] = keep_copies(tm, "tinygemm")  # what accelerate_model(bf16_copy=False) keeps
        gc.collect()
        torch.cuda.empty_cache()
        bench_precision("w4a16-no-bf16-copy")
    report["dispatch_used"] = sorted({(k, n, kind) for (k, n, m, kind) in DISPATCH.stats})

    df = pd.DataFrame(rows)
    table = summary_table(df)
    report["results"] = rows
    report["table"] = table.to_dict(orient="records")
    # the targets are the H100 ones of the issue: meaningless for CPU / reference-path runs
    report["targets_met"] = evaluate_targets(table, report, cfg) if fast_ok else {}
    report["total_s"] = time.perf_counter() - t0
    if out_json:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    _log("")
    _log(format_table(table))
    _log("targets: " + (", ".join(f"{k}={'ok' if v['met'] else 'MISS'} ({v['value']})"
                                   for k, v in report["targets_met"].items()) or "n/a (no Triton/CUDA fast path)"))
    if out_json:
        _log(f"[bench] JSON: {out_json}")
    return table


def single_copy_cost(gemm_rows) -> dict:
    """What sending every M to humming costs per GEMM where the calibration picked something else:
    worst and mean slowdown over those rows (rows without a humming time are left out)."""
    lost = [(r["shape"], r["M"], r["humming_us"] / r["w4_us"]) for r in gemm_rows
            if r.get("humming_us") and r.get("w4_choice") != "humming" and r.get("w4_us")]
    if not lost:
        return dict(rows=0)
    worst = max(lost, key=lambda t: t[2])
    return dict(rows=len(lost), mean_slowdown=round(sum(t[2] for t in lost) / len(lost), 4),
                worst_slowdown=round(worst[2], 4), worst_at=f"{worst[0]} M={worst[1]}",
                at=[f"{s_} M={m_}: x{v:.3f}" for s_, m_, v in lost])


def summary_table(df):
    import pandas as pd

    bf = df[df.precision == "bf16"].set_index(["work", "batch"])
    w4 = df[df.precision == "w4a16"].set_index(["work", "batch"])
    out = []
    for key in bf.index:
        if key not in w4.index:
            continue
        b, q = bf.loc[key], w4.loc[key]
        out.append(dict(work=key[0], batch=key[1], bf16_ms=b.ms, bf16_per_s=b.items_per_s, bf16_peak_mib=b.peak_mib,
                        w4_ms=q.ms, w4_per_s=q.items_per_s, w4_peak_mib=q.peak_mib,
                        thr_ratio=q.items_per_s / b.items_per_s, mem_ratio=q.peak_mib / b.peak_mib))
    eager = df[df.precision == "bf16-hf-eager"]
    t = pd.DataFrame(out)
    t.attrs["eager"] = eager.to_dict(orient="records")
    t.attrs["offload"] = df[df.precision.str.endswith("+emb-offload")].to_dict(orient="records")
    t.attrs["no_copy"] = df[df.precision == "w4a16-no-bf16-copy"].merge(
        bf.reset_index()[["work", "batch", "items_per_s"]], on=["work", "batch"], suffixes=("", "_bf16")
    ).to_dict(orient="records")
    return t


def format_table(t) -> str:
    head = (f"{'work':6s} {'batch':>5s} | {'bf16 ms':>9s} {'bf16 /s':>9s} {'bf16 MiB':>9s} | "
            f"{'w4 ms':>9s} {'w4 /s':>9s} {'w4 MiB':>9s} | {'w4/bf16 thr':>11s} {'w4/bf16 mem':>11s}")
    lines = [head, "-" * len(head)]
    for r in t.itertuples():
        lines.append(f"{r.work:6s} {r.batch:5d} | {r.bf16_ms:9.2f} {r.bf16_per_s:9.1f} {r.bf16_peak_mib:9.0f} | "
                     f"{r.w4_ms:9.2f} {r.w4_per_s:9.1f} {r.w4_peak_mib:9.0f} | {r.thr_ratio:11.2f} {r.mem_ratio:11.3f}")
    for e in t.attrs.get("eager", []):
        lines.append(f"(transformers eager bf16, query batch {e['batch']}: {e['ms']:.2f} ms, "
                     f"{e['items_per_s']:.1f} q/s)")
    for e in t.attrs.get("no_copy", []):
        lines.append(f"(w4a16 without BF16 copies, {e['work']} batch {e['batch']}: {e['ms']:.2f} ms, peak "
                     f"{e['peak_mib']:.0f} MiB, w4/bf16 thr {e['items_per_s'] / e['items_per_s_bf16']:.2f})")
    for e in t.attrs.get("offload", []):
        lines.append(f"({e['precision']}, query batch {e['batch']}: {e['ms']:.2f} ms, peak {e['peak_mib']:.0f} MiB)")
    return "\n".join(lines)


def evaluate_targets(t, report, cfg):
    res = {}

    def put(name, value, met):
        res[name] = dict(value=None if value is None else round(float(value), 4), met=bool(met))

    q = t[t.work == "query"]
    p = t[t.work == "page"]
    small = q[q.batch <= 4]
    rest = q[q.batch > 4]
    if len(small):
        put("ratio_query_batch_le4_min", small.thr_ratio.min(), small.thr_ratio.min() >= TARGETS["ratio_small_batch"])
    if len(rest) or len(p):
        vals = list(rest.thr_ratio) + list(p.thr_ratio)
        put("ratio_larger_batches_and_pages_min", min(vals), min(vals) >= TARGETS["ratio_elsewhere"])
    b1 = q[q.batch == 1]
    if len(b1):
        put("bf16_query_b1_ms", b1.bf16_ms.iloc[0], b1.bf16_ms.iloc[0] <= TARGETS["bf16_b1_ms"])
        put("w4_query_b1_ms", b1.w4_ms.iloc[0], b1.w4_ms.iloc[0] <= TARGETS["w4_b1_ms"])
    if len(q):
        best = max(q.bf16_per_s.max(), q.w4_per_s.max())
        put("large_batch_qps_best", best, best >= TARGETS["large_batch_qps"])
    if len(p):
        best = max(p.bf16_per_s.max(), p.w4_per_s.max())
        put("pages_per_s_best", best, best >= TARGETS["pages_per_s"])
    mb = q[q.batch == cfg["memory_batch"]]
    if len(mb):
        put(f"mem_ratio_b{cfg['memory_batch']}", mb.mem_ratio.iloc[0], mb.mem_ratio.iloc[0] <= TARGETS["memory_ratio_b64"])
    off = {(e["precision"], e["batch"]): e for e in t.attrs.get("offload", [])}
    w4o = off.get(("w4a16+emb-offload", cfg["memory_batch"]))
    if w4o is not None and len(mb):
        put(f"mem_ratio_b{cfg['memory_batch']}_w4_emb_offload_vs_bf16", w4o["peak_mib"] / mb.bf16_peak_mib.iloc[0],
            w4o["peak_mib"] / mb.bf16_peak_mib.iloc[0] <= TARGETS["memory_ratio_b64"])
    if "kernel_worst_rel_err" in report:
        put("kernel_worst_rel_err", report["kernel_worst_rel_err"],
            report["kernel_checks_all_ok"] and report["kernel_worst_rel_err"] <= TARGETS["kernel_rel_err"])
    return res


def _version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except Exception:
        pass
    return str(o)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="colquant bench", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="synthetic-4b", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench-<profile>.json)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--query-batches", default=None, help="comma list, overrides the profile")
    ap.add_argument("--page-batches", default=None, help="comma list, overrides the profile")
    ap.add_argument("--no-calibrate", action="store_true", help="per-GEMM table: time only dequant+cuBLAS")
    args = ap.parse_args(argv)
    overrides = {}
    if args.query_batches:
        overrides["query_batches"] = [int(x) for x in args.query_batches.split(",") if x]
    if args.page_batches is not None:
        overrides["page_batches"] = [int(x) for x in args.page_batches.split(",") if x]
    if args.no_calibrate:
        overrides["calibrate"] = False
    out = args.out or f"benchmarks/results/bench-{args.profile}.json"
    run_bench(args.profile, out, device=args.device, overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
