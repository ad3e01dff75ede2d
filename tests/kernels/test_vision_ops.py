"""The vision tower's fused residual add + LayerNorm kernels (:mod:`colquant.kernels.vision_ops`)
against their torch twins (transformers' add, then nn.LayerNorm): compiled on a GPU, through Triton's
interpreter on CPU (`triton_setup` says when it skips)."""

from __future__ import annotations

import pytest
import torch
from triton_setup import device_or_skip

DEVICE = device_or_skip()

from colquant.kernels import fast_vision, vision_attention, vision_ops  # noqa: E402
from colquant.retriever import fp8  # noqa: E402

EPS = 1e-6
SHAPES = [(7, 80), (3, 1024)] if DEVICE == "cpu" else [(7, 80), (5120, 1024)]  # odd width; the ViT's


def assert_same_bf16_sum(got: torch.Tensor, want: torch.Tensor) -> None:
    """The residual add rounds once to bf16, as torch's does: equal on the GPU. Triton 3.6's CPU
    interpreter truncates fp32 -> bf16 casts instead of rounding them, so there: within one bf16 step."""
    if DEVICE == "cuda":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)


def operands(m: int, n: int, bias: bool, seed: int = 0) -> tuple:
    """(x, delta, weight, bias) in bf16: a residual stream with an offset (LayerNorm's mean matters)."""
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(m, n, generator=gen) + 0.5
    delta = torch.randn(m, n, generator=gen)
    weight = 1 + 0.3 * torch.randn(n, generator=gen)
    b = 0.3 * torch.randn(n, generator=gen) if bias else None
    return tuple(t if t is None else t.to(DEVICE, torch.bfloat16) for t in (x, delta, weight, b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_add_layernorm_matches_its_twin(shape, bias):
    x, delta, weight, b = operands(*shape, bias)
    residual, normed = vision_ops.add_layernorm(x, delta, weight, b, EPS)
    want_residual, want_normed = fast_vision.add_layernorm_reference(x, delta, weight, b, EPS)
    assert_same_bf16_sum(residual, want_residual)
    # the LayerNorm of the kernel's own residual, within a bf16 step (statistics summed in another order)
    _, want_normed = fast_vision.add_layernorm_reference(residual, torch.zeros_like(residual), weight, b, EPS)
    torch.testing.assert_close(normed, want_normed, rtol=2**-7, atol=2**-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_add_layernorm_quant_matches_its_twin(shape):
    x, delta, weight, b = operands(*shape, bias=True, seed=1)
    residual, q, scale = vision_ops.add_layernorm_quant(x, delta, weight, b, EPS)
    assert_same_bf16_sum(residual, fast_vision.add_layernorm_reference(x, delta, weight, b, EPS)[0])
    # quantized LayerNorm of the kernel's own residual
    _, want_q, want_scale = fast_vision.add_layernorm_quant_reference(residual, torch.zeros_like(residual), weight,
                                                                       b, EPS)
    assert q.dtype == fp8.FP8_DTYPE and scale.shape == (shape[0], 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, want_scale, rtol=1e-2, atol=0)
    # the normed rows may differ by one bf16 step, which can move a value to the next e4m3 code
    got, want = fp8.dequantize(q, scale), fp8.dequantize(want_q, want_scale)
    torch.testing.assert_close(got, want, rtol=0.13, atol=float(want_scale.max()) * 2**-6)
    if DEVICE == "cuda":  # the interpreter's truncating bf16 casts move many more
        assert (q.float() != want_q.float()).float().mean() < 0.01


def test_mismatched_operands_are_refused_naming_the_shapes():
    x, delta, weight, b = operands(4, 80, bias=True)
    with pytest.raises(ValueError, match=r"delta \(4, 40\)"):
        vision_ops.add_layernorm(x, delta[:, :40], weight, b, EPS)
    with pytest.raises(ValueError, match=r"weight \(40,\)"):
        vision_ops.add_layernorm_quant(x, delta, weight[:40], b, EPS)


# ------------------------------------------------------------------ FP8 attention's q/k/v producer

LENGTHS = [12, 7, 16] if DEVICE == "cpu" else [5120, 5120, 1536, 777]  # frames of a batch; the 4B's pages
HEADS, DIM = (2, 64) if DEVICE == "cpu" else (16, 64)


def qkv_operands(cos_sin: str, seed: int = 0) -> tuple:
    """Packed qkv rows (v three times larger, so the parts' scales differ), cos/sin of random angles
    (or the identity rotation: cos 1, sin 0), int32 frame offsets."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    qkv = torch.randn(n, 3 * HEADS * DIM, generator=gen)
    qkv[:, 2 * HEADS * DIM:] *= 3
    angles = torch.rand(n, DIM // 2, generator=gen) * 20
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    if cos_sin == "identity":
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    cu = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    return qkv.to(DEVICE, torch.bfloat16), cos.to(DEVICE), sin.to(DEVICE), cu.to(DEVICE)


def qkv_twin(qkv, cos, sin, cu):
    q, k = fast_vision.rope_qk_reference(qkv, cos, sin, HEADS)
    v = qkv.view(qkv.shape[0], 3, HEADS, -1)[:, 2]
    return vision_attention.quantize_qkv_reference(q, k, v, cu)


def test_rope_quant_qkv_is_its_twin_exactly_where_no_rotation_rounds():
    """With the identity rotation (and for v, which is not rotated) nothing is rounded before the
    quantization, so the e4m3 codes and the scales are the twin's, bit for bit."""
    qkv, cos, sin, cu = qkv_operands("identity")
    got, descale = vision_ops.rope_quant_qkv(qkv, cos, sin, HEADS, cu, max(LENGTHS))
    want, want_descale = qkv_twin(qkv, cos, sin, cu)
    assert got.dtype == fp8.FP8_DTYPE and got.shape == (sum(LENGTHS), 3, HEADS, DIM)
    assert descale.shape == (len(LENGTHS), 3, HEADS) and descale.dtype == torch.float32
    assert torch.equal(descale, want_descale) and torch.equal(got.float(), want.float())


def test_rope_quant_qkv_matches_its_twin_with_rotation():
    qkv, cos, sin, cu = qkv_operands("random", seed=1)
    got, descale = vision_ops.rope_quant_qkv(qkv, cos, sin, HEADS, cu, max(LENGTHS))
    want, want_descale = qkv_twin(qkv, cos, sin, cu)
    assert torch.equal(got[:, 2].float(), want[:, 2].float()) and torch.equal(descale[:, 2], want_descale[:, 2])  # v
    # rotated q, k may differ from the twin's by one bf16 step (the interpreter truncates bf16 casts):
    # the absmax by up to 2^-8 relative, a value by the next e4m3 code
    torch.testing.assert_close(descale, want_descale, rtol=2**-7, atol=0)
    per_token = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEVICE),
                                        torch.tensor(LENGTHS, device=DEVICE))
    deq, want_deq = (q.float() * d[per_token][..., None] for q, d in ((got, descale), (want, want_descale)))
    torch.testing.assert_close(deq, want_deq, rtol=0.13, atol=float(want_descale.max()) * 2**-6)
    if DEVICE == "cuda":  # the interpreter's truncating bf16 casts move many more
        assert (got.float() != want.float()).float().mean() < 0.01


def test_rope_quant_qkv_refuses_mismatched_tables():
    qkv, cos, sin, cu = qkv_operands("random")
    with pytest.raises(ValueError, match=rf"cos \({sum(LENGTHS) - 1}, {DIM}\)"):
        vision_ops.rope_quant_qkv(qkv, cos[1:], sin[1:], HEADS, cu, max(LENGTHS))
