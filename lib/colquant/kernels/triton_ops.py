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
  written straight in o_proj's input layout; a program serves a kv head's query heads together
  (K/V normed and roped once), on a grid chosen by batch size (:func:`short_attention_config`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from colquant.kernels.triton_gemm import default_config, dequant_w4, split_for, w4a16_matmul

__all__ = ["add_rmsnorm", "silu_mul", "qk_norm_rope", "short_attention", "short_attention_config",
           "ShortAttentionConfig", "SHORT_ATTENTION_MAX_T",
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
    """The two halves ([R, D/2], in their stored dtype: cos/sin stay 16-bit in registers until used)
    of the D-wide rows starting at ``rows`` ([R, 1] pointers)."""
    d = tl.arange(0, D // 2)
    lo = tl.load(rows + d[None, :], mask=mask, other=0.0)
    hi = tl.load(rows + D // 2 + d[None, :], mask=mask, other=0.0)
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
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
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
                       BT: tl.constexpr, BQ: tl.constexpr, PACK: tl.constexpr, LOOPS: tl.constexpr):
    """One (sequence, PACK * LOOPS query heads of one kv head, block of BQ queries): q/k RMSNorm +
    RoPE, masked softmax, P @ V. The kv head's K/V (and the keys' cos/sin) are loaded, normed and
    roped once for all the program's query heads, not once per query head: GQA's K/V and the
    rotary rows were most of the old per-head kernel's traffic. PACK heads are stacked in one
    tile's rows (row r: head r // BQ, query r % BQ), LOOPS such tiles are done in turn."""
    b = tl.program_id(0).to(tl.int64)
    hq0 = tl.program_id(1) * (PACK * LOOPS)
    qb = tl.program_id(2)
    hk = hq0 // (HQ // HKV)
    ROW: tl.constexpr = (HQ + 2 * HKV) * D
    HALF: tl.constexpr = D // 2
    R: tl.constexpr = PACK * BQ
    DT = qkv_ptr.dtype.element_ty
    d = tl.arange(0, HALF)
    dd = tl.arange(0, D)
    # keys / values: the whole (short) sequence
    t = tl.arange(0, BT)
    mt = t < T
    tok = b * T + t
    rows = qkv_ptr + tok[:, None] * ROW
    c1, c2 = _load_halves(cos_ptr + tok[:, None] * D, mt[:, None], D)
    s1, s2 = _load_halves(sin_ptr + tok[:, None] * D, mt[:, None], D)
    k1, k2 = _load_norm_rope(rows + (HQ + hk) * D, kw_ptr, mt[:, None], c1, c2, s1, s2, eps, D, DT)
    k1 = k1.to(DT)
    k2 = k2.to(DT)
    v = tl.load(rows + (HQ + HKV + hk) * D + dd[None, :], mask=mt[:, None], other=0.0)
    key_ok = tl.load(mask_ptr + b * T + t, mask=mt, other=0) != 0
    # query rows
    r = tl.arange(0, R)
    tq = qb * BQ + r % BQ
    mq = tq < T
    tokq = b * T + tq
    if BQ == BT:  # the block is the whole sequence: the keys' cos/sin rows, repeated per packed head
        qc1 = tl.reshape(tl.broadcast_to(c1[None, :, :], (PACK, BT, HALF)), (R, HALF))
        qc2 = tl.reshape(tl.broadcast_to(c2[None, :, :], (PACK, BT, HALF)), (R, HALF))
        qs1 = tl.reshape(tl.broadcast_to(s1[None, :, :], (PACK, BT, HALF)), (R, HALF))
        qs2 = tl.reshape(tl.broadcast_to(s2[None, :, :], (PACK, BT, HALF)), (R, HALF))
    else:
        qc1, qc2 = _load_halves(cos_ptr + tokq[:, None] * D, mq[:, None], D)
        qs1, qs2 = _load_halves(sin_ptr + tokq[:, None] * D, mq[:, None], D)
    qw1 = tl.load(qw_ptr + d).to(tl.float32)
    qw2 = tl.load(qw_ptr + HALF + d).to(tl.float32)
    i = tq[:, None]
    j = t[None, :]
    allowed = (j <= i) & (key_ok[None, :] | (j == i)) & (j < T)
    head = hq0 + r // BQ
    for loop in tl.static_range(LOOPS):
        hq = head + loop * PACK
        x1, x2 = _load_halves(qkv_ptr + tokq[:, None] * ROW + hq[:, None] * D, mq[:, None], D)
        q1, q2 = _norm_rope_half(x1.to(tl.float32), x2.to(tl.float32), qw1, qw2, qc1, qc2, qs1, qs2, eps, D, DT)
        s = tl.dot(q1.to(DT), tl.trans(k1)) + tl.dot(q2.to(DT), tl.trans(k2))
        s = s * sm_scale
        s = tl.where(allowed, s, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        o = tl.dot(p.to(DT), v)
        tl.store(out_ptr + tokq[:, None] * (HQ * D) + hq[:, None] * D + dd[None, :], o.to(DT), mask=mq[:, None])


SHORT_ATTENTION_MAX_T = 128
# the grid rule's thresholds, from the H200 sweep of every grid (benchmarks/results/short-attention-h200.log)
SHORT_ATTENTION_WHOLE_SEQUENCE_PROGRAMS = 512  # (sequence, kv head) programs from which whole sequences win
SHORT_ATTENTION_MIN_PROGRAMS = 132  # one program per SM of an H100/H200: split heads further below this
SHORT_ATTENTION_MAX_ROWS = 256  # query rows of one tile (stacked heads x queries): the largest measured, and best


class ShortAttentionConfig(NamedTuple):
    """How :func:`short_attention` splits its work: each program takes ``pack * loops`` query heads
    of one kv head (``pack`` stacked in one tile's rows, ``loops`` tiles in turn) and ``block_q``
    queries of one sequence (the whole sequence when ``block_q`` is the padded length)."""

    pack: int
    loops: int
    block_q: int
    num_warps: int


def _padded_length(T: int) -> int:
    return max(16, triton.next_power_of_2(T))


def short_attention_config(B: int, T: int, HQ: int, HKV: int) -> ShortAttentionConfig:
    """The grid for a batch, as the H200 sweep of every grid at the 4B's shapes ranked them (42-token
    queries, 32 query / 8 kv heads): stacking a kv head's query heads in one tile beat looping over
    them at every batch, and beat one head a program from 8 queries up. With at least
    SHORT_ATTENTION_WHOLE_SEQUENCE_PROGRAMS (sequence, kv head) pairs (64 queries and more), a
    program takes a whole sequence and its kv head's whole group; below, blocks of 16 queries and as
    many heads a program as keep one program per SM; a single query keeps one head a program (96
    programs: 4.0 µs, against 5.8 µs with the group stacked)."""
    BT = _padded_length(T)
    group = HQ // HKV
    if B * HKV >= SHORT_ATTENTION_WHOLE_SEQUENCE_PROGRAMS:
        return _tile_shape(group, BT)
    for heads in sorted((h for h in range(1, group + 1) if group % h == 0), reverse=True):
        if B * (HQ // heads) * triton.cdiv(T, 16) >= SHORT_ATTENTION_MIN_PROGRAMS:
            return _tile_shape(heads, 16)
    return _tile_shape(1, 16)


def _tile_shape(heads: int, block_q: int) -> ShortAttentionConfig:
    """Stack the heads in one tile up to SHORT_ATTENTION_MAX_ROWS rows and loop over the rest (only
    sequences over 64 tokens loop); 8 warps from 128 rows (256 rows: 606 µs against 1,350 µs with 4)."""
    pack = max(1, min(heads, SHORT_ATTENTION_MAX_ROWS // block_q))
    return ShortAttentionConfig(pack=pack, loops=heads // pack, block_q=block_q,
                                num_warps=8 if pack * block_q >= 128 else 4)


def _check_short_attention(T: int, HQ: int, HKV: int, cfg: ShortAttentionConfig) -> None:
    """Shapes the kernel cannot take raise here, naming the fix, rather than computing garbage."""
    if T > SHORT_ATTENTION_MAX_T:
        raise ValueError(f"short_attention takes sequences of at most {SHORT_ATTENTION_MAX_T} tokens, got {T}: "
                         "use qk_norm_rope + SDPA for longer ones")
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of kv heads ({HKV})")
    heads = cfg.pack * cfg.loops
    if cfg.pack < 1 or cfg.loops < 1 or (HQ // HKV) % heads:
        raise ValueError(f"{cfg}: pack * loops = {heads} query heads a program must divide the GQA group "
                         f"of {HQ // HKV} (each program serves one kv head)")
    BT = _padded_length(T)
    if cfg.block_q < 16 or cfg.block_q > BT or cfg.block_q & (cfg.block_q - 1):
        raise ValueError(f"{cfg}: block_q must be a power of two in [16, {BT}] for T = {T}")


def short_attention(qkv, cos, sin, q_weight, k_weight, key_mask, eps, B, T, HQ, HKV, D, *,
                    config: ShortAttentionConfig | None = None):
    """Causal attention for ``T <= 128`` straight from the fused qkv rows; ``key_mask [B, T]``
    (nonzero = real token). Returns ``[B*T, HQ*D]``. A padding query attends only to itself, so
    padded rows stay finite. The grid follows :func:`short_attention_config` unless ``config``
    names one (the tests and benchmarks/short_attention_bench.py try each)."""
    cfg = config or short_attention_config(B, T, HQ, HKV)
    _check_short_attention(T, HQ, HKV, cfg)
    out = torch.empty((B * T, HQ * D), device=qkv.device, dtype=qkv.dtype)
    grid = (B, HQ // (cfg.pack * cfg.loops), triton.cdiv(T, cfg.block_q))
    _short_attn_kernel[grid](
        qkv, cos, sin, q_weight, k_weight, key_mask, out, T, eps, D ** -0.5,
        HQ=HQ, HKV=HKV, D=D, BT=_padded_length(T), BQ=cfg.block_q, PACK=cfg.pack, LOOPS=cfg.loops,
        num_warps=cfg.num_warps)
    return out
