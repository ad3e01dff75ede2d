"""Triton kernels for W4A16 inference of the Qwen3-VL text tower.

Imported only when Triton is importable (see :mod:`colquant.kernels.backend`). Every kernel has a
plain-torch twin in :mod:`colquant.kernels.reference` with the same signature; the CPU tests and the
GPU benchmark compare them.

Kernels
-------
* ``w4a16_matmul``: ``y = x @ W`` with ``W`` held as 4-bit integers in the k-blocked layout
  (``qweight_k [K/8, N]``, ``zeros_u8 [K/G, N]``, ``scales [K/G, N]``, see :mod:`.packing`),
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
def _group_sz(s_ptr, z_ptr, g, N, offs_n, mask_n, SYM_ZERO: tl.constexpr):
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SYM_ZERO > 0:
        z = tl.full(offs_n.shape, SYM_ZERO, tl.int32)
    else:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)
    return s, z


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, SPLIT_K,
    GROUP_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PARTIAL: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    SCALE_ACC: tl.constexpr, SYM_ZERO: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W[K, N], W in the k-blocked 4-bit layout (see packing.py).

    Per block of 128 input features: one [16, BN] tile of words; nibble i of it is the [16, BN]
    integer tile of features 16i..16i+15, multiplied by x[:, 16i:16i+16] (eight K=16 dots).
    """
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

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    mask_m = offs_m < M
    mask_n = offs_n < N

    n_iters = K // 128
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)

    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_r[None, :] + it0 * 128
    qw_ptrs = qw_ptr + (it0 * 16 + offs_r)[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(it0, it1):
        kb = it * 128
        words = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
        if GROUP_SIZE >= 128:
            s, z = _group_sz(s_ptr, z_ptr, kb // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
        if SCALE_ACC:
            part = tl.zeros((BM, BN), dtype=tl.float32)
        for i in tl.static_range(8):
            if GROUP_SIZE < 128:
                s, z = _group_sz(s_ptr, z_ptr, (kb + 16 * i) // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
            if ACT:
                g = tl.load(x_rows + 16 * i, mask=mask_m[:, None], other=0.0)
                u = tl.load(x_rows + 16 * i + K, mask=mask_m[:, None], other=0.0)
                gf = g.to(tl.float32)
                a = ((gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)).to(g.dtype)
            else:
                a = tl.load(x_rows + 16 * i, mask=mask_m[:, None], other=0.0)
            q = (words >> (4 * i)) & 0xF
            if SCALE_ACC:
                # (q - z) is a small integer: exact in bf16/fp16; the group scale goes on the sum
                part = tl.dot(a, (q - z[None, :]).to(a.dtype), part)
            else:
                w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(a.dtype)
                acc = tl.dot(a, w, acc)
        if SCALE_ACC:
            acc += part * s[None, :]
        qw_ptrs += 16 * N
        x_rows += 128

    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        o_ptrs = out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(o_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel_bc(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, SPLIT_K,
    GROUP_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PARTIAL: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    SCALE_ACC: tl.constexpr, SYM_ZERO: tl.constexpr,
):
    """Same contract as _w4a16_kernel, one K=128 dot per block: the [16, BN] words are broadcast to
    [8, 16, BN], shifted by 4*i along the new axis and reshaped to the [128, BN] integer tile
    (row 16 i + r), so the activation tile is one contiguous, pipelined [BM, 128] load."""
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

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    offs_k = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = (tl.arange(0, 8) * 4)[:, None, None]

    n_iters = K // 128
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (it0 * 128 + offs_k)[None, :]
    qw_ptrs = qw_ptr + (it0 * 16 + offs_r)[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(it0, it1):
        kb = it * 128
        words = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
        if ACT:
            g = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            u = tl.load(x_ptrs + K, mask=mask_m[:, None], other=0.0)
            gf = g.to(tl.float32)
            a = ((gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        q = (tl.broadcast_to(words[None, :, :], (8, 16, BN)) >> shifts) & 0xF
        q = tl.reshape(q, (128, BN))
        s, z = _group_sz(s_ptr, z_ptr, kb // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
        if SCALE_ACC:
            acc += tl.dot(a, (q - z[None, :]).to(a.dtype)) * s[None, :]
        else:
            w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(a.dtype)
            acc = tl.dot(a, w, acc)
        qw_ptrs += 16 * N
        x_ptrs += 128

    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        o_ptrs = out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(o_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel_swap(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, SPLIT_K,
    GROUP_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PARTIAL: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    SCALE_ACC: tl.constexpr, SYM_ZERO: tl.constexpr,
):
    """Few tokens ("swap AB"): computes out^T [BN features, BM tokens] = W^T x^T, so the
    dequantized weights are the dot's *first* operand (held in registers on Hopper, no shared-memory
    round trip) and the tokens only need a small N tile; x^T tiles are pipelined loads."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    pid_n = pid // num_pid_m
    pid_m = pid % num_pid_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    offs_k = tl.arange(0, 128)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = (tl.arange(0, 8) * 4)[None, :, None]

    n_iters = K // 128
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)

    qw_ptrs = qw_ptr + (it0 * 16 + offs_r)[None, :].to(tl.int64) * N + offs_n[:, None]
    xt_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (it0 * 128 + offs_k)[:, None]
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for it in range(it0, it1):
        kb = it * 128
        wt = tl.load(qw_ptrs, mask=mask_n[:, None], other=0)
        if ACT:
            g = tl.load(xt_ptrs, mask=mask_m[None, :], other=0.0)
            u = tl.load(xt_ptrs + K, mask=mask_m[None, :], other=0.0)
            gf = g.to(tl.float32)
            xt = ((gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        else:
            xt = tl.load(xt_ptrs, mask=mask_m[None, :], other=0.0)
        q = (tl.broadcast_to(wt[:, None, :], (BN, 8, 16)) >> shifts) & 0xF
        q = tl.reshape(q, (BN, 128))
        s, z = _group_sz(s_ptr, z_ptr, kb // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
        if SCALE_ACC:
            acc += tl.dot((q - z[:, None]).to(xt.dtype), xt) * s[:, None]
        else:
            w = ((q - z[:, None]).to(tl.float32) * s[:, None]).to(xt.dtype)
            acc = tl.dot(w, xt, acc)
        qw_ptrs += 16 * N
        xt_ptrs += 128

    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        o_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[None, :] & mask_n[:, None])
    else:
        o_ptrs = out_ptr + pid_k.to(tl.int64) * M * N + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        tl.store(o_ptrs, acc, mask=mask_m[None, :] & mask_n[:, None])


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, SPLIT_K,
    GROUP_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, SYM_ZERO: tl.constexpr,
):
    """Few tokens (M <= BM <= 8): no tensor-core dot. Per 128-feature block one [16, BN] word tile;
    nibble i times x[:, 16i:16i+16] summed in registers ([BM, 16, BN] broadcast, reduced over the 16),
    the group scale applied once per block (GROUP_SIZE >= 128)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n_iters = K // 128
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = pid_k * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_r[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(it0, it1):
        kb = it * 128
        words = tl.load(qw_ptr + (it * 16 + offs_r)[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=mask_n[None, :], other=0)
        s, z = _group_sz(s_ptr, z_ptr, kb // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
        part = tl.zeros((BM, BN), dtype=tl.float32)
        for i in tl.static_range(8):
            q = (((words >> (4 * i)) & 0xF) - z[None, :]).to(tl.float32)
            xi = tl.load(x_rows + kb + 16 * i, mask=mask_m[:, None], other=0.0).to(tl.float32)
            part += tl.sum(xi[:, :, None] * q[None, :, :], axis=1)
        acc += part * s[None, :]

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


def w4a16_matmul(x, qweight_k, zeros_u8, scales, group_size, *, bias=None, act=False, cfg=None, out=None,
                 sym_zero=0):
    """``x [M, K]`` (or ``[M, 2K]`` with ``act``: silu(gate) * up) times the 4-bit ``W [K, N]``.

    ``cfg`` = dict(kernel, BM, BN, SPLIT_K, GROUP_M, num_warps, num_stages, SCALE_ACC) with kernel one of
    "8dot" (eight K=16 dots per block), "bc" (one K=128 dot per block), "swap" (W^T x^T: few
    tokens), "gemv" (no dot, M <= BM <= 8, group_size >= 128); ``sym_zero`` = 8
    when every zero point is 8 (symmetric checkpoints: the zeros are not read).
    """
    M = x.shape[0]
    K = qweight_k.shape[0] * 8
    N = qweight_k.shape[1]
    assert x.stride(-1) == 1
    assert x.shape[1] == (2 * K if act else K), (x.shape, K, act)
    assert K % 128 == 0 and (group_size % 128 == 0 or (128 % group_size == 0 and group_size % 16 == 0))
    cfg = cfg or default_config(M, N, K)
    BM, BN, split = cfg["BM"], cfg["BN"], cfg["SPLIT_K"]
    scale_acc = cfg.get("SCALE_ACC", False) and group_size >= 128
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid_mn = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    n_iters = K // 128
    split = max(1, min(split, n_iters))
    while split > 1 and (split - 1) * triton.cdiv(n_iters, split) >= n_iters:  # no empty split
        split -= 1
    target = out if split == 1 else torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    if cfg.get("kernel") == "gemv":
        if group_size < 128 or M > BM:
            raise ValueError(f"the gemv kernel needs group_size >= 128 and M <= BM, got {group_size}, M={M}, BM={BM}")
        if act:
            x = silu_mul(x)
        _w4a16_gemv_kernel[(triton.cdiv(N, BN), split)](
            x, qweight_k, zeros_u8, scales, bias if bias is not None else scales, target,
            M, N, K, x.stride(0), out.stride(0) if split == 1 else N, split,
            GROUP_SIZE=group_size, BM=BM, BN=BN, PARTIAL=split > 1, HAS_BIAS=bias is not None and split == 1,
            SYM_ZERO=sym_zero, num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        )
    else:
        kname = cfg.get("kernel", "8dot") if group_size >= 128 else "8dot"  # bc/swap: one group per block
        kernel = {"8dot": _w4a16_kernel, "bc": _w4a16_kernel_bc, "swap": _w4a16_kernel_swap}[kname]
        kernel[(grid_mn, split)](
            x, qweight_k, zeros_u8, scales, bias if bias is not None else scales, target,
            M, N, K, x.stride(0), out.stride(0) if split == 1 else N, split,
            GROUP_SIZE=group_size, BM=BM, BN=BN, PARTIAL=split > 1, GROUP_M=cfg.get("GROUP_M", 8),
            HAS_BIAS=bias is not None and split == 1, ACT=act, SCALE_ACC=scale_acc, SYM_ZERO=sym_zero,
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        )
    if split > 1:
        MN = M * N
        BLOCK = 1024
        _splitk_reduce_kernel[(triton.cdiv(MN, BLOCK),)](
            target, bias if bias is not None else target, out, MN, N, split,
            HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)
    return out


def default_config(M, N, K):
    """Tiles that won the H100 calibration (benchmarks/results/bench-synthetic-4b.json) for the 4B's
    layers; the benchmark's calibration can override them per (K, N, M bucket)."""
    if M <= 16:
        return dict(kernel="8dot", BM=16, BN=64, SPLIT_K=_split_for(M, N, K, 16, 64, 128, 4), GROUP_M=8,
                    num_warps=4, num_stages=3, SCALE_ACC=True)
    if M <= 64:
        return dict(kernel="bc", BM=64, BN=64, SPLIT_K=_split_for(M, N, K, 64, 64, 128, 2), GROUP_M=8,
                    num_warps=4, num_stages=3, SCALE_ACC=False)
    return dict(kernel="bc", BM=64, BN=128, SPLIT_K=_split_for(M, N, K, 64, 128, 128, 1), GROUP_M=8,
                num_warps=4, num_stages=3, SCALE_ACC=False)


_SM_COUNT = {}


def _sm_count(device=None):
    idx = torch.cuda.current_device() if device is None else device
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _split_for(M, N, K, BM, BN, BK=128, waves=1.0):
    """Smallest power-of-two split-K that gives about ``waves`` waves of programs."""
    try:
        sms = _sm_count()
    except Exception:  # pragma: no cover - no CUDA (interpreter)
        sms = 132
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    split = 1
    while tiles * split < waves * sms and split * 2 <= max(1, K // 128 // 2):
        split *= 2
    return split


# --------------------------------------------------------------------------------------------
# dequantize to a 16-bit scratch (large M)
# --------------------------------------------------------------------------------------------


@triton.jit
def _dequant_kernel(qw_ptr, z_ptr, s_ptr, out_ptr, N, GROUP_SIZE: tl.constexpr, BN: tl.constexpr,
                    SYM_ZERO: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    mask_n = offs_n < N
    words = tl.load(qw_ptr + (blk * 16 + offs_r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    kb = blk * 128
    for i in tl.static_range(8):
        s, z = _group_sz(s_ptr, z_ptr, (kb + 16 * i) // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
        q = (words >> (4 * i)) & 0xF
        # round through fp16 first, exactly like auto-round (fp16 scales * int -> fp16 -> dtype)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(tl.float16)
        tl.store(out_ptr + (kb + 16 * i + offs_r)[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mask_n[None, :])


def dequant_w4(qweight_k, zeros_u8, scales, group_size, *, dtype=torch.bfloat16, out=None, sym_zero=0):
    K = qweight_k.shape[0] * 8
    N = qweight_k.shape[1]
    if out is None:
        out = torch.empty((K, N), device=qweight_k.device, dtype=dtype)
    BN = 256
    _dequant_kernel[(K // 128, triton.cdiv(N, BN))](qweight_k, zeros_u8, scales, out, N, GROUP_SIZE=group_size,
                                                  BN=BN, SYM_ZERO=sym_zero, num_warps=4)
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
                       BT: tl.constexpr, BQ: tl.constexpr):
    """One (sequence, query head, block of BQ queries): q/k RMSNorm + RoPE, masked softmax, P @ V."""
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    qb = tl.program_id(2)
    hk = hq // (HQ // HKV)
    HALF: tl.constexpr = D // 2
    ROW: tl.constexpr = (HQ + 2 * HKV) * D
    DT = qkv_ptr.dtype.element_ty
    d = tl.arange(0, HALF)
    dd = tl.arange(0, D)
    # keys / values: the whole (short) sequence
    t = tl.arange(0, BT)
    mt = t < T
    tok = b * T + t
    rows = qkv_ptr + tok[:, None] * ROW
    c1 = tl.load(cos_ptr + tok[:, None] * D + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tok[:, None] * D + HALF + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tok[:, None] * D + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + tok[:, None] * D + HALF + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    x1 = tl.load(rows + (HQ + hk) * D + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(rows + (HQ + hk) * D + HALF + d[None, :], mask=mt[:, None], other=0.0).to(tl.float32)
    w1 = tl.load(kw_ptr + d).to(tl.float32)
    w2 = tl.load(kw_ptr + HALF + d).to(tl.float32)
    k1, k2 = _norm_rope_half(x1, x2, w1, w2, c1, c2, s1, s2, eps, D, DT)
    v = tl.load(rows + (HQ + HKV + hk) * D + dd[None, :], mask=mt[:, None], other=0.0)
    # queries of this block
    tq = qb * BQ + tl.arange(0, BQ)
    mq = tq < T
    tokq = b * T + tq
    rq = qkv_ptr + tokq[:, None] * ROW
    qc1 = tl.load(cos_ptr + tokq[:, None] * D + d[None, :], mask=mq[:, None], other=0.0).to(tl.float32)
    qc2 = tl.load(cos_ptr + tokq[:, None] * D + HALF + d[None, :], mask=mq[:, None], other=0.0).to(tl.float32)
    qs1 = tl.load(sin_ptr + tokq[:, None] * D + d[None, :], mask=mq[:, None], other=0.0).to(tl.float32)
    qs2 = tl.load(sin_ptr + tokq[:, None] * D + HALF + d[None, :], mask=mq[:, None], other=0.0).to(tl.float32)
    y1 = tl.load(rq + hq * D + d[None, :], mask=mq[:, None], other=0.0).to(tl.float32)
    y2 = tl.load(rq + hq * D + HALF + d[None, :], mask=mq[:, None], other=0.0).to(tl.float32)
    u1 = tl.load(qw_ptr + d).to(tl.float32)
    u2 = tl.load(qw_ptr + HALF + d).to(tl.float32)
    q1, q2 = _norm_rope_half(y1, y2, u1, u2, qc1, qc2, qs1, qs2, eps, D, DT)
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
