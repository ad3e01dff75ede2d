"""The text tower's attention kernels (q/k RMSNorm + RoPE + qkv split, and the short-sequence
attention) against their torch twins: on a GPU as compiled, on CPU through Triton's interpreter
with tiny shapes (`triton_setup` says when it skips)."""

from __future__ import annotations

import pytest
import torch
from triton_setup import device_or_skip

DEVICE = device_or_skip()

from colquant.kernels import reference, triton_ops  # noqa: E402

B, T, HQ, HKV, D, EPS = 2, 5, 4, 2, 32, 1e-6  # D >= 32: the kernel dots over head halves, and a GPU dot needs K >= 16


def inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(qkv, cos, sin, q_weight, k_weight) of a tiny GQA layer, fp16."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B * T, (HQ + 2 * HKV) * D, generator=gen)
    angles = torch.rand(B * T, D // 2, generator=gen) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    q_weight, k_weight = 1 + 0.1 * torch.randn(D, generator=gen), 1 + 0.1 * torch.randn(D, generator=gen)
    return tuple(t.half().to(DEVICE) for t in (qkv, cos, sin, q_weight, k_weight))


def test_qk_norm_rope_matches_the_reference():
    got = triton_ops.qk_norm_rope(*inputs(), EPS, B, T, HQ, HKV, D)
    want = reference.qk_norm_rope(*inputs(), EPS, B, T, HQ, HKV, D)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape == ((B, HQ, T, D) if name == "q" else (B, HKV, T, D))
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-2, atol=1e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_short_attention_matches_the_reference():
    key_mask = torch.ones(B, T, dtype=torch.int32)
    key_mask[1, :2] = 0  # left padding in the second sequence
    key_mask = key_mask.to(DEVICE)
    got = triton_ops.short_attention(*inputs(1), key_mask, EPS, B, T, HQ, HKV, D)
    want = reference.short_attention(*inputs(1), key_mask, EPS, B, T, HQ, HKV, D)
    assert got.shape == (B * T, HQ * D)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def attention_inputs(b: int, t: int, hq: int, hkv: int, d: int, pads: tuple[int, ...], seed: int):
    """(qkv, cos, sin, q_weight, k_weight, key_mask) of a tiny GQA layer, fp16; sequence i left-padded
    with pads[i] tokens."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b * t, (hq + 2 * hkv) * d, generator=gen)
    angles = torch.rand(b * t, d // 2, generator=gen) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    q_weight, k_weight = 1 + 0.1 * torch.randn(d, generator=gen), 1 + 0.1 * torch.randn(d, generator=gen)
    key_mask = torch.ones(b, t, dtype=torch.int32)
    for row, pad in enumerate(pads):
        key_mask[row, :pad] = 0
    return (*(x.half().to(DEVICE) for x in (qkv, cos, sin, q_weight, k_weight)), key_mask.to(DEVICE))


def every_config(t: int, hq: int, hkv: int) -> list[triton_ops.ShortAttentionConfig]:
    """Each way to split a layer's work: heads a program (divisors of the GQA group), stacked or
    looped, whole-sequence or 16-query blocks."""
    group, bt = hq // hkv, max(16, 1 << (t - 1).bit_length())
    return [triton_ops.ShortAttentionConfig(pack, heads // pack, block_q, 4)
            for heads in range(1, group + 1) if group % heads == 0
            for pack in range(1, heads + 1) if heads % pack == 0
            for block_q in sorted({16, bt})]


# (B, T, HQ, HKV, left pads per sequence): T not a power of two, a ragged left-padded batch, GQA
# groups of 2 and 4, MQA at the longest T the kernel takes
SHAPES = [(2, 5, 4, 2, (0, 2)), (3, 19, 8, 2, (0, 7, 18)), (2, 128, 4, 1, (100, 0))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-T{s[1]}-HQ{s[2]}-HKV{s[3]}")
def test_every_grid_of_short_attention_matches_the_reference(shape):
    b, t, hq, hkv, pads = shape
    args = attention_inputs(b, t, hq, hkv, D, pads, seed=t)
    want = reference.short_attention(*args, EPS, b, t, hq, hkv, D)
    # at T = 128 only the tiles of at most SHORT_ATTENTION_MAX_ROWS rows (the largest a default grid uses)
    configs = [c for c in every_config(t, hq, hkv) if c.pack * c.block_q <= triton_ops.SHORT_ATTENTION_MAX_ROWS]
    for cfg in configs:
        got = triton_ops.short_attention(*args, EPS, b, t, hq, hkv, D, config=cfg)
        assert got.shape == (b * t, hq * D)
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2, msg=lambda m, c=cfg: f"{c}: {m}")


# the default grid's three paths on tiny layers, thresholds lowered to their size: (B, T, HQ, HKV, pads,
# thresholds, expected (heads a program, block_q, loops))
DEFAULT_PATHS = [
    (3, 19, 8, 2, (0, 3, 11), dict(SHORT_ATTENTION_WHOLE_SEQUENCE_PROGRAMS=6), (4, 32, 1)),  # whole group and sequence
    (2, 128, 4, 1, (90, 0), dict(SHORT_ATTENTION_WHOLE_SEQUENCE_PROGRAMS=2), (4, 128, 2)),  # 512 rows: loops
    (3, 19, 8, 2, (0, 3, 11), dict(SHORT_ATTENTION_MIN_PROGRAMS=24), (2, 16, 1)),  # 16-query blocks, 2 heads stacked
]


@pytest.mark.parametrize("path", DEFAULT_PATHS, ids=("whole-sequence", "whole-sequence-looped", "query-blocks"))
def test_each_default_grid_matches_the_reference(path, monkeypatch):
    b, t, hq, hkv, pads, thresholds, (heads, block_q, loops) = path
    for name, value in thresholds.items():
        monkeypatch.setattr(triton_ops, name, value)
    cfg = triton_ops.short_attention_config(b, t, hq, hkv)
    assert (cfg.pack * cfg.loops, cfg.block_q, cfg.loops) == (heads, block_q, loops)
    args = attention_inputs(b, t, hq, hkv, D, pads, seed=t)
    torch.testing.assert_close(triton_ops.short_attention(*args, EPS, b, t, hq, hkv, D).float(),
                               reference.short_attention(*args, EPS, b, t, hq, hkv, D).float(), rtol=1e-2, atol=1e-2)


def test_the_grid_follows_the_batch_size():
    """At the 4B's shapes (32 query heads, 8 kv heads, 42-token queries), the H200 sweep's winners: from
    64 queries a program takes a sequence and a whole kv group (256 rows, 8 warps); 8 queries, the group
    in 16-query blocks; one query, one head and 16 queries a program."""
    assert triton_ops.short_attention_config(1024, 42, 32, 8) == (4, 1, 64, 8)
    assert triton_ops.short_attention_config(64, 42, 32, 8) == (4, 1, 64, 8)
    assert triton_ops.short_attention_config(8, 42, 32, 8) == (4, 1, 16, 4)
    assert triton_ops.short_attention_config(1, 42, 32, 8) == (1, 1, 16, 4)
    for batch in (1, 2, 4, 8, 16, 64, 1024):
        cfg = triton_ops.short_attention_config(batch, 42, 32, 8)
        programs = batch * (32 // (cfg.pack * cfg.loops)) * -(-42 // cfg.block_q)
        assert programs >= min(triton_ops.SHORT_ATTENTION_MIN_PROGRAMS, batch * 32 * 3), (batch, cfg)
        assert cfg.pack * cfg.block_q <= triton_ops.SHORT_ATTENTION_MAX_ROWS


@pytest.mark.parametrize("cfg, t, match", [
    (triton_ops.ShortAttentionConfig(3, 1, 16, 4), 5, "must divide the GQA group"),
    (triton_ops.ShortAttentionConfig(1, 1, 8, 4), 5, "block_q must be a power of two"),
    (triton_ops.ShortAttentionConfig(1, 1, 64, 4), 5, "block_q must be a power of two"),
    (None, 129, "at most 128 tokens"),
])
def test_short_attention_refuses_what_it_cannot_compute(cfg, t, match):
    args = attention_inputs(1, t, HQ, HKV, D, (0,), seed=0)
    with pytest.raises(ValueError, match=match):
        triton_ops.short_attention(*args, EPS, 1, t, HQ, HKV, D, config=cfg)
