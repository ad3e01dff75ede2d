"""Plain-torch twins of the Triton kernels (same signatures, same rounding points).

They run anywhere (CPU tests, GPUs without Triton) and are the references the GPU benchmark
checks the kernels against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from colquant.kernels.packing import dequantize_kernel


def with_bias_into(y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """``y`` plus ``bias`` (cast to ``y``'s dtype), written into ``out`` when given: how every torch-op
    matmul ends, so it honours the kernels' ``bias=`` / ``out=`` contract alike."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def w4a16_matmul(x, qweight_k, zeros_u8, scales, group_size, *, bias=None, act=False, cfg=None, out=None,
                 sym_zero=0):
    if act:
        x = silu_mul(x)
    w = dequantize_kernel(qweight_k, zeros_u8, scales, group_size, dtype=x.dtype)
    return with_bias_into(x @ w, bias, out)


def dequant_w4(qweight_k, zeros_u8, scales, group_size, *, dtype=torch.bfloat16, out=None, sym_zero=0):
    return with_bias_into(dequantize_kernel(qweight_k, zeros_u8, scales, group_size, dtype=dtype), None, out)


def rmsnorm(x, weight, eps):
    """transformers' Qwen3 RMSNorm: fp32 statistics, round, then times the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def add_rmsnorm(x, delta, weight, eps, *, residual_out=None, out=None):
    r = x if delta is None else x + delta
    if residual_out is not None and delta is not None:
        residual_out.copy_(r)
        r = residual_out
    return r, with_bias_into(rmsnorm(r, weight, eps).to(x.dtype), None, out)


def silu_mul(x):
    i = x.shape[-1] // 2
    return F.silu(x[..., :i]) * x[..., i:]


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def qk_norm_rope(qkv, cos, sin, q_weight, k_weight, eps, B, T, HQ, HKV, D):
    """q, k, v as ``[B, H, T, D]`` views of token-major (``[B, T, H, D]``) storage, like the kernel's."""
    x = qkv.view(B, T, HQ + 2 * HKV, D)
    q = rmsnorm(x[:, :, :HQ], q_weight, eps)
    k = rmsnorm(x[:, :, HQ:HQ + HKV], k_weight, eps)
    v = x[:, :, HQ + HKV:].contiguous()
    c = cos.view(B, T, 1, D)
    s = sin.view(B, T, 1, D)
    q = (q * c) + (_rotate_half(q) * s)
    k = (k * c) + (_rotate_half(k) * s)
    return q.contiguous().transpose(1, 2), k.contiguous().transpose(1, 2), v.transpose(1, 2)


def attention_mask_4d(key_mask, T, device):
    """bool [B, 1, T, T]: causal, keys must be real tokens, and every query may see itself (so a
    padding row is never fully masked and stays finite)."""
    i = torch.arange(T, device=device)
    causal = i[None, :] <= i[:, None]
    eye = i[None, :] == i[:, None]
    keys = key_mask.bool()[:, None, None, :]
    return causal[None, None] & (keys | eye[None, None])


def sdpa(q, k, v, key_mask=None):
    """Causal attention over [B, H, T, D] (GQA by head grouping); returns [B*T, HQ*D]."""
    B, HQ, T, D = q.shape
    HKV = k.shape[1]
    if HKV != HQ:
        k = k.repeat_interleave(HQ // HKV, dim=1)
        v = v.repeat_interleave(HQ // HKV, dim=1)
    if key_mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask_4d(key_mask, T, q.device))
    return o.transpose(1, 2).reshape(B * T, HQ * D)


def short_attention(qkv, cos, sin, q_weight, k_weight, key_mask, eps, B, T, HQ, HKV, D):
    q, k, v = qk_norm_rope(qkv, cos, sin, q_weight, k_weight, eps, B, T, HQ, HKV, D)
    return sdpa(q, k, v, key_mask)
