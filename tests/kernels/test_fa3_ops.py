"""vLLM 0.26.0's FlashAttention-3 FP8 forward (kernels/fa3_ops.py): the loader's refusals and the wrapper's
checks everywhere, its torch twin on CPU, and the kernel against SDPA in BF16 where the library and a Hopper
GPU are."""

import pytest
import torch
import torch.nn.functional as F

from colquant.kernels import fa3_ops
from colquant.kernels.vision_attention import quantize_qkv_reference

FP8 = torch.float8_e4m3fn


@pytest.fixture
def fresh():
    fa3_ops.clear_cache()
    yield
    fa3_ops.clear_cache()


# ------------------------------------------------------------------ refusals (CPU; the loader's: test_vllm_library.py)


def test_cpu_device_and_no_cuda_are_refused(monkeypatch):
    monkeypatch.setattr(fa3_ops, "load_error", lambda: None)
    assert "needs a CUDA GPU" in fa3_ops.unavailable_reason("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fa3_ops.unavailable_reason("cuda:0") == "CUDA is not available"


@pytest.mark.parametrize("capability, refused", [((8, 9), True), ((10, 0), True), ((9, 0), False)])
def test_only_hopper_runs_it(monkeypatch, capability, refused):
    monkeypatch.setattr(fa3_ops, "load_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    why = fa3_ops.unavailable_reason("cuda:0")
    assert (why is not None) == refused
    if refused:
        assert f"compute capability {capability[0]}.{capability[1]}" in why and "Hopper (sm90)" in why


def test_the_library_is_named_before_the_gpu(monkeypatch):
    """What to install comes first: on a machine without the library, that is the reason given."""
    monkeypatch.setattr(fa3_ops, "load_error", lambda: "not installed (pip install ...)")
    assert fa3_ops.unavailable_reason("cpu") == "not installed (pip install ...)"


def test_head_dims():
    assert fa3_ops.head_dim_unsupported_reason(64) is None
    assert "64, 96, 128, 192, 256; this one is 32" in fa3_ops.head_dim_unsupported_reason(32)


# ------------------------------------------------------------------ the wrapper's checks (CPU)


def packed(lengths: list[int], heads: int, dim: int, device: str, seed: int = 0, sharpness: float = 1.0):
    """bf16 q, k, v (tokens, heads, dim) with logits q.k / sqrt(dim) of standard deviation sharpness^2,
    int32 cu_seqlens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, heads, dim, generator=gen, device=device) for _ in range(3))
    q, k = q * sharpness, k * sharpness
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    return q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), cu


def quantized(q, k, v, cu):
    qkv8, descale = quantize_qkv_reference(q, k, v, cu)
    return (*qkv8.unbind(1), *descale.unbind(1))


def test_wrapper_refuses_wrong_inputs_naming_them():
    q, k, v, cu = packed([8, 5], heads=2, dim=64, device="cpu")
    q8, k8, v8, dq, dk, dv = quantized(q, k, v, cu)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fa3_ops.varlen_attention_fp8(q, k, v, cu, 8, dq, dk, dv, 0.125)
    with pytest.raises(ValueError, match=r"k_descale must be float32 of shape \(sequences, heads\) = \(2, 2\)"):
        fa3_ops.varlen_attention_fp8(q8, k8, v8, cu, 8, dq, dk[:1], dv, 0.125)
    with pytest.raises(ValueError, match="int32"):
        fa3_ops.varlen_attention_fp8(q8, k8, v8, cu.long(), 8, dq, dk, dv, 0.125)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        fa3_ops.varlen_attention_fp8(q8.transpose(1, 2).contiguous().transpose(1, 2), k8, v8, cu, 8, dq, dk, dv, 0.125)
    q32, k32, v32, cu32 = packed([8, 5], heads=2, dim=32, device="cpu")
    args = quantized(q32, k32, v32, cu32)
    with pytest.raises(ValueError, match="this one is 32"):
        fa3_ops.varlen_attention_fp8(*args[:3], cu32, 8, *args[3:], 0.125)


def test_wrapper_refuses_to_run_where_the_library_cannot(fresh, monkeypatch):
    monkeypatch.setattr(fa3_ops, "load_error", lambda: "vLLM 0.26.0's FlashAttention-3 library is not installed (...)")
    q, k, v, cu = packed([8, 5], heads=2, dim=64, device="cpu")
    args = quantized(q, k, v, cu)
    with pytest.raises(RuntimeError, match="FlashAttention-3 cannot run here: vLLM 0.26.0's FlashAttention-3 library"):
        fa3_ops.varlen_attention_fp8(*args[:3], cu, 8, *args[3:], 0.125)


def test_twin_is_block_diagonal_attention_of_the_dequantized_inputs():
    """The twin, per sequence, equals one masked attention over the whole packed batch of the
    dequantized (e4m3 x descale) inputs: the sequences and per-(sequence, head) descales line up."""
    lengths = [9, 4, 13]
    q, k, v, cu = packed(lengths, heads=2, dim=64, device="cpu", seed=1)
    q8, k8, v8, dq, dk, dv = quantized(q, k, v, cu)
    got = fa3_ops.varlen_attention_fp8_reference(q8, k8, v8, cu, max(lengths), dq, dk, dv, 0.125)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    deq = [t.float() * d[seq][:, :, None] for t, d in ((q8, dq), (k8, dk), (v8, dv))]
    mask = seq[:, None] == seq[None, :]
    want = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in deq), attn_mask=mask, scale=0.125)
    torch.testing.assert_close(got, want.transpose(0, 1).to(torch.bfloat16), rtol=2**-7, atol=1e-3)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape


# ------------------------------------------------------------------ the kernel (CUDA, Hopper, the library)

REASON = fa3_ops.unavailable_reason("cuda") if torch.cuda.is_available() else "needs a CUDA GPU"
FA3 = pytest.mark.skipif(REASON is not None, reason=f"FlashAttention-3's FP8 forward cannot run here: {REASON}")
# e4m3 keeps 3 mantissa bits: rounding moves each value by ~2.7% RMS (relative), in q, k, v and in FA3's
# e4m3 probabilities. Emulated on CPU for these inputs (unit-variance logits, 1,536 + 777 tokens, head dims
# 64 and 128): the twin (e4m3 q, k, v, exact attention) is 4.7-4.8% (relative, Frobenius) from SDPA in
# bf16, worst token cosine 0.997; rounding the probabilities to e4m3 as well gives 5.3-5.4%. Allowed: 8%
# and every token's cosine >= 0.99. Sharper attention (logits of std 2.25) doubles the error (q and k's
# rounding moves the logits): the bound is for these inputs, not for every tower.
FP8_REL_ERR, FP8_TOKEN_COSINE = 0.08, 0.99


def sdpa_bf16(q, k, v, cu):
    """SDPA in bf16 per sequence, (tokens, heads, dim): the result FA3's FP8 forward stands in for."""
    bounds = cu.tolist()
    return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
                      for a, b in zip(bounds[:-1], bounds[1:])])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@FA3
@pytest.mark.parametrize("dim", [64, 128])
def test_fp8_forward_matches_sdpa_bf16_on_random_varlen(dim):
    lengths = [5120, 5120, 1536, 777]  # two pages, a smaller image, an odd length
    q, k, v, cu = packed(lengths, heads=16, dim=dim, device="cuda", seed=dim)
    want = sdpa_bf16(q, k, v, cu)
    args = quantized(q, k, v, cu)
    got = fa3_ops.varlen_attention_fp8(*args[:3], cu, max(lengths), *args[3:], dim ** -0.5)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel_err(got, want) < FP8_REL_ERR
    cosine = F.cosine_similarity(got.float().flatten(1), want.float().flatten(1), dim=-1)
    assert cosine.min().item() >= FP8_TOKEN_COSINE


@FA3
def test_fp8_forward_is_close_to_its_twin():
    """Against the exact attention of the same e4m3 inputs, only FA3's own e4m3 probabilities differ."""
    lengths = [1536, 777]
    q, k, v, cu = packed(lengths, heads=16, dim=64, device="cuda", seed=3)
    args = quantized(q, k, v, cu)
    got = fa3_ops.varlen_attention_fp8(*args[:3], cu, max(lengths), *args[3:], 0.125)
    want = fa3_ops.varlen_attention_fp8_reference(*args[:3], cu, max(lengths), *args[3:], 0.125)
    assert rel_err(got, want) < FP8_REL_ERR


@FA3
def test_bf16_control_matches_sdpa():
    lengths = [5120, 777]
    q, k, v, cu = packed(lengths, heads=16, dim=64, device="cuda", seed=4)
    got = fa3_ops.varlen_attention_bf16(q, k, v, cu, max(lengths), 0.125)
    assert rel_err(got, sdpa_bf16(q, k, v, cu)) < 1e-2
