"""The fast vision tower's attention backends, declared as rows, and which one a tower gets.

Rows of :data:`ATTENTION_BACKENDS`, in order of preference:

* ``fa3-fp8``: FlashAttention-3's FP8 forward (vLLM 0.26.0's build, :mod:`.fa3_ops`) over the packed batch,
  q/k/v in e4m3. The default for an FP8 tower (fp8-all) where it can run: the library loads, the GPU
  is Hopper, the head dim is one the library has kernels for, the tower computes in bf16 (the
  kernel's output type).
* ``sdpa``: equal-size images batched into one SDPA call, whose backend torch picks (cuDNN on the H200,
  the fastest there: benchmarks/attention_backends.py); the default otherwise.
* ``varlen``: torch's flash varlen over the packed batch; only when asked for.

:func:`choose_attention` takes the first row that is a default for the tower's precision and can run,
and logs once, with the reason, every row it passes over (an fp8-all tower on an L40S or without vLLM
runs SDPA and says why). A row asked for by name that cannot run is refused (:func:`check_attention`).

FP8 attention's scales. FA3 takes one fp32 descale per (sequence, head) for each of q, k and v, so each
is scaled by its (frame, head)'s largest magnitude / 448: a reduction over the whole frame before any
of its tokens is quantized. The text and vision producers' per-token scales cannot give that, and the
LayerNorm+quant producer before qkv quantizes the GEMM's input, not its (bf16) output. So the rotary
embedding, which already reads q and k, becomes the producer: one Triton pass computes the rotated q, k
and v's per-(frame, head) absmax (reading qkv once), a second rotates again and writes e4m3 q, k, v
with those scales (:func:`colquant.kernels.vision_ops.rope_quant_qkv`; its twin
:func:`quantize_qkv_reference`). The price is one more read of qkv per block (0.5 GB for 16 pages);
benchmarks/fa3_attention_bench.py times the producer and the attention against the BF16 rope + SDPA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from colquant.kernels import fa3_ops
from colquant.kernels.backend import warn_once
from colquant.retriever.fp8 import FP8_DTYPE, FP8_MAX, SCALE_FLOOR, FP8Linear

__all__ = ["AttentionBackend", "ATTENTION_BACKENDS", "ATTENTION_CHOICES", "SDPA_BACKENDS", "tower_precision",
           "attention_unavailable", "choose_attention", "check_attention", "quantize_qkv_reference",
           "attention_fp8"]


@dataclass(frozen=True)
class AttentionBackend:
    """One way to run the vision tower's attention. ``default_for``: the tower precisions ("bf16",
    "fp8") that get it unless asked otherwise, where it can run; ``unavailable(visual, device)``: why
    it cannot run for this tower on this device (None: it can)."""

    name: str
    default_for: tuple[str, ...]
    unavailable: Callable[[nn.Module, torch.device], str | None]
    what: str


def _nothing_more_needed(visual: nn.Module, device: torch.device) -> str | None:
    """torch's own attention: it runs wherever the fast tower does (`fast_vision.unavailable_reason`)."""
    return None


def _fa3_fp8_unavailable(visual: nn.Module, device: torch.device) -> str | None:
    """The library and a Hopper GPU first (what to install, which GPU), then this tower's head dim and
    activation dtype (the patch embedding's: the fast tower computes in it)."""
    dtype = visual.patch_embed.proj.weight.dtype
    return (fa3_ops.unavailable_reason(device) or fa3_ops.head_dim_unsupported_reason(_head_dim(visual))
            or (None if dtype == torch.bfloat16 else
                f"FlashAttention-3's FP8 forward returns bf16 and this tower computes in {dtype}"))


def _head_dim(visual: nn.Module) -> int:
    return visual.config.hidden_size // visual.config.num_heads


ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = (
    AttentionBackend("fa3-fp8", ("fp8",), _fa3_fp8_unavailable,
                     "FlashAttention-3's FP8 forward (vLLM's Hopper build) over the packed batch, e4m3 q/k/v "
                     "with one scale per (frame, head)"),
    AttentionBackend("sdpa", ("bf16", "fp8"), _nothing_more_needed,
                     "equal-size images batched into one SDPA call (torch picks the backend: cuDNN on the H200)"),
    AttentionBackend("varlen", (), _nothing_more_needed, "torch's flash varlen attention over the packed batch"),
)
ATTENTION_CHOICES: tuple[str, ...] = tuple(row.name for row in ATTENTION_BACKENDS)
SDPA_BACKENDS: tuple[str, ...] = ("flash", "cudnn", "efficient", "math")


def tower_precision(visual: nn.Module) -> str:
    """"fp8" when the blocks' Linears are FP8 (fp8-all), else "bf16" (16-bit weights)."""
    return "fp8" if isinstance(visual.blocks[0].attn.qkv, FP8Linear) else "bf16"


def attention_unavailable(name: str, visual: nn.Module, device: torch.device | str) -> str | None:
    """Why row ``name`` cannot run for ``visual`` on ``device`` (None: it can)."""
    row = next((row for row in ATTENTION_BACKENDS if row.name == name), None)
    if row is None:
        raise ValueError(f"unknown vision attention {name!r}; use one of {', '.join(ATTENTION_CHOICES)}")
    return row.unavailable(visual, torch.device(device))


def choose_attention(visual: nn.Module, device: torch.device | str) -> tuple[str, dict[str, str]]:
    """(the first row that is a default for this tower's precision and can run, {row passed over: why}).
    Each row passed over is logged once per reason: a warning on a GPU, information on CPU."""
    device = torch.device(device)
    precision = tower_precision(visual)
    passed_over: dict[str, str] = {}
    for row in (row for row in ATTENTION_BACKENDS if precision in row.default_for):
        reason = row.unavailable(visual, device)
        if reason is None:
            break
        passed_over[row.name] = reason
    else:
        raise RuntimeError(f"no vision attention backend can run the {precision} tower on {device}: {passed_over}")
    for name, reason in passed_over.items():
        warn_once(f"vision-attention:{name}:{reason}",
                  f"colquant.kernels: the {precision} vision tower's attention runs {row.name}, not {name}, because {reason}",
                  level=logging.INFO if device.type == "cpu" else logging.WARNING)
    return row.name, passed_over


def check_attention(asked: str, visual: nn.Module, device: torch.device | str) -> None:
    """Refuse, with the reason, an attention asked for by name that cannot run for ``visual`` on ``device``."""
    reason = attention_unavailable(asked, visual, device)
    if reason:
        raise ValueError(f"vision attention {asked!r} cannot run here: {reason}; leave VisionSettings.attention "
                         f"unset to get {choose_attention(visual, device)[0]!r} instead")


# --------------------------------------------------------------------------------------------
# FP8 attention (fa3-fp8): the scales' twin and the call
# --------------------------------------------------------------------------------------------


def quantize_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`vision_ops.rope_quant_qkv`'s twin after the rotary embedding: rotated q, k and v, each
    (patches, heads, head_dim) in the tower's dtype, -> (e4m3 (patches, 3, heads, head_dim), fp32 descales
    (frames, 3, heads)), each (frame, head) of each scaled by its absmax / 448 (an all-zero one by the floor)."""
    parts = torch.stack((q, k, v), dim=1).float()
    bounds = cu_seqlens.tolist()
    amax = torch.stack([parts[start:end].abs().amax(dim=(0, 3)) for start, end in zip(bounds[:-1], bounds[1:])])
    descale = (amax / FP8_MAX).clamp_min(SCALE_FLOOR)
    lengths = torch.tensor([end - start for start, end in zip(bounds[:-1], bounds[1:])], device=q.device)
    per_token = descale.repeat_interleave(lengths, dim=0)[..., None]
    return (parts / per_token).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), descale


def attention_fp8(qkv8: torch.Tensor, descale: torch.Tensor, plan: Any) -> torch.Tensor:
    """Attention within each frame of a `fast_vision.GridPlan` from e4m3 (patches, 3, heads, head_dim)
    and descales (frames, 3, heads): FA3 on CUDA, its twin (dequantize, attend in fp32) elsewhere;
    bf16 (patches, heads * head_dim)."""
    n, _, heads, dim = qkv8.shape
    attend = fa3_ops.varlen_attention_fp8 if qkv8.is_cuda else fa3_ops.varlen_attention_fp8_reference
    out = attend(*qkv8.unbind(1), plan.cu_seqlens, plan.max_seqlen, *descale.unbind(1), dim ** -0.5)
    return out.reshape(n, heads * dim)


# --------------------------------------------------------------------------------------------
# BF16 attention (sdpa, varlen)
# --------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Any, settings: Any) -> torch.Tensor:
    """Bidirectional attention within each frame of a `fast_vision.GridPlan` (16-bit rows, the
    ``sdpa`` and ``varlen`` rows; ``settings`` a `fast_vision.VisionSettings`); (patches, heads * head_dim)."""
    n, heads, dim = q.shape
    if settings.attention == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v.contiguous(), plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen,
                          plan.max_seqlen)
        return out.reshape(n, heads * dim)
    parts = []
    with _sdpa_backends(settings.sdpa_backends):
        for start, frames, length in plan.segments:  # consecutive row ranges, in order
            rows = slice(start, start + frames * length)
            shaped = [t[rows].view(frames, length, heads, dim).transpose(1, 2) for t in (q, k, v)]
            # q is token-major, so SDPA's output is too and this reshape is a view of it
            parts.append(F.scaled_dot_product_attention(*shaped).transpose(1, 2).reshape(frames * length, heads * dim))
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # pages of one size: no copy at all


class _sdpa_backends:
    """`torch.nn.attention.sdpa_kernel` with backends named by strings (flash, cudnn, efficient, math),
    priority in the order given; no-op for None."""

    def __init__(self, names: tuple[str, ...] | None) -> None:
        self.names = names
        self.context = None

    def __enter__(self) -> None:
        if not self.names:
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        table = dict(zip(SDPA_BACKENDS, (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)))
        self.context = sdpa_kernel([table[name] for name in self.names], set_priority=True)
        self.context.__enter__()

    def __exit__(self, *exc_info: object) -> None:
        if self.context is not None:
            self.context.__exit__(*exc_info)
