"""W8A8 FP8 layers: e4m3 weights per output channel, dynamic per-token e4m3 activations.

Why: page encoding is compute-bound, so 4-bit weights cannot speed it up; FP8 tensor cores (sm89+,
Hopper's H100/H200) double the matrix ceiling. Dynamic FP8 needs no calibration: weight scales come
from the weights themselves (absmax per output channel / 448) and activation scales are computed per
token at run time. Making FP8 variants (`quantize_fp8`, saving them) is :mod:`colquant.quantize.fp8_variants`'s.

`FP8Linear` computes, by itself, the dequantized reference in PyTorch on any device: activations
quantized per token and dequantized, times the dequantized weight, in fp32, cast to the activation
dtype. The fused FP8 kernels (one-pass row quantization and `torch._scaled_mm` with rowwise scales,
accumulating as vLLM's Hopper FP8 GEMMs do: `set_accumulation`) are attached to its layers by
:mod:`colquant.kernels.fp8_dispatch`, which `colquant.load` does for every FP8 checkpoint; they run on
CUDA GPUs of compute capability 8.9 or more with Triton, and say once which path runs and why.

Checkpoints use the `compressed-tensors` `float-quantized` layout that vLLM reads: `<layer>.weight`
float8_e4m3fn [out, in], `<layer>.weight_scale` float32 [out, 1], and a `quantization_config`
(`quant_method: compressed-tensors`, channel-wise weights, dynamic token-wise activations);
`load_model` reads them back with the same strict checks as the 4-bit path (the layout's checks,
which checkpoints carry as remote code, are in :mod:`colquant.retriever.weight_checks`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from colquant.retriever.model import ColQwen3, ColQwen3Config
from colquant.retriever.weight_checks import CheckpointError, quantized_layer_names, raise_on_non_finite, shard_files

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_FLOOR = 1e-12  # scale of an all-zero row (its values stay 0)
LANGUAGE_MODEL = "vlm.model.language_model.layers."
VISION_TOWER = "vlm.model.visual."
SCOPES: dict[str, tuple[str, ...]] = {"lm": (LANGUAGE_MODEL,), "lm+vision": (LANGUAGE_MODEL, VISION_TOWER)}
METHOD = "fp8-dynamic"
# How the FP8 tensor cores accumulate (`torch._scaled_mm(use_fast_accum=...)`). "fast": Hopper's
# native FP8 accumulation, promoted to fp32 less often. It is what vLLM's sm90 FP8 GEMMs use
# (CUTLASS `...FP8FastAccum` schedules, csrc/quantization/cutlass_w8a8/c3x/scaled_mm_sm90_fp8_dispatch.cuh),
# i.e. how a served FP8 checkpoint computes, and 1.03-1.30x faster per GEMM on the H200
# (benchmarks/results/s5-check-h200-gemm.md). "precise": fp32 promotion as cuBLASLt's default.
ACCUMULATIONS = ("fast", "precise")
DEFAULT_ACCUMULATION = "fast"
NO_CALIBRATION = "dynamic FP8 needs no calibration: weight scales from the weights, activation scales per token at run time"
# FP8 layers on a GPU that compute the reference because no kernels were attached, said once per device
_SAID_UNATTACHED: set[str] = set()


# --------------------------------------------------------------------------------------------
# the arithmetic (torch; the CPU path and the kernels' references)
# --------------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [out, in], fp32 scale [out, 1]) with ``weight ≈ q.float() * scale``, one scale per output channel."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scale [M, 1]) of a 2-D activation, one scale per token: the fused kernel's twin."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of e4m3 rows times their scales."""
    return q.float() * scale


def add_rmsnorm_reference(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h) * weight) with ``h = residual + delta``, as transformers' Qwen3 RMSNorm rounds it."""
    h = residual if delta is None else (residual.float() + delta.float()).to(residual.dtype)
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return h, weight.to(h.dtype) * normed


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``gate_up = [..., 2N]`` (gate first), in the activation dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


def add_rmsnorm_quant_reference(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fp8_ops.add_rmsnorm_quant`'s twin: (h, e4m3 rows, scales) of RMSNorm(residual + delta) * weight."""
    h, normed = add_rmsnorm_reference(residual, delta, weight, eps)
    return (h, *quantize_rows_reference(normed))


def silu_mul_quant_reference(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_ops.silu_mul_quant`'s twin: silu(gate) * up quantized per row."""
    return quantize_rows_reference(silu_mul_reference(gate_up))


def gelu_tanh_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_ops.gelu_tanh_quant`'s twin: tanh-approximated GELU (in the activation dtype) quantized per row."""
    return quantize_rows_reference(nn.functional.gelu(x, approximate="tanh"))


class ReferenceProducers:
    """The torch twins under the fused kernels' names: what `colquant.kernels.fp8_dispatch.producers`
    gives where the kernels cannot run, so callers pick a namespace once and call the same names."""

    quantize_rows = staticmethod(quantize_rows_reference)
    add_rmsnorm_quant = staticmethod(add_rmsnorm_quant_reference)
    silu_mul_quant = staticmethod(silu_mul_quant_reference)
    gelu_tanh_quant = staticmethod(gelu_tanh_quant_reference)


class FP8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as e4m3 [out, in] and one fp32 scale per output channel;
    activations are quantized to e4m3 per token at run time (W8A8, dynamic).

    ``forward`` takes a bf16/fp16/fp32 activation (quantized inside) or a pre-quantized pair
    ``(e4m3 rows [M, in], fp32 scales [M, 1])`` from a fused producer (RMSNorm, silu·mul). It runs the
    fused FP8 kernels where ``kernels`` (attached by :mod:`colquant.kernels.fp8_dispatch`) serves the
    call, the dequantized reference otherwise."""

    bits = 8  # read by `quantization.layer_types`
    takes_fp8_rows = True  # the fused text tower hands it quantized rows (fast_text.norm_producer)

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones((out_features, 1), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        # cuBLASLt's FP8 GEMM needs both widths to be multiples of 16
        self.gemm_shape_ok = in_features % 16 == 0 and out_features % 16 == 0
        self.accumulation = DEFAULT_ACCUMULATION  # a runtime choice (`set_accumulation`), not saved
        self.kernels: Any = None  # the fused kernels' dispatch (`kernels.fp8_dispatch.attach`), not saved

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantize a float Linear (its weights per output channel); the bias stays in its dtype."""
        w = linear.weight
        self = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        self.weight, self.weight_scale = quantize_weight(w)
        if linear.bias is not None:
            self.bias.copy_(linear.bias)
        return self

    @classmethod
    def concat(cls, parts: list["FP8Linear"]) -> "FP8Linear":
        """Fuse layers that share their input (q/k/v, gate/up) along the output dimension: per-channel
        scales make this exact."""
        k = parts[0].in_features
        if any(part.in_features != k for part in parts):
            raise ValueError("fused FP8 layers must share in_features")
        first = parts[0]
        has_bias = any(part.bias is not None for part in parts)
        fused = cls(k, sum(p.out_features for p in parts), has_bias, dtype=first.dtype, device="meta")
        fused.accumulation, fused.kernels = first.accumulation, first.kernels
        fused.weight = torch.cat([p.weight for p in parts])
        fused.weight_scale = torch.cat([p.weight_scale for p in parts])
        if has_bias:
            fused.bias = torch.cat([p.bias if p.bias is not None else p.weight_scale.new_zeros(p.out_features, dtype=first.dtype)
                                    for p in parts])
        return fused

    def dequantize(self) -> torch.Tensor:
        """W as fp32 [out, in]."""
        return dequantize(self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"e4m3, accumulation={self.accumulation}")

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        kernels, fast_accum = self.kernels, self.accumulation == "fast"
        if isinstance(x, tuple):
            q, scale = x
            if self._served(kernels, q, self.dtype):
                return kernels.scaled_mm(q, scale, self.weight, self.weight_scale, self.bias, self.dtype,
                                         fast_accum=fast_accum)
            return self._reference(q, scale, self.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._served(kernels, x2, x.dtype):
            q, scale = kernels.quantize_rows(x2.contiguous())
            y = kernels.scaled_mm(q, scale, self.weight, self.weight_scale, self.bias, x.dtype, fast_accum=fast_accum)
        else:
            y = self._reference(*quantize_rows_reference(x2), x.dtype)
        return y.reshape(*lead, self.out_features)

    def _served(self, kernels: Any, rows: torch.Tensor, out_dtype: torch.dtype) -> bool:
        """The attached kernels take this call. A GPU layer without kernels computes the reference,
        slowly: said once per device."""
        if kernels is not None:
            return kernels.serves(self, rows, out_dtype)
        if rows.is_cuda and str(rows.device) not in _SAID_UNATTACHED:
            _SAID_UNATTACHED.add(str(rows.device))
            log.warning("FP8Linear: a layer on %s has no FP8 kernels attached and runs the dequantized reference; "
                        "`colquant.load` and `accelerate_model` attach them, `colquant.kernels.fp8_dispatch.attach"
                        "(model)` does it for a model quantized in place", rows.device)
        return False

    def _reference(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The same W8A8 arithmetic in PyTorch: dequantized activations times dequantized weights in fp32."""
        y = dequantize(q, scale) @ self.dequantize().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)


# --------------------------------------------------------------------------------------------
# accumulation and the checkpoint layout
# --------------------------------------------------------------------------------------------


def check_accumulation(accumulation: str) -> None:
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"FP8 accumulation {accumulation!r} is not one of {', '.join(map(repr, ACCUMULATIONS))} "
                         "('fast': as vLLM's Hopper FP8 GEMMs, the default; 'precise': fp32 promotion)")


def set_accumulation(model: nn.Module, accumulation: str) -> int:
    """Make every FP8Linear of ``model`` accumulate ``accumulation``-ly on the FP8 kernels; returns how
    many. The CPU reference path computes in fp32 either way. Captured query graphs are keyed by the
    accumulation they were captured with (`kernels.fast_text.QueryGraphs`), so none replays the old one."""
    check_accumulation(accumulation)
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FP8 layers, so FP8 accumulation does not apply: "
                         "load an FP8 variant (fp8-lm, fp8-all)")
    for layer in layers:
        layer.accumulation = accumulation
    return len(layers)


def quantization_config(scope: str) -> dict[str, Any]:
    """config.json's `quantization_config`: channel-wise e4m3 weights, dynamic token-wise e4m3
    activations, for the Linear layers whose names start with the scope's prefixes."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": [f"re:^{re.escape(prefix)}.*" for prefix in SCOPES[scope]],
            "weights": {**fp8, "strategy": "channel", "dynamic": False},
            "input_activations": {**fp8, "strategy": "token", "dynamic": True},
            "output_activations": None,
            "format": "float-quantized",
        }},
        "ignore": ["embedding_proj_layer"],
        "kv_cache_scheme": None,
        "colquant_scope": scope,
    }


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An FP8 ColQwen3 from a checkpoint written by `save_fp8_model` (header checks already done by
    `colquant.retriever.checkpoint.verify_checkpoint`); missing or unexpected tensors raise CheckpointError."""
    from safetensors import safe_open
    from transformers import initialization

    config = ColQwen3Config.from_pretrained(str(path))
    quantization = config.quantization_config
    del config.quantization_config  # the FP8 layers are built here, not by a transformers quantizer
    with initialization.no_init_weights(), torch.device(device):
        model = ColQwen3._from_config(config, dtype=dtype)
    for name in quantized_layer_names(model, quantization, path):
        linear = model.get_submodule(name)
        model.set_submodule(name, FP8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                            dtype=dtype, device=device))
    model.config.quantization_config = quantization
    wanted = model.state_dict()
    found: set[str] = set()
    for shard in shard_files(path):
        with safe_open(str(shard), framework="pt") as reader:
            for key in reader.keys():
                if key in wanted:
                    wanted[key].copy_(reader.get_tensor(key))
                    found.add(key)
                elif not any(re.fullmatch(p, key) for p in ColQwen3._keys_to_ignore_on_load_unexpected):
                    raise CheckpointError(f"{path}: {shard.name} holds {key}, which the FP8 ColQwen3 of its config.json "
                                          "does not have; the checkpoint is from another model or scope: re-create it")
    missing = sorted(set(wanted) - found)
    if missing:
        shown = ", ".join(missing[:6]) + (f" ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise CheckpointError(f"{path} lacks {shown}: an FP8 layer needs its weight and weight_scale. The checkpoint "
                              "is incomplete: re-create the variant (notebook 03) or re-download it")
    raise_on_non_finite(path, model)
    return model
