"""Checks the benchmark runs before it times anything: every 4-bit GEMM route and every fused op
against its reference on fresh random inputs, and embeddings of one model against another's.

The GEMM checks are the autotuner's own (`autotune.tune_shape`: each candidate checked against a
float32 product of the same dequantized weights, poisoned output, then timed in CUDA graphs over
rotating weights), reported per layer shape and token count beside BF16 cuBLAS.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("colquant.kernels")

FUSED_OP_REL_ERR = 1e-2  # bf16 operands: references in float32 land between 1e-3 and 1e-2


def gemm_checks(text_config: Any, group_size: int, device: torch.device, ms: list[int]) -> list[dict]:
    """One row per text-tower layer shape and token count: the fastest 4-bit route that passed its
    check, its time, BF16 cuBLAS's, and every route that passed (`timed_us`)."""
    from colquant.kernels.autotune import text_tower_shapes, tune_shape
    from colquant.kernels.linear import m_bucket

    names = _shape_names(text_config)
    rows = []
    for k, n, g in sorted(text_tower_shapes(text_config, group_size)):
        by_bucket = {e["M_bucket"]: e for e in tune_shape(k, n, g, device, tuple(ms))}
        for m in ms:
            rows.append(_gemm_row(names[(k, n)], k, n, m, by_bucket.get(m_bucket(m))))
    return rows


def _gemm_row(shape: str, k: int, n: int, m: int, entry: dict | None) -> dict:
    if entry is None:  # every 4-bit route failed its check (logged by the autotuner)
        return dict(shape=shape, K=k, N=n, M=m, ok=False)
    w4_us, bf16_us = entry["us"], entry.get("bf16_us")
    return dict(shape=shape, K=k, N=n, M=m, ok=True, bf16_us=bf16_us, w4_us=w4_us,
                w4_choice=entry.get("fallback_name", entry["name"]), dispatch=entry["name"],
                speedup=bf16_us / w4_us if bf16_us else None, timed_us=entry.get("timed_us"))


def _shape_names(text_config: Any) -> dict[tuple[int, int], str]:
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    return {(hidden, (heads + 2 * kv_heads) * head_dim): "qkv", (heads * head_dim, hidden): "o",
            (hidden, 2 * inter): "gate_up", (inter, hidden): "down"}


def fused_op_checks(device: torch.device, text_config: Any) -> list[dict]:
    """The text tower's Triton fused ops against their torch references, at query and page lengths."""
    from colquant.kernels import reference as ref
    from colquant.kernels import triton_ops as tk

    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    kv_heads = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    dt = torch.bfloat16
    x, d = (torch.randn(333, hidden, device=device, dtype=dt) for _ in range(2))
    w = torch.randn(hidden, device=device, dtype=dt)
    r1, y1 = tk.add_rmsnorm(x, d, w, 1e-6)
    r2, y2 = ref.add_rmsnorm(x, d, w, 1e-6)
    out = [_op_row("add_rmsnorm", y1, y2, residual_exact=bool(torch.equal(r1, r2)))]
    gu = torch.randn(333, 2 * 4096, device=device, dtype=dt)
    out.append(_op_row("silu_mul", tk.silu_mul(gu), ref.silu_mul(gu)))
    for batch, length in ((1, 44), (4, 44), (2, 300)):
        args = _attention_inputs(batch, length, heads, kv_heads, head_dim, device)
        qkv, cos, sin, qw, kw, key_mask = args
        dims = (1e-6, batch, length, heads, kv_heads, head_dim)
        fast = tk.qk_norm_rope(qkv, cos, sin, qw, kw, *dims)
        slow = ref.qk_norm_rope(qkv, cos, sin, qw, kw, *dims)
        out.append(_op_row(f"qk_norm_rope B{batch} T{length}", torch.cat([t.flatten() for t in fast]),
                           torch.cat([t.flatten() for t in slow])))
        if length <= 128:
            valid = key_mask.reshape(-1).bool()
            o1 = tk.short_attention(*args, *dims)
            o2 = ref.short_attention(*args, *dims)
            out.append(_op_row(f"short_attention B{batch} T{length}", o1[valid], o2[valid]))
    return out


def _attention_inputs(batch: int, length: int, heads: int, kv_heads: int, head_dim: int, device: torch.device):
    dt = torch.bfloat16
    qkv = torch.randn(batch * length, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dt)
    angles = torch.rand(batch, length, head_dim // 2, device=device) * 6.28
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dt)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dt)
    qw, kw = (1 + 0.1 * torch.randn(head_dim, device=device, dtype=dt) for _ in range(2))
    key_mask = torch.ones(batch, length, dtype=torch.int32, device=device)
    if batch > 1:
        key_mask[1, : length // 3] = 0  # left padding on one row
    return qkv, cos, sin, qw, kw, key_mask


def _op_row(op: str, fast: torch.Tensor, slow: torch.Tensor, **extra: Any) -> dict:
    err = relative_error(fast, slow)
    finite = bool(torch.isfinite(fast).all())
    return dict(op=op, rel_err=err, finite=finite, ok=finite and err <= FUSED_OP_REL_ERR, **extra)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compare(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    """Embeddings `a` against reference `b` (batch, tokens, dim) over the real tokens of `mask`:
    worst and mean token cosine, relative error, and whether padding rows are exact zeros."""
    keep = mask.bool()
    cos = torch.nn.functional.cosine_similarity(a[keep].float(), b[keep].float(), dim=-1)
    return dict(cos_min=cos.min().item(), cos_mean=cos.mean().item(), rel_err=relative_error(a[keep], b[keep]),
                padding_exact_zero=bool(torch.equal(a[~keep], torch.zeros_like(a[~keep]))),
                finite=bool(torch.isfinite(a).all()))


def kernel_checks(text_config: Any, group_size: int, device: torch.device, ms: list[int]) -> dict:
    """The benchmark's kernel section: GEMM rows, fused-op rows, and whether all passed."""
    gemm = gemm_checks(text_config, group_size, device, ms)
    fused = fused_op_checks(device, text_config)
    ok = all(row["ok"] for row in gemm + fused)
    logger.info("colquant.kernels: checks: %d GEMM (shape, M) and %d fused ops, %s", len(gemm), len(fused),
                "all passed" if ok else "FAILURES: " + ", ".join(
                    str(r.get("op") or (r["shape"], r["M"])) for r in gemm + fused if not r["ok"]))
    return dict(gemm=gemm, fused_op_checks=fused, kernel_checks_all_ok=ok)
