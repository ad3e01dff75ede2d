"""Triton W4A16 GEMMs: ``y = x @ W`` with ``W`` held as 4-bit integers in the k-blocked layout
(``qweight_k [K/8, N]``, ``zeros_u8 [K/G, N]``, ``scales [K/G, N]``, see :mod:`.packing`),
dequantized inside the main loop, plus the whole-weight dequantization for the large-M path.

Kernels (``cfg["kernel"]``):

* ``"8dot"``: per 128 input features one ``[16, BN]`` tile of words, eight K=16 tensor-core dots;
* ``"bc"``: the same words broadcast to the ``[128, BN]`` integer tile, one K=128 dot per block.

(A dot-free GEMV kernel, a swap-AB variant and integers made by bit operations instead of an
int-to-float conversion were measured and never won: see benchmarks/kernel-notes.md.)

Few tokens leave most SMs idle, so K is split over ``SPLIT_K`` programs per output tile. The fp32
partial sums are then reduced either by a second launch (``splitk_reduce``) or, with
``cfg["FIXUP"]``, in the same launch: every program stores its partial and bumps a per-tile counter;
the last one to arrive sums the partials in a fixed order (deterministic), writes the output and
resets the counter (so the counters stay zero between calls and CUDA-graph replays).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_sz(s_ptr, z_ptr, g, N, offs_n, mask_n, SYM_ZERO: tl.constexpr):
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SYM_ZERO > 0:
        z = tl.full(offs_n.shape, SYM_ZERO, tl.int32)
    else:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)
    return s, z


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped along M for L2 reuse of the weight tiles."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def _k_range(K, SPLIT_K):
    """The 128-feature blocks [it0, it1) this program's K split covers."""
    n_iters = K // 128
    per_split = tl.cdiv(n_iters, SPLIT_K)
    it0 = tl.program_id(1) * per_split
    return it0, tl.minimum(it0 + per_split, n_iters)


@triton.jit
def _tile_start(qw_ptr, M, N, K, SPLIT_K, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Where both GEMM kernels start: this program's output rows and columns with their masks, its
    128-feature blocks [it0, it1), and the pointers to its first [16, BN] tile of weight words."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    it0, it1 = _k_range(K, SPLIT_K)
    qw_ptrs = qw_ptr + (it0 * 16 + tl.arange(0, 16))[:, None].to(tl.int64) * N + offs_n[None, :]
    return offs_m, offs_n, offs_m < M, offs_n < N, it0, it1, qw_ptrs


@triton.jit
def _dequant_tile(q, s, z):
    """fp32 weights ``(q - z) * s`` of an integer tile and its columns' group scale and zero; every
    kernel rounds them to its dtype itself."""
    return (q - z[None, :]).to(tl.float32) * s[None, :]


@triton.jit
def _epilogue(acc, out_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, SPLIT_K,
              PARTIAL: tl.constexpr, FIXUP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write the tile: straight to ``out`` (no split), as an fp32 partial (split, reduced by
    ``splitk_reduce``), or, with ``FIXUP``, partial + counter and the last program reduces."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if PARTIAL:
        tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * N + tile, acc, mask=mask)
        if FIXUP:
            tl.debug_barrier()  # every thread's partial is written before the counter moves
            arrived = tl.atomic_add(lock_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in range(0, SPLIT_K):
                    total += tl.load(ws_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                tl.store(o_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_tile(ptrs, K, mask_m, ACT: tl.constexpr):
    """The activation tile at ``ptrs``; with ``ACT`` the input is gate | up and silu(gate) * up is
    returned, rounded like transformers (silu in fp32 -> dtype, product -> dtype)."""
    if ACT:
        g = tl.load(ptrs, mask=mask_m[:, None], other=0.0)
        u = tl.load(ptrs + K, mask=mask_m[:, None], other=0.0)
        gf = g.to(tl.float32)
        a = ((gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)).to(g.dtype)
    else:
        a = tl.load(ptrs, mask=mask_m[:, None], other=0.0)
    return a


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_om, SPLIT_K,
    GROUP_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PARTIAL: tl.constexpr, FIXUP: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SCALE_ACC: tl.constexpr,
    SYM_ZERO: tl.constexpr,
):
    """"8dot": per block of 128 input features one [16, BN] tile of words; nibble i of it is the
    [16, BN] integer tile of features 16i..16i+15, multiplied by x[:, 16i:16i+16] (eight K=16 dots)."""
    offs_m, offs_n, mask_m, mask_n, it0, it1, qw_ptrs = _tile_start(qw_ptr, M, N, K, SPLIT_K, BM, BN, GROUP_M)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + tl.arange(0, 16)[None, :] + it0 * 128
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
            a = _act_tile(x_rows + 16 * i, K, mask_m, ACT)
            q = (words >> (4 * i)) & 0xF
            if SCALE_ACC:
                # (q - z) is a small integer: exact in bf16/fp16; the group scale goes on the sum
                part = tl.dot(a, (q - z[None, :]).to(a.dtype), part)
            else:
                w = _dequant_tile(q, s, z).to(a.dtype)
                acc = tl.dot(a, w, acc)
        if SCALE_ACC:
            acc += part * s[None, :]
        qw_ptrs += 16 * N
        x_rows += 128
    _epilogue(acc, out_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, SPLIT_K,
              PARTIAL, FIXUP, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel_bc(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_om, SPLIT_K,
    GROUP_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PARTIAL: tl.constexpr, FIXUP: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SCALE_ACC: tl.constexpr,
    SYM_ZERO: tl.constexpr,
):
    """"bc": one K=128 dot per block: the [16, BN] words are broadcast to [8, 16, BN], shifted by
    4*i along the new axis and reshaped to the [128, BN] integer tile (row 16 i + r), so the
    activation tile is one contiguous, pipelined [BM, 128] load (group size >= 128)."""
    offs_m, offs_n, mask_m, mask_n, it0, it1, qw_ptrs = _tile_start(qw_ptr, M, N, K, SPLIT_K, BM, BN, GROUP_M)
    shifts = (tl.arange(0, 8) * 4)[:, None, None]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (it0 * 128 + tl.arange(0, 128))[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(it0, it1):
        words = tl.load(qw_ptrs, mask=mask_n[None, :], other=0)
        a = _act_tile(x_ptrs, K, mask_m, ACT)
        q = tl.reshape((tl.broadcast_to(words[None, :, :], (8, 16, BN)) >> shifts) & 0xF, (128, BN))
        s, z = _group_sz(s_ptr, z_ptr, (it * 128) // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
        if SCALE_ACC:
            acc += tl.dot(a, (q - z[None, :]).to(a.dtype)) * s[None, :]
        else:
            w = _dequant_tile(q, s, z).to(a.dtype)
            acc = tl.dot(a, w, acc)
        qw_ptrs += 16 * N
        x_ptrs += 128
    _epilogue(acc, out_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, SPLIT_K,
              PARTIAL, FIXUP, HAS_BIAS)


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


_LOCKS: dict[str, torch.Tensor] = {}
_LOCKS_KEEP: list[torch.Tensor] = []  # outgrown counter buffers: CUDA graphs may still hold their addresses


def _tile_locks(n_tiles: int, device: torch.device) -> torch.Tensor:
    """Per-device split-K arrival counters, zero between calls (each tile's last program resets
    its own). Never freed: CUDA graphs keep their addresses."""
    key = str(device)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n_tiles:
        buf = torch.zeros(max(n_tiles, 4096), dtype=torch.int32, device=device)
        _LOCKS_KEEP.append(buf)
        _LOCKS[key] = buf
    return buf


def _effective_split(split: int, n_iters: int) -> int:
    """``split`` clipped so that every split gets at least one 128-feature block."""
    split = max(1, min(split, n_iters))
    while split > 1 and (split - 1) * triton.cdiv(n_iters, split) >= n_iters:
        split -= 1
    return split


def w4a16_matmul(x, qweight_k, zeros_u8, scales, group_size, *, bias=None, act=False, cfg=None, out=None,
                 sym_zero=0):
    """``x [M, K]`` (or ``[M, 2K]`` with ``act``: silu(gate) * up) times the 4-bit ``W [K, N]``.

    ``cfg`` = dict(kernel, BM, BN, SPLIT_K, GROUP_M, num_warps, num_stages, SCALE_ACC, FIXUP) with
    kernel one of "8dot", "bc" (module doc); ``sym_zero`` = 8 when every zero point is 8
    (symmetric checkpoints: the zeros are not read).
    """
    M = x.shape[0]
    K = qweight_k.shape[0] * 8
    N = qweight_k.shape[1]
    if x.stride(-1) != 1 or x.shape[1] != (2 * K if act else K):
        raise ValueError(f"x must be a contiguous [M, {2 * K if act else K}] tensor, got {tuple(x.shape)}")
    cfg = cfg or default_config(M, N, K)
    BM, BN = cfg["BM"], cfg["BN"]
    kname = cfg.get("kernel", "8dot") if group_size >= 128 else "8dot"  # bc: one group per 128-block
    scale_acc = cfg.get("SCALE_ACC", False) and group_size >= 128
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    split = _effective_split(cfg["SPLIT_K"], K // 128)
    fixup = split > 1 and bool(cfg.get("FIXUP", False))
    ws = out if split == 1 else torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    grid_mn = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    locks = _tile_locks(grid_mn, x.device) if fixup else ws
    tensors = (x, qweight_k, zeros_u8, scales, bias if bias is not None else scales, out, ws, locks)
    sizes = (M, N, K, x.stride(0), out.stride(0), split)
    common = dict(GROUP_SIZE=group_size, BM=BM, BN=BN, PARTIAL=split > 1, FIXUP=fixup,
                  HAS_BIAS=bias is not None and (split == 1 or fixup), SYM_ZERO=sym_zero,
                  num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    kernel = {"8dot": _w4a16_kernel, "bc": _w4a16_kernel_bc}[kname]
    kernel[(grid_mn, split)](*tensors, *sizes, GROUP_M=cfg.get("GROUP_M", 8), ACT=act, SCALE_ACC=scale_acc,
                             **common)
    if split > 1 and not fixup:
        BLOCK = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](ws, bias if bias is not None else ws, out, M * N, N,
                                                           split, HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)
    return out


def default_config(M, N, K):
    """Tiles for a layer used without a tuned table (:mod:`.autotune` measures the real choice)."""
    if M <= 16:
        return dict(kernel="8dot", BM=16, BN=64, SPLIT_K=split_for(M, N, K, 16, 64, 4), GROUP_M=8,
                    num_warps=4, num_stages=3, SCALE_ACC=True)
    if M <= 64:
        return dict(kernel="bc", BM=64, BN=64, SPLIT_K=split_for(M, N, K, 64, 64, 2), GROUP_M=8,
                    num_warps=4, num_stages=3, SCALE_ACC=False)
    return dict(kernel="bc", BM=64, BN=128, SPLIT_K=split_for(M, N, K, 64, 128, 1), GROUP_M=8,
                num_warps=4, num_stages=3, SCALE_ACC=False)


_SM_COUNT: dict = {}


def _sm_count() -> int:
    idx = torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_for(M, N, K, BM, BN, waves=1.0):
    """Smallest power-of-two split-K that gives about ``waves`` waves of programs."""
    sms = _sm_count() if torch.cuda.is_available() else 132  # the interpreter on CPU: an H100's count
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    split = 1
    while tiles * split < waves * sms and split * 2 <= max(1, K // 128 // 2):
        split *= 2
    return split


@triton.jit
def _dequant_kernel(qw_ptr, z_ptr, s_ptr, out_ptr, N, GROUP_SIZE: tl.constexpr, BN: tl.constexpr,
                    SYM_ZERO: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 16)
    mask_n = offs_n < N
    words = tl.load(qw_ptr + (blk * 16 + offs_r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    kb = blk * 128
    for i in tl.static_range(8):
        s, z = _group_sz(s_ptr, z_ptr, (kb + 16 * i) // GROUP_SIZE, N, offs_n, mask_n, SYM_ZERO)
        q = (words >> (4 * i)) & 0xF
        # round through fp16 first, exactly like auto-round (fp16 scales * int -> fp16 -> dtype)
        w = _dequant_tile(q, s, z).to(tl.float16)
        tl.store(out_ptr + (kb + 16 * i + offs_r)[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mask_n[None, :])


def dequant_w4(qweight_k, zeros_u8, scales, group_size, *, dtype=torch.bfloat16, out=None, sym_zero=0):
    """The whole weight as ``[K, N]`` in ``dtype`` (the large-M path: dequantize once, then cuBLAS)."""
    K = qweight_k.shape[0] * 8
    N = qweight_k.shape[1]
    if out is None:
        out = torch.empty((K, N), device=qweight_k.device, dtype=dtype)
    BN = 256
    _dequant_kernel[(K // 128, triton.cdiv(N, BN))](qweight_k, zeros_u8, scales, out, N, GROUP_SIZE=group_size,
                                                  BN=BN, SYM_ZERO=sym_zero, num_warps=4)
    return out

