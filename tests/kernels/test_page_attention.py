"""The text tower's long-sequence (page) attention: q/k/v stored token-major, so SDPA's output lands
token-major and o_proj's input is a view of it, not a per-layer copy (the H200 profile's
`direct_copy_kernel`, 9.3 ms of a 16-page batch: benchmarks/results/kernel-breakdown-h200.log).

The Triton kernel runs compiled on a GPU, through Triton's interpreter on CPU (`triton_setup`)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton_setup import device_or_skip

DEVICE = device_or_skip()

from colquant.kernels import fast_text, reference, triton_ops  # noqa: E402

B, T, HQ, HKV, D, EPS = 2, 5, 4, 2, 32, 1e-6
CUDA = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (SDPA's output layout is the GPU backends')")


def inputs(b: int, t: int, hq: int, hkv: int, d: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16
           ) -> tuple[torch.Tensor, ...]:
    """(qkv, cos, sin, q_weight, k_weight) of a GQA layer on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b * t, (hq + 2 * hkv) * d, generator=gen)
    angles = torch.rand(b * t, d // 2, generator=gen) * 6.28
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    q_weight, k_weight = 1 + 0.1 * torch.randn(d, generator=gen), 1 + 0.1 * torch.randn(d, generator=gen)
    return tuple(x.to(DEVICE, dtype) for x in (qkv, cos, sin, q_weight, k_weight))


def token_major(x: torch.Tensor) -> bool:
    """A [B, H, T, D] tensor whose storage is [B, T, H, D] row-major."""
    return x.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("ops", [reference, triton_ops], ids=["torch twin", "triton"])
def test_qk_norm_rope_stores_token_major(ops):
    q, k, v = ops.qk_norm_rope(*inputs(B, T, HQ, HKV, D), EPS, B, T, HQ, HKV, D)
    assert q.shape == (B, HQ, T, D) and k.shape == v.shape == (B, HKV, T, D)
    assert token_major(q) and token_major(k) and token_major(v)


def test_qk_norm_rope_kernel_matches_its_twin():
    """fp16, where the twin's rounding of the rotation (in the activation dtype; the kernel's in fp32)
    stays inside 1e-2."""
    got = triton_ops.qk_norm_rope(*inputs(B, T, HQ, HKV, D, 1, torch.float16), EPS, B, T, HQ, HKV, D)
    want = reference.qk_norm_rope(*inputs(B, T, HQ, HKV, D, 1, torch.float16), EPS, B, T, HQ, HKV, D)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-2, atol=1e-2, msg=lambda m, n=name: f"{n}: {m}")


def test_twin_rotates_each_head_as_transformers_does():
    """The twin against Qwen3-VL's own text RMSNorm and rotary formula, head by head."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm, apply_rotary_pos_emb

    qkv, cos, sin, qw, kw = inputs(B, T, HQ, HKV, D, seed=2)
    q, k, v = reference.qk_norm_rope(qkv, cos, sin, qw, kw, EPS, B, T, HQ, HKV, D)
    x = qkv.view(B, T, HQ + 2 * HKV, D)
    norms = []
    for weight in (qw, kw):
        norm = Qwen3VLTextRMSNorm(D, eps=EPS).to(DEVICE, torch.bfloat16)
        norm.weight.data.copy_(weight)
        norms.append(norm)
    want_q, want_k = apply_rotary_pos_emb(norms[0](x[:, :, :HQ]).transpose(1, 2), norms[1](x[:, :, HQ:HQ + HKV]).transpose(1, 2),
                                          cos.view(B, T, D), sin.view(B, T, D))
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(v, x[:, :, HQ + HKV:].transpose(1, 2))


@CUDA
@pytest.mark.parametrize("backends", [None, ("cudnn",), ("flash",)])
def test_attention_output_is_a_view_not_a_copy(backends, monkeypatch):
    """At the 4B's head shapes (32 q heads, 8 kv heads, 128 wide) and a page's length: o_proj's
    input is SDPA's own output, whichever backend runs (cuDNN allocates it in q's layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, t, hq, hkv, d = 2, 1309, 32, 8, 128
    q, k, v = triton_ops.qk_norm_rope(*inputs(b, t, hq, hkv, d, seed=3), EPS, b, t, hq, hkv, d)
    made = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        made.append(sdpa(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    with sdpa_kernel([table[name] for name in backends]) if backends else contextlib.nullcontext():
        out = fast_text._sdpa(q, k, v, None)
    assert out.shape == (b * t, hq * d)
    assert out.data_ptr() == made[0].data_ptr(), "o_proj's input was copied out of SDPA's output"
    want = reference.sdpa(q.contiguous(), k.contiguous(), v.contiguous(), None)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
