"""The text tower's attention kernels (q/k RMSNorm + RoPE + qkv split, and the short-sequence
attention) against their torch twins: on a GPU as compiled, on CPU through Triton's interpreter
with tiny shapes (`triton_setup` says when it skips)."""

from __future__ import annotations

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
