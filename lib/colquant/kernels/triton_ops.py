"""Triton kernels for the fused Qwen3-VL text tower, besides the GEMMs (:mod:`.triton_gemm`,
whose API is re-exported here so callers hold one module).

Imported only when Triton is importable (see :mod:`colquant.kernels.backend`). Every kernel has a
plain-torch twin in :mod:`colquant.kernels.reference` with the same signature; the CPU tests and the
GPU checks compare them.

* ``add_rmsnorm``: ``r = x + d`` (optional) and ``y = rmsnorm(r) * w`` in one pass.
* ``silu_mul``: ``silu(gate) * up``.
* ``qk_norm_rope``: per-head RMSNorm of q and k, rotary embedding, and the split of the fused qkv
  rows into ``[B, H, T, D]`` q/k/v views of token-major storage for SDPA (long sequences).
* ``short_attention``: for sequences of at most 128 tokens, everything between the qkv GEMM and
  o_proj in one kernel: q/k RMSNorm, rotary embedding, causal + padding mask, softmax, P @ V,
  written straight in o_proj's input layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from colquant.kernels.triton_gemm import default_config, dequant_w4, split_for, w4a16_matmul

__all__ = ["add_rmsnorm", "silu_mul", "qk_norm_rope", "short_attention", "SHORT_ATTENTION_MAX_T",
           "w4a16_matmul", "dequant_w4", "default_config", "split_for"]

# --------------------------------------------------------------------------------------------
# norms and activations
# --------------------------------------------------------------------------------------------


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, r_ptr, y_ptr, w_ptr, N, eps, HAS_DELTA: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * N + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
        tl.store(r_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * N + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x, delta, weight, eps, *, residual_out=None, out=None):
    """Returns ``(residual, y)``: ``residual = x + delta`` (or ``x`` when ``delta`` is None) and
    ``y = rmsnorm(residual) * weight``, rounding like transformers' Qwen3 RMSNorm."""
    M, N = x.shape
    y = torch.empty_like(x) if out is None else out
    if delta is not None:
        r = torch.empty_like(x) if residual_out is None else residual_out
    else:
        r = x
    BLOCK = triton.next_power_of_2(N)
    _add_rmsnorm_kernel[(M,)](x, delta if delta is not None else x, r, y, weight, N, eps,
                              HAS_DELTA=delta is not None, BLOCK=BLOCK, num_warps=8 if BLOCK >= 2048 else 4)
    return r, y


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(x_ptr + row * 2 * I + offs, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * 2 * I + I + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)
    tl.store(y_ptr + row * I + offs, a.to(g.dtype), mask=mask)


def silu_mul(x):
    M, two_i = x.shape
    I = two_i // 2
    y = torch.empty((M, I), device=x.device, dtype=x.dtype)
    BLOCK = 1024
    _silu_mul_kernel[(M, triton.cdiv(I, BLOCK))](x, y, I, BLOCK=BLOCK, num_warps=4)
    return y


# --------------------------------------------------------------------------------------------
# attention helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _norm_rope_half(x1, x2, w1, w2, c1, c2, s1, s2, eps, D: tl.constexpr, DT: tl.constexpr):
    """RMSNorm over the head (halves x1, x2 of [R, D/2]) then rotary embedding; fp32 in/out.
    Rounds to the activation dtype where transformers does (after the norm, after the rope)."""
    ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
    rstd = 1.0 / tl.sqrt(ss / D + eps)
    n1 = (x1 * rstd[:, None]).to(DT).to(tl.float32) * w1[None, :]
    n2 = (x2 * rstd[:, None]).to(DT).to(tl.float32) * w2[None, :]
    n1 = n1.to(DT).to(tl.float32)
    n2 = n2.to(DT).to(tl.float32)
    o1 = n1 * c1 - n2 * s1
    o2 = n2 * c2 + n1 * s2
    return o1, o2


@triton.jit
def _load_halves(rows, mask, D: tl.constexpr):
    """The two halves ([R, D/2], fp32) of the D-wide rows starting at ``rows`` ([R, 1] pointers)."""
    d = tl.arange(0, D // 2)
    lo = tl.load(rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(rows + D // 2 + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return lo, hi


@triton.jit
def _store_halves(rows, lo, hi, mask, D: tl.constexpr):
    """Store halves ``lo``, ``hi`` as the D-wide rows starting at ``rows``, in their element type."""
    d = tl.arange(0, D // 2)
    tl.store(rows + d[None, :], lo.to(rows.dtype.element_ty), mask=mask)
    tl.store(rows + D // 2 + d[None, :], hi.to(rows.dtype.element_ty), mask=mask)


@triton.jit
def _load_norm_rope(heads, w_ptr, mask, c1, c2, s1, s2, eps, D: tl.constexpr, DT: tl.constexpr):
    """The heads starting at ``heads`` ([R, 1] pointers) RMSNormed with ``w_ptr``'s weight and
    rotated: both kernels' q and k go through this, as halves (fp32)."""
    x1, x2 = _load_halves(heads, mask, D)
    d = tl.arange(0, D // 2)
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + D // 2 + d).to(tl.float32)
    return _norm_rope_half(x1, x2, w1, w2, c1, c2, s1, s2, eps, D, DT)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr,
                         eps, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                         HP: tl.constexpr):
    """One program per token: q/k heads normed + roped, q/k/v written token-major ([B, T, H, D])."""
    tok = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = D // 2
    ROW: tl.constexpr = (HQ + 2 * HKV) * D
    h = tl.arange(0, HP)
    d = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + tok * D + d).to(tl.float32)
    c2 = tl.load(cos_ptr + tok * D + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + tok * D + d).to(tl.float32)
    s2 = tl.load(sin_ptr + tok * D + HALF + d).to(tl.float32)
    base = qkv_ptr + tok * ROW
    DT = qkv_ptr.dtype.element_ty
    # queries
    mq = (h < HQ)[:, None]
    o1, o2 = _load_norm_rope(base + h[:, None] * D, qw_ptr, mq, c1, c2, s1, s2, eps, D, DT)
    _store_halves(q_ptr + (tok * HQ + h[:, None]) * D, o1, o2, mq, D)
    # keys
    mk = (h < HKV)[:, None]
    o1, o2 = _load_norm_rope(base + (HQ + h[:, None]) * D, kw_ptr, mk, c1, c2, s1, s2, eps, D, DT)
    _store_halves(k_ptr + (tok * HKV + h[:, None]) * D, o1, o2, mk, D)
    # values (copy)
    vb = base + (HQ + HKV) * D
    dd = tl.arange(0, D)
    v = tl.load(vb + h[:, None] * D + dd[None, :], mask=mk, other=0.0)
    tl.store(v_ptr + (tok * HKV + h[:, None]) * D + dd[None, :], v, mask=mk)


def qk_norm_rope(qkv, cos, sin, q_weight, k_weight, eps, B, T, HQ, HKV, D):
    """``qkv [B*T, (HQ+2HKV)*D]`` -> q ``[B,HQ,T,D]``, k, v ``[B,HKV,T,D]`` (normed, roped), stored
    token-major (``[B,T,H,D]`` in memory, returned as transposed views): SDPA reads any strides,
    and its output then comes out token-major too, so o_proj's input is a view, not a copy."""
    q = torch.empty((B, T, HQ, D), device=qkv.device, dtype=qkv.dtype)
    k = torch.empty((B, T, HKV, D), device=qkv.device, dtype=qkv.dtype)
    v = torch.empty((B, T, HKV, D), device=qkv.device, dtype=qkv.dtype)
    HP = triton.next_power_of_2(max(HQ, HKV))
    _qk_norm_rope_kernel[(B * T,)](qkv, cos, sin, q_weight, k_weight, q, k, v, eps,
                                   HQ=HQ, HKV=HKV, D=D, HP=HP, num_warps=8)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@triton.jit
def _short_attn_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, mask_ptr, out_ptr,
                       T, eps, sm_scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       BT: tl.constexpr, BQ: tl.constexpr):
    """One (sequence, query head, block of BQ queries): q/k RMSNorm + RoPE, masked softmax, P @ V."""
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    qb = tl.program_id(2)
    hk = hq // (HQ // HKV)
    ROW: tl.constexpr = (HQ + 2 * HKV) * D
    DT = qkv_ptr.dtype.element_ty
    dd = tl.arange(0, D)
    # keys / values: the whole (short) sequence
    t = tl.arange(0, BT)
    mt = t < T
    tok = b * T + t
    rows = qkv_ptr + tok[:, None] * ROW
    c1, c2 = _load_halves(cos_ptr + tok[:, None] * D, mt[:, None], D)
    s1, s2 = _load_halves(sin_ptr + tok[:, None] * D, mt[:, None], D)
    k1, k2 = _load_norm_rope(rows + (HQ + hk) * D, kw_ptr, mt[:, None], c1, c2, s1, s2, eps, D, DT)
    v = tl.load(rows + (HQ + HKV + hk) * D + dd[None, :], mask=mt[:, None], other=0.0)
    # queries of this block
    tq = qb * BQ + tl.arange(0, BQ)
    mq = tq < T
    tokq = b * T + tq
    rq = qkv_ptr + tokq[:, None] * ROW
    qc1, qc2 = _load_halves(cos_ptr + tokq[:, None] * D, mq[:, None], D)
    qs1, qs2 = _load_halves(sin_ptr + tokq[:, None] * D, mq[:, None], D)
    q1, q2 = _load_norm_rope(rq + hq * D, qw_ptr, mq[:, None], qc1, qc2, qs1, qs2, eps, D, DT)
    s = tl.dot(q1.to(DT), tl.trans(k1.to(DT))) + tl.dot(q2.to(DT), tl.trans(k2.to(DT)))
    s = s * sm_scale
    key_ok = tl.load(mask_ptr + b * T + t, mask=mt, other=0) != 0
    i = tq[:, None]
    j = t[None, :]
    allowed = (j <= i) & (key_ok[None, :] | (j == i)) & (j < T)
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    o = tl.dot(p.to(DT), v)
    tl.store(out_ptr + tokq[:, None] * (HQ * D) + hq * D + dd[None, :], o.to(DT), mask=mq[:, None])


def short_attention(qkv, cos, sin, q_weight, k_weight, key_mask, eps, B, T, HQ, HKV, D):
    """Causal attention for ``T <= 128`` straight from the fused qkv rows; ``key_mask [B, T]``
    (nonzero = real token). Returns ``[B*T, HQ*D]``. A padding query attends only to itself, so
    padded rows stay finite. Few sequences: queries are split in blocks of 16 for parallelism."""
    out = torch.empty((B * T, HQ * D), device=qkv.device, dtype=qkv.dtype)
    BT = max(16, triton.next_power_of_2(T))
    BQ = 16 if B * HQ < 512 else BT
    _short_attn_kernel[(B, HQ, triton.cdiv(T, BQ))](
        qkv, cos, sin, q_weight, k_weight, key_mask, out, T, eps, D ** -0.5,
        HQ=HQ, HKV=HKV, D=D, BT=BT, BQ=BQ, num_warps=4 if BT <= 64 else 8)
    return out


SHORT_ATTENTION_MAX_T = 128
