"""Triton kernels for W4A16 inference of the Qwen3-VL text tower.

Imported only when Triton is importable (see :mod:`colquant.kernels.backend`). Every kernel has a
plain-torch twin in :mod:`colquant.kernels.reference` with the same signature; the CPU tests and the
GPU benchmark compare them.

Kernels
-------
* ``w4a16_matmul``: ``y = x @ W`` with ``W`` held as 4-bit integers in the n-packed layout
  (``qweight_n [K, N/8]``, ``zeros_n [K/G, N/8]``, ``scales [K/G, N]``, see :mod:`.packing`),
  dequantized inside the main loop. One kernel covers the GEMV/split-K regime (few tokens: small
  ``BM``, K split over programs, fp32 partials summed by ``splitk_reduce``) and the tiled regime
  (many tokens). Optional prologue ``ACT``: the input is ``[M, 2K]`` = (gate | up) and the kernel
  feeds ``silu(gate) * up`` to the dot, so the MLP needs no separate activation kernel.
* ``dequant_w4``: whole weight to a bf16/fp16 ``[K, N]`` scratch (large-M path: dequantize once,
  then cuBLAS).
* ``add_rmsnorm``: ``r = x + d`` (optional) and ``y = rmsnorm(r) * w`` in one pass.
* ``silu_mul``: ``silu(gate) * up`` for the bf16 path.
* ``qk_norm_rope``: per-head RMSNorm of q and k, rotary embedding, and the split of the fused qkv
  rows into ``[B, H, T, D]`` q/k/v for SDPA (long sequences).
* ``short_attention``: for sequences of at most 128 tokens, everything between the qkv GEMM and
  o_proj in one kernel: q/k RMSNorm, rotary embedding, causal + padding mask, softmax, P @ V,
  written straight in o_proj's input layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# W4A16 GEMM
# --------------------------------------------------------------------------------------------


@triton.jit
def _unpack_cols(words, BN: tl.constexpr):
    """[R, BN/8] int32 -> [R, BN] int32 nibbles (word j nibble i -> column 8j + i)."""
    w = tl.interleave(words, words)
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)
    shifts = (tl.arange(0, BN) % 8) * 4
    return (w >> shifts[None, :]) & 0xF


@triton.jit
def _unpack_vec(words, BN: tl.constexpr):
    w = tl.interleave(words, words)
    w = tl.interleave(w, w)
    w = tl.interleave(w, w)
    shifts = (tl.arange(0, BN) % 8) * 4
    return (w >> shifts) & 0xF


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, SPLIT_K,
    GROUP_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PARTIAL: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    SCALE_ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    NW = N // 8
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_nw = pid_n * (BN // 8) + tl.arange(0, BN // 8)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_nw = offs_nw < NW

    n_iters = K // BK
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (it0 * BK + offs_k)[None, :]
    qw_ptrs = qw_ptr + (it0 * BK + offs_k)[:, None].to(tl.int64) * NW + offs_nw[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(it0, it1):
        k = it * BK
        if ACT:
            g = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            u = tl.load(x_ptrs + K, mask=mask_m[:, None], other=0.0)
            gf = g.to(tl.float32)
            a = ((gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        qw = tl.load(qw_ptrs, mask=mask_nw[None, :], other=0)
        grp = k // GROUP_SIZE
        zw = tl.load(z_ptr + grp * NW + offs_nw, mask=mask_nw, other=0)
        s = tl.load(s_ptr + grp * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        q = _unpack_cols(qw, BN)
        z = _unpack_vec(zw, BN)
        if SCALE_ACC:
            # (q - z) is a small integer: exact in bf16/fp16; scale the partial product instead.
            w = (q - z[None, :]).to(a.dtype)
            acc += tl.dot(a, w) * s[None, :]
        else:
            w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(a.dtype)
            acc = tl.dot(a, w, acc)
        x_ptrs += BK
        qw_ptrs += BK * NW

    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        o_ptrs = out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(o_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(p_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def w4a16_matmul(x, qweight_n, zeros_n, scales, group_size, *, bias=None, act=False, cfg=None, out=None):
    """``x [M, K]`` (or ``[M, 2K]`` with ``act``) times the 4-bit ``W [K, N]`` -> ``[M, N]``.

    ``cfg`` = dict(BM, BN, BK, SPLIT_K, GROUP_M, num_warps, num_stages, SCALE_ACC).
    """
    M = x.shape[0]
    K = qweight_n.shape[0]
    N = qweight_n.shape[1] * 8
    assert x.stride(-1) == 1
    assert x.shape[1] == (2 * K if act else K), (x.shape, K, act)
    cfg = cfg or default_config(M, N, K)
    BM, BN, BK, split = cfg["BM"], cfg["BN"], cfg["BK"], cfg["SPLIT_K"]
    assert group_size % BK == 0 and K % BK == 0, (group_size, BK, K)
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid_mn = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    n_iters = K // BK
    split = max(1, min(split, n_iters))
    # every split must own at least one iteration
    while split > 1 and (split - 1) * triton.cdiv(n_iters, split) >= n_iters:
        split -= 1
    target = out if split == 1 else torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    _w4a16_kernel[(grid_mn, split)](
        x, qweight_n, zeros_n, scales, bias if bias is not None else scales, target,
        M, N, K, x.stride(0), out.stride(0) if split == 1 else N, split,
        GROUP_SIZE=group_size, BM=BM, BN=BN, BK=BK, PARTIAL=split > 1, GROUP_M=cfg.get("GROUP_M", 8),
        HAS_BIAS=bias is not None and split == 1, ACT=act, SCALE_ACC=cfg.get("SCALE_ACC", False),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    if split > 1:
        MN = M * N
        BLOCK = 1024
        _splitk_reduce_kernel[(triton.cdiv(MN, BLOCK),)](
            target, bias if bias is not None else target, out, MN, N, SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)
    return out


def default_config(M, N, K):
    """Hand-picked tiles for H100-class GPUs; the benchmark's calibration can override them."""
    if M <= 16:
        return dict(BM=16, BN=128, BK=128, SPLIT_K=_split_for(M, N, K, 16, 128, 128), GROUP_M=1,
                    num_warps=4, num_stages=4, SCALE_ACC=False)
    if M <= 64:
        return dict(BM=64, BN=128, BK=64, SPLIT_K=_split_for(M, N, K, 64, 128, 64), GROUP_M=1,
                    num_warps=4, num_stages=4, SCALE_ACC=False)
    if M <= 256:
        return dict(BM=64, BN=128, BK=64, SPLIT_K=_split_for(M, N, K, 64, 128, 64), GROUP_M=8,
                    num_warps=4, num_stages=4, SCALE_ACC=False)
    return dict(BM=128, BN=128, BK=64, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=4, SCALE_ACC=False)


_SM_COUNT = {}


def _sm_count(device=None):
    idx = torch.cuda.current_device() if device is None else device
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _split_for(M, N, K, BM, BN, BK, waves=1.0):
    """Smallest split-K that gives about one wave of programs."""
    try:
        sms = _sm_count()
    except Exception:  # pragma: no cover - no CUDA (interpreter)
        sms = 132
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    split = 1
    while tiles * split < waves * sms and split * 2 <= max(1, K // BK // 2):
        split *= 2
    return split


# --------------------------------------------------------------------------------------------
# dequantize to a 16-bit scratch (large M)
# --------------------------------------------------------------------------------------------


@triton.jit
def _dequant_kernel(qw_ptr, z_ptr, s_ptr, out_ptr, N, K, GROUP_SIZE: tl.constexpr, BK: tl.constexpr,
                    BN: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    NW = N // 8
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_nw = pid_n * (BN // 8) + tl.arange(0, BN // 8)
    mask_nw = offs_nw < NW
    mask_n = offs_n < N
    mask_k = offs_k < K
    qw = tl.load(qw_ptr + offs_k[:, None].to(tl.int64) * NW + offs_nw[None, :],
                 mask=mask_k[:, None] & mask_nw[None, :], other=0)
    grp = (pid_k * BK) // GROUP_SIZE
    zw = tl.load(z_ptr + grp * NW + offs_nw, mask=mask_nw, other=0)
    s = tl.load(s_ptr + grp * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    q = _unpack_cols(qw, BN)
    z = _unpack_vec(zw, BN)
    # round through fp16 first, exactly like auto-round's dequant (fp16 scales * int -> fp16 -> dtype)
    w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(tl.float16)
    tl.store(out_ptr + offs_k[:, None].to(tl.int64) * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask_k[:, None] & mask_n[None, :])


def dequant_w4(qweight_n, zeros_n, scales, group_size, *, dtype=torch.bfloat16, out=None):
    K = qweight_n.shape[0]
    N = qweight_n.shape[1] * 8
    if out is None:
        out = torch.empty((K, N), device=qweight_n.device, dtype=dtype)
    BK = min(32, group_size)
    BN = 256
    _dequant_kernel[(triton.cdiv(K, BK), triton.cdiv(N, BN))](
        qweight_n, zeros_n, scales, out, N, K, GROUP_SIZE=group_size, BK=BK, BN=BN, num_warps=4)
    return out


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
def _qk_norm_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr,
                         T, eps, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                         HP: tl.constexpr):
    """One program per token: q/k heads normed + roped, q/k/v scattered to [B, H, T, D]."""
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    HALF: tl.constexpr = D // 2
    ROW: tl.constexpr = (HQ + 2 * HKV) * D
    h = tl.arange(0, HP)
    d = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + tok * D + d).to(tl.float32)
    c2 = tl.load(cos_ptr + tok * D + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + tok * D + d).to(tl.float32)
    s2 = tl.load(sin_ptr + tok * D + HALF + d).to(tl.float32)
    base = qkv_ptr + tok * ROW
    # queries
    mq = (h < HQ)[:, None]
    x1 = tl.load(base + h[:, None] * D + d[None, :], mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(base + h[:, None] * D + HALF + d[None, :], mask=mq, other=0.0).to(tl.float32)
    w1 = tl.load(qw_ptr + d).to(tl.float32)
    w2 = tl.load(qw_ptr + HALF + d).to(tl.float32)
    o1, o2 = _norm_rope_half(x1, x2, w1, w2, c1, c2, s1, s2, eps, D, qkv_ptr.dtype.element_ty)
    dst = q_ptr + ((b * HQ + h[:, None]) * T + t) * D
    tl.store(dst + d[None, :], o1.to(q_ptr.dtype.element_ty), mask=mq)
    tl.store(dst + HALF + d[None, :], o2.to(q_ptr.dtype.element_ty), mask=mq)
    # keys
    mk = (h < HKV)[:, None]
    kb = base + HQ * D
    x1 = tl.load(kb + h[:, None] * D + d[None, :], mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(kb + h[:, None] * D + HALF + d[None, :], mask=mk, other=0.0).to(tl.float32)
    w1 = tl.load(kw_ptr + d).to(tl.float32)
    w2 = tl.load(kw_ptr + HALF + d).to(tl.float32)
    o1, o2 = _norm_rope_half(x1, x2, w1, w2, c1, c2, s1, s2, eps, D, qkv_ptr.dtype.element_ty)
    dst = k_ptr + ((b * HKV + h[:, None]) * T + t) * D
    tl.store(dst + d[None, :], o1.to(k_ptr.dtype.element_ty), mask=mk)
    tl.store(dst + HALF + d[None, :], o2.to(k_ptr.dtype.element_ty), mask=mk)
    # values (copy)
    vb = base + (HQ + HKV) * D
    dd = tl.arange(0, D)
    v = tl.load(vb + h[:, None] * D + dd[None, :], mask=mk, other=0.0)
    tl.store(v_ptr + ((b * HKV + h[:, None]) * T + t) * D + dd[None, :], v, mask=mk)


def qk_norm_rope(qkv, cos, sin, q_weight, k_weight, eps, B, T, HQ, HKV, D):
    """``qkv [B*T, (HQ+2HKV)*D]`` -> q ``[B,HQ,T,D]``, k, v ``[B,HKV,T,D]`` (normed, roped)."""
    q = torch.empty((B, HQ, T, D), device=qkv.device, dtype=qkv.dtype)
    k = torch.empty((B, HKV, T, D), device=qkv.device, dtype=qkv.dtype)
    v = torch.empty((B, HKV, T, D), device=qkv.device, dtype=qkv.dtype)
    HP = triton.next_power_of_2(max(HQ, HKV))
    _qk_norm_rope_kernel[(B * T,)](qkv, cos, sin, q_weight, k_weight, q, k, v, T, eps,
                                   HQ=HQ, HKV=HKV, D=D, HP=HP, num_warps=8)
    return q, k, v


@triton.jit
def _short_attn_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, mask_ptr, out_ptr,
                       T, eps, sm_scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       BT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    hk = hq // (HQ // HKV)
    HALF: tl.constexpr = D // 2
    ROW: tl.constexpr = (HQ + 2 * HKV) * D
    t = tl.arange(0, BT)
    d = tl.arange(0, HALF)
    mt = t < T
    tok = b * T + t
    c1 = tl.load(cos_ptr + tok[:, None] * D + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tok[:, None] * D + HALF + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tok[:, None] * D + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + tok[:, None] * D + HALF + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    rows = qkv_ptr + tok[:, None] * ROW
    # q
    x1 = tl.load(rows + hq * D + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(rows + hq * D + HALF + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    w1 = tl.load(qw_ptr + d).to(tl.float32)
    w2 = tl.load(qw_ptr + HALF + d).to(tl.float32)
    q1, q2 = _norm_rope_half(x1, x2, w1, w2, c1, c2, s1, s2, eps, D, qkv_ptr.dtype.element_ty)
    # k
    x1 = tl.load(rows + (HQ + hk) * D + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(rows + (HQ + hk) * D + HALF + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    w1 = tl.load(kw_ptr + d).to(tl.float32)
    w2 = tl.load(kw_ptr + HALF + d).to(tl.float32)
    k1, k2 = _norm_rope_half(x1, x2, w1, w2, c1, c2, s1, s2, eps, D, qkv_ptr.dtype.element_ty)
    dd = tl.arange(0, D)
    v = tl.load(rows + (HQ + HKV + hk) * D + dd[None, :], mask=mt[:, None], other=0.0)
    dt = v.dtype
    s = tl.dot(q1.to(dt), tl.trans(k1.to(dt))) + tl.dot(q2.to(dt), tl.trans(k2.to(dt)))
    s = s * sm_scale
    key_ok = tl.load(mask_ptr + b * T + t, mask=mt, other=0) != 0
    i = t[:, None]
    j = t[None, :]
    allowed = (j <= i) & (key_ok[None, :] | (j == i)) & (j < T)
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    o = tl.dot(p.to(dt), v)
    tl.store(out_ptr + tok[:, None] * (HQ * D) + hq * D + dd[None, :], o.to(dt), mask=mt[:, None])


def short_attention(qkv, cos, sin, q_weight, k_weight, key_mask, eps, B, T, HQ, HKV, D):
    """Causal attention for ``T <= 128`` straight from the fused qkv rows; ``key_mask [B, T]``
    (nonzero = real token). Returns ``[B*T, HQ*D]``. A padding query attends only to itself, so
    padded rows stay finite."""
    out = torch.empty((B * T, HQ * D), device=qkv.device, dtype=qkv.dtype)
    BT = max(16, triton.next_power_of_2(T))
    _short_attn_kernel[(B, HQ)](qkv, cos, sin, q_weight, k_weight, key_mask, out, T, eps, D ** -0.5,
                                HQ=HQ, HKV=HKV, D=D, BT=BT, num_warps=4 if BT <= 64 else 8)
    return out


SHORT_ATTENTION_MAX_T = 128
