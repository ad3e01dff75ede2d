"""W8A8 FP8 variants: e4m3 weights per output channel, dynamic per-token e4m3 activations.

Why: page encoding is compute-bound, so 4-bit weights cannot speed it up; FP8 tensor cores (sm89+,
Hopper's H100/H200) double the matrix ceiling. `quantize_fp8(model, scope)` swaps the Linear layers
of the language model's decoder (`scope="lm"`) or of the vision tower too (`"lm+vision"`) for
`FP8Linear`. Dynamic FP8 needs no calibration: weight scales come from the weights themselves (absmax
per output channel / 448) and activation scales are computed per token at run time.

`FP8Linear` runs, on CUDA GPUs of compute capability 8.9 or more with Triton, a fused Triton kernel
that quantizes each activation row in one pass (:mod:`colquant.kernels.fp8_ops`) and
`torch._scaled_mm` with rowwise scales (bf16 out), accumulating as vLLM's Hopper FP8 GEMMs do
(`set_accumulation`: "fast", the default, or "precise"). Elsewhere (CPU, older GPUs) it runs the same
arithmetic in PyTorch, a dequantized reference: activations quantized per token and dequantized,
times the dequantized weight, in fp32, cast to the activation dtype. It logs once which path runs and
why (naming the device and its compute capability).

Checkpoints use the `compressed-tensors` `float-quantized` layout that vLLM reads: `<layer>.weight`
float8_e4m3fn [out, in], `<layer>.weight_scale` float32 [out, 1], and a `quantization_config`
(`quant_method: compressed-tensors`, channel-wise weights, dynamic token-wise activations).
`colquant.load` reads them back with the same strict checks as the 4-bit path
(:mod:`colquant.fp8_checkpoint`, whose public names are importable from here too; the layout's checks,
which checkpoints carry as remote code, are in :mod:`colquant.weight_checks`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_FLOOR = 1e-12  # scale of an all-zero row (its values stay 0)
LANGUAGE_MODEL = "vlm.model.language_model.layers."
VISION_TOWER = "vlm.model.visual."
SCOPES: dict[str, tuple[str, ...]] = {"lm": (LANGUAGE_MODEL,), "lm+vision": (LANGUAGE_MODEL, VISION_TOWER)}
VARIANTS: dict[str, tuple[str, str]] = {"lm": ("fp8-lm", "lm"), "all": ("fp8-all", "lm+vision")}  # kind -> (name, scope)
METHOD = "fp8-dynamic"
# How the FP8 tensor cores accumulate (`torch._scaled_mm(use_fast_accum=...)`). "fast": Hopper's
# native FP8 accumulation, promoted to fp32 less often. It is what vLLM's sm90 FP8 GEMMs use
# (CUTLASS `...FP8FastAccum` schedules, csrc/quantization/cutlass_w8a8/c3x/scaled_mm_sm90_fp8_dispatch.cuh),
# i.e. how a served FP8 checkpoint computes, and 1.03-1.30x faster per GEMM on the H200
# (benchmarks/results/s5-check-h200-gemm.md). "precise": fp32 promotion as cuBLASLt's default.
ACCUMULATIONS = ("fast", "precise")
DEFAULT_ACCUMULATION = "fast"
NO_CALIBRATION = "dynamic FP8 needs no calibration: weight scales from the weights, activation scales per token at run time"


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
    """The torch twins under the fused kernels' names: what :func:`producers` gives where the kernels
    cannot run, so callers pick a namespace once and call the same names."""

    quantize_rows = staticmethod(quantize_rows_reference)
    add_rmsnorm_quant = staticmethod(add_rmsnorm_quant_reference)
    silu_mul_quant = staticmethod(silu_mul_quant_reference)
    gelu_tanh_quant = staticmethod(gelu_tanh_quant_reference)


# --------------------------------------------------------------------------------------------
# which path runs
# --------------------------------------------------------------------------------------------


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """None when the FP8 kernels (Triton quantization + `_scaled_mm`) can run on ``device``; else why not."""
    from colquant.kernels.backend import gpu_unavailable, triton_import_error

    return gpu_unavailable(device, "the FP8 path", triton_import_error, min_capability=(8, 9),
                           needed_for="FP8 tensor cores")


@functools.cache
def _kernels_run_on(device: str) -> bool:
    """Cached per device (this sits on every FP8 Linear call); logs once which path runs."""
    from colquant.kernels.backend import warn_once

    reason = fp8_unavailable_reason(device)
    if reason is None:
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        warn_once(f"fp8:{device}", f"FP8Linear: fused FP8 quantization + torch._scaled_mm on {device} "
                                   f"(compute capability {major}.{minor})", level=logging.INFO)
        return True
    on_cpu = torch.device(device).type == "cpu"
    warn_once(f"fp8-ref:{reason}", f"FP8Linear: running the dequantized reference (PyTorch) because {reason}",
              level=logging.INFO if on_cpu else logging.WARNING)
    return False


@functools.cache
def _fp8_ops() -> Any:
    """The Triton kernels module, imported once (an import statement per call costs host time on
    every Linear of the eager page path)."""
    from colquant.kernels import fp8_ops

    return fp8_ops


@functools.cache
def _force_reference() -> list[bool]:
    """`colquant.kernels.force_reference`'s switch (a one-element list, read on every call)."""
    from colquant.kernels.linear import _FORCE_REFERENCE

    return _FORCE_REFERENCE


def producers(device: torch.device | str) -> Any:
    """The quantizing producers for activations on ``device``: the fused Triton kernels
    (:mod:`colquant.kernels.fp8_ops`) where FP8Linear runs its kernels, else
    :class:`ReferenceProducers` (same names, same arithmetic in PyTorch)."""
    if _force_reference()[0] or not _kernels_run_on(str(device)):
        return ReferenceProducers
    return _fp8_ops()


class FP8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as e4m3 [out, in] and one fp32 scale per output channel;
    activations are quantized to e4m3 per token at run time (W8A8, dynamic).

    ``forward`` takes a bf16/fp16/fp32 activation (quantized inside) or a pre-quantized pair
    ``(e4m3 rows [M, in], fp32 scales [M, 1])`` from a fused producer (RMSNorm, silu·mul)."""

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
        fused.accumulation = first.accumulation
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
        if isinstance(x, tuple):
            q, scale = x
            if self._fast(q, self.dtype):
                return _fp8_ops().scaled_mm(q, scale, self.weight, self.weight_scale, self.bias, self.dtype,
                                            fast_accum=self.accumulation == "fast")
            return self._reference(q, scale, self.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._fast(x2, x.dtype):
            ops = _fp8_ops()
            q, scale = ops.quantize_rows(x2.contiguous())
            y = ops.scaled_mm(q, scale, self.weight, self.weight_scale, self.bias, x.dtype,
                              fast_accum=self.accumulation == "fast")
        else:
            y = self._reference(*quantize_rows_reference(x2), x.dtype)
        return y.reshape(*lead, self.out_features)

    def _fast(self, rows: torch.Tensor, out_dtype: torch.dtype) -> bool:
        """The FP8 kernels serve this call: bf16 output (rowwise `_scaled_mm`'s only type), GEMM widths
        it takes, at least one row, and a device that has them (checked once per device, and logged)."""
        if rows.shape[0] == 0 or _force_reference()[0] or not _kernels_run_on(str(rows.device)):
            return False
        if out_dtype == torch.bfloat16 and self.gemm_shape_ok:
            return True
        from colquant.kernels.backend import warn_once

        why = (f"its activations are {out_dtype} (rowwise torch._scaled_mm outputs bfloat16 only; load the model in "
               "bfloat16)" if out_dtype != torch.bfloat16 else
               f"its widths {self.in_features}->{self.out_features} are not multiples of 16 (FP8 GEMM)")
        warn_once(f"fp8-layer:{why}", f"FP8Linear: a layer runs the dequantized reference on {rows.device} because {why}")
        return False

    def _reference(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The same W8A8 arithmetic in PyTorch: dequantized activations times dequantized weights in fp32."""
        y = dequantize(q, scale) @ self.dequantize().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)


# --------------------------------------------------------------------------------------------
# quantizing a model
# --------------------------------------------------------------------------------------------


def check_accumulation(accumulation: str) -> None:
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"FP8 accumulation {accumulation!r} is not one of {', '.join(map(repr, ACCUMULATIONS))} "
                         "('fast': as vLLM's Hopper FP8 GEMMs, the default; 'precise': fp32 promotion)")


def set_accumulation(model: nn.Module, accumulation: str) -> int:
    """Make every FP8Linear of ``model`` accumulate ``accumulation``-ly on the FP8 kernels; returns how
    many. The CPU reference path computes in fp32 either way. Captured query graphs replay the
    GEMMs they captured, so they are dropped (re-captured at the next query)."""
    check_accumulation(accumulation)
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no FP8 layers, so FP8 accumulation does not apply: "
                         "load an FP8 variant (fp8-lm, fp8-all)")
    for layer in layers:
        layer.accumulation = accumulation
    from colquant.kernels import reset_graphs

    reset_graphs(model)
    return len(layers)


def fp8_targets(model: nn.Module, scope: str) -> list[str]:
    """Names of the Linear layers ``scope`` covers (see SCOPES); the 320-d projection stays 16-bit."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: use one of {', '.join(SCOPES)}")
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(SCOPES[scope])]


@torch.no_grad()
def quantize_fp8(model: nn.Module, scope: str = "lm") -> list[str]:
    """Replace the Linear layers in ``scope`` ("lm" or "lm+vision") by `FP8Linear`, in place, one at
    a time so memory stays flat; returns their names."""
    names = fp8_targets(model, scope)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layers under {', '.join(SCOPES[scope])}: "
                         "quantize_fp8 expects a ColQwen3 (colquant.load)")
    for name in names:
        model.set_submodule(name, FP8Linear.from_linear(model.get_submodule(name)))
    return names


def fuse_text_projections(model: nn.Module) -> int:
    """Fuse the text tower's FP8 q/k/v and gate/up into `qkv_proj` / `gate_up_proj` (what the fused
    tower of :mod:`colquant.kernels.fast_text` calls; its own fusion knows nn.Linear and W4A16Linear
    only). Call only right before `accelerate_model`: transformers' decoder layers need the parts."""
    fused = 0
    for name, module in model.named_modules():
        if not name.endswith("language_model") or not hasattr(module, "layers"):
            continue
        for layer in module.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if isinstance(getattr(attn, "q_proj", None), FP8Linear):
                attn.qkv_proj = FP8Linear.concat([attn.q_proj, attn.k_proj, attn.v_proj])
                del attn.q_proj, attn.k_proj, attn.v_proj
                fused += 1
            if isinstance(getattr(mlp, "gate_proj", None), FP8Linear):
                mlp.gate_up_proj = FP8Linear.concat([mlp.gate_proj, mlp.up_proj])
                del mlp.gate_proj, mlp.up_proj
                fused += 1
    return fused


def prepare_fp8(model: nn.Module, profile: dict[str, Any] | None = None, *, scope: str = "lm",
                accelerate: bool = True, accumulation: str = DEFAULT_ACCUMULATION) -> dict[str, Any]:
    """The bench's FP8 precision (its `PREPARE` signature: model, profile -> info): quantize ``scope``
    of a loaded BF16 model in place, its GEMMs accumulating ``accumulation``-ly, and, where
    ``accelerate``, fuse the FP8 projections and install the fused text tower (CUDA graphs for
    queries) and, on CUDA, the fast vision tower (whose GEMMs call the FP8 vision layers in fp8-all).
    Wire as ``functools.partial(prepare_fp8, scope="lm+vision")`` for fp8-all."""
    check_accumulation(accumulation)
    names = quantize_fp8(model, scope)
    set_accumulation(model, accumulation)
    info: dict[str, Any] = dict(scope=scope, fp8_layers=len(names), calibration=NO_CALIBRATION,
                                accumulation=accumulation)
    if accelerate:
        from colquant.kernels import accelerate_model

        info["fused_projections"] = fuse_text_projections(model)
        accelerate_model(model)
    return info


# The checkpoint layout, loading and variant production live in colquant.fp8_checkpoint (they
# import this module); their public names stay reachable here, imported on first use.
_CHECKPOINT_NAMES = frozenset({"quantization_config", "load_model", "variant_names", "save_fp8_model", "fp8_metadata",
                               "produce_fp8_variant", "model_card"})


def __getattr__(name: str) -> Any:
    if name in _CHECKPOINT_NAMES:
        from colquant import fp8_checkpoint

        return getattr(fp8_checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
