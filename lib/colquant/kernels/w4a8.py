"""W4A8: a W4A16 checkpoint run with per-token FP8 activations (``colquant.load(path, activations="fp8")``).

Why: a W4A16 kernel still multiplies in BF16, so from a few hundred tokens on (large query batches,
pages) it can at best match BF16; only FP8 tensor cores make a 4-bit model faster there. W4A8 keeps
the same 4-bit weights (and memory) and feeds FP8 tensor cores: vLLM 0.26.0's CUTLASS W4A8 kernel on
Hopper (:mod:`.vllm_ops`), its activations quantized per token by the fused FP8 producers of
:mod:`.fp8_ops` (RMSNorm, silu·mul) that the FP8 variants use.

The auto-round / GPTQ symmetric int4 weights are re-encoded once, at load (:func:`encode`):

* integers: uint4b8 -> signed int4, ``q - 8`` per nibble (:func:`.vllm_ops.uint4b8_to_int4`);
* scales: fp16 group scales -> e4m3 group scales times an fp32 scale per output channel
  (:func:`.vllm_ops.fp8_group_scales`, one e4m3 rounding);
* activations: e4m3 per token with scale ``amax / 448`` (:func:`colquant.retriever.fp8.quantize_rows_reference`'s rule).

What the kernel computes (CUTLASS's mixed-input GEMM behind ``cutlass_w4a8_mm``): it multiplies an int4
``q`` by its e4m3 group scale ``s`` through a table of ``e4m3(s * q)`` (``cutlass_pack_scale_fp8`` writes
``cutlass::packed_scale_t``: ``s * -8 .. s * -1`` rounded to e4m3, the positive products by a sign flip,
which round-to-nearest-even makes the same rounding), so each weight is rounded to e4m3 once more
(:func:`table_weight`); then an FP8 MMA accumulating in fp32, times the token scale and the channel
scale, written as bf16, and the bias added in bf16 (:class:`.vllm_ops.Packed`).

:class:`W4A8Linear` keeps one 4-bit copy per layer on the compute device. On CUDA that is vLLM's repack
(the W4A8 encoding stays in host memory, as :func:`.vllm_ops.prepare` keeps the W4A16 one: for
``force_reference`` and the checks). On CPU it is the encoding itself, run by :func:`reference_matmul`:
a dequantized reference (fp32) of exactly that arithmetic, the kernel's numbers, not its speed or memory.
Where the kernel cannot run on a CUDA device there is no fallback: :func:`device_problem` says why.
"""

from __future__ import annotations

import torch
from torch import nn

from colquant.kernels import fp8_dispatch, vllm_ops
from colquant.kernels.fast_text import find_text_model, fuse_text_model
from colquant.kernels.linear import _FORCE_REFERENCE, W4A16Linear, replace_quant_linears
from colquant.kernels.packing import kernel_to_gptq, unpack_int4_rows
from colquant.retriever import fp8
from colquant.retriever.weight_checks import is_fp8_config

__all__ = ["ACTIVATIONS", "KERNEL", "REFERENCE", "W4A8Linear", "check_activations", "checkpoint_problem",
           "device_problem", "encode", "signed_int4", "table_weight", "reference_matmul", "convert_model"]

ACTIVATIONS = ("bf16", "fp8")  # colquant.load's activations=: as saved (W4A16 for a 4-bit checkpoint), or W4A8
KERNEL = f"vLLM {vllm_ops.VLLM_VERSION} CUTLASS W4A8 (Hopper)"
REFERENCE = "dequantized reference (PyTorch, fp32): W4A8's numerics, not its speed or memory"
GROUP_SIZE = 128  # the only group size CUTLASS W4A8 takes (vllm_ops.layer_unsupported_reason)
QUANT_METHODS = ("auto-round", "gptq")  # checkpoints whose int4 weights are GPTQ-packed uint4b8


def check_activations(activations: str) -> None:
    """Before any loading: a typo would otherwise cost a multi-GB load before failing."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r} is not an activation precision; use one of "
                         f"{', '.join(map(repr, ACTIVATIONS))} ('bf16': the checkpoint as saved; 'fp8': a 4-bit "
                         "auto-round/GPTQ symmetric checkpoint run as W4A8, per-token e4m3 activations)")


def checkpoint_problem(quantization: dict | None) -> str | None:
    """Why a checkpoint with this ``quantization_config`` cannot run as W4A8 (None: it can)."""
    if not quantization:
        return ("it has no quantization_config (a 16-bit checkpoint); W4A8 runs the int4 weights of a W4A16 "
                "variant: quantize one first (notebook 03)")
    if is_fp8_config(quantization):
        return ("it is an FP8 (W8A8) checkpoint, whose activations are e4m3 per token already: leave activations "
                "at 'bf16' (the default)")
    method, bits, group = quantization.get("quant_method"), quantization.get("bits"), quantization.get("group_size")
    if method not in QUANT_METHODS or bits != 4:
        return (f"its quantization_config says quant_method={method!r}, bits={bits!r}; W4A8 re-encodes 4-bit "
                f"{' or '.join(QUANT_METHODS)} weights")
    if quantization.get("sym") is not True:
        return "its zero points are asymmetric (sym is not true); CUTLASS W4A8 takes signed int4 (every zero point 8)"
    if group != GROUP_SIZE:
        return f"its group size is {group}; CUTLASS W4A8 takes group size {GROUP_SIZE} only"
    if quantization.get("desc_act"):
        return "it is act-order (desc_act: true); CUTLASS W4A8 takes groups of consecutive inputs"
    return None


def device_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why W4A8 cannot run on ``device`` in ``dtype`` (None: it can). On CPU it runs the reference;
    elsewhere only vLLM's CUTLASS kernel, never a substitute (:func:`.vllm_ops.unavailable_reason`)."""
    if dtype != torch.bfloat16:
        return f"dtype={dtype} was asked for, and the W4A8 kernel (and its CPU reference) writes bfloat16: use dtype='bfloat16'"
    if device.type == "cpu":
        return None
    reason = vllm_ops.unavailable_reason(device, "w4a8")
    return None if reason is None else f"{KERNEL} cannot run on {device}: {reason}"


# --------------------------------------------------------------------------------------------
# the encoding and its arithmetic (plain torch)
# --------------------------------------------------------------------------------------------


def encode(qweight_k: torch.Tensor, zeros_u8: torch.Tensor, scales: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A symmetric W4A16 layer's kernel-layout tensors -> (signed int4 words [K/8, N], eight consecutive
    inputs per word as GPTQ packs them; e4m3 group scales [K/G, N]; fp32 channel scales [N, 1])."""
    if not bool((zeros_u8 == 8).all()):
        raise ValueError("asymmetric zero points (some zero point is not 8): CUTLASS W4A8 takes signed int4 only")
    qweight = kernel_to_gptq(qweight_k, zeros_u8)[0]
    return (vllm_ops.uint4b8_to_int4(qweight), *vllm_ops.fp8_group_scales(scales))


def signed_int4(words: torch.Tensor) -> torch.Tensor:
    """Signed int4 words [K/8, N] -> their values [K, N] (int8, -8..7)."""
    u = unpack_int4_rows(words)
    return torch.where(u >= 8, u - 16, u)


def table_weight(int4_words: torch.Tensor, group_scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 [K, N]: each int4 times its e4m3 group scale, rounded once to e4m3, as the kernel's table holds it.
    The product is exact in fp32 (at most 4 x 4 significant bits), so only the e4m3 rounding remains."""
    q = signed_int4(int4_words)
    s = group_scales.float().repeat_interleave(group_size, dim=0)[: q.shape[0]]
    return (q.float() * s).to(torch.float8_e4m3fn).float()


def reference_matmul(x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], int4_words: torch.Tensor,
                     group_scales: torch.Tensor, channel_scales: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A8's arithmetic in PyTorch on ``x`` [M, K] (quantized here per token) or an ``(e4m3 rows, fp32
    scales [M, 1])`` pair: e4m3 rows times :func:`table_weight` accumulated in fp32, times the token and
    channel scales, written as bf16, plus the bias in bf16. The weights go where ``x`` is."""
    q, token_scales = x if isinstance(x, tuple) else fp8.quantize_rows_reference(x)
    dev = q.device
    acc = q.float() @ table_weight(int4_words.to(dev), group_scales.to(dev), group_size)
    y = (acc * token_scales * channel_scales.to(dev).t()).to(torch.bfloat16)
    return y if bias is None else y + bias.to(dev, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------


class W4A8Linear(nn.Module):
    """``y = x @ W.T + b`` with W4A8's arithmetic (module doc). ``forward`` takes activations (quantized
    per token inside) or an ``(e4m3 rows [M, in], fp32 scales [M, 1])`` pair from a fused producer; the
    output is bf16. Built from a :class:`W4A16Linear` (:meth:`from_w4a16`); its buffers are the W4A8
    encoding, in host memory."""

    bits = 4  # read by `quantization.layer_types`
    takes_fp8_rows = True  # the fused text tower hands it quantized rows (fast_text.norm_producer)

    def __init__(self, in_features: int, out_features: int, group_size: int = GROUP_SIZE, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("int4_words", torch.zeros((in_features // 8, out_features), dtype=torch.int32))
        self.register_buffer("group_scales", torch.zeros((in_features // group_size, out_features),
                                                         dtype=torch.float8_e4m3fn))
        self.register_buffer("channel_scales", torch.ones((out_features, 1), dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.bfloat16))
        else:
            self.bias = None
        self.compute_device = torch.device("cpu")
        self._packed: vllm_ops.Packed | None = None  # vLLM's repack on the GPU (the kernel path)

    @classmethod
    @torch.no_grad()
    def from_w4a16(cls, layer: W4A16Linear) -> "W4A8Linear":
        """Re-encode ``layer`` (kept in host memory) and, where it computes on CUDA, repack it for vLLM's
        kernel there: a layer the kernel cannot take is refused, naming why."""
        self = cls(layer.in_features, layer.out_features, layer.group_size, bias=layer.bias is not None)
        self.int4_words, self.group_scales, self.channel_scales = encode(*layer.kernel_tensors("cpu"))
        device = layer.compute_device
        if layer.bias is not None:
            self.bias = layer.bias.to(device, torch.bfloat16)
        if device.type != "cpu":
            self._attach_kernel(device)
        return self

    def _attach_kernel(self, device: torch.device) -> None:
        why = vllm_ops.layer_unsupported_reason(self.in_features, self.out_features, self.group_size, True, "w4a8")
        if why:
            raise ValueError(f"CUTLASS W4A8 cannot run this layer ({self.in_features}->{self.out_features}): {why}")
        self._packed = vllm_ops.pack_w4a8(self.int4_words.to(device), self.group_scales.to(device),
                                          self.channel_scales.to(device), self.group_size)
        self.compute_device = device

    def dequantize(self) -> torch.Tensor:
        """W as the kernel multiplies it, fp32 [out, in] (the channel scale applied)."""
        return (table_weight(self.int4_words, self.group_scales, self.group_size) * self.channel_scales.t()).t()

    def extra_repr(self) -> str:
        runs = "CUTLASS W4A8" if self._packed is not None else "dequantized reference"
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, int4 x e4m3, {runs}")

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows = x[0] if isinstance(x, tuple) else x.reshape(-1, self.in_features)
        if rows.device != self.compute_device:
            raise RuntimeError(f"W4A8Linear computes on {self.compute_device} and got activations on {rows.device}: "
                               "load the model with colquant.load(..., device=...) where it will run")
        if self._packed is None or _FORCE_REFERENCE[0] or rows.shape[0] == 0:
            y = reference_matmul(x if isinstance(x, tuple) else rows, self.int4_words, self.group_scales,
                                 self.channel_scales, self.group_size, self.bias)
        else:
            pair = x if isinstance(x, tuple) else fp8_dispatch.producers(rows.device).quantize_rows(rows.contiguous())
            y = self._packed(pair, bias=self.bias)
        return y if isinstance(x, tuple) else y.reshape(*x.shape[:-1], self.out_features)


# --------------------------------------------------------------------------------------------
# a model
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def convert_model(model: nn.Module, *, fuse: bool) -> dict:
    """Make every 4-bit layer of the text tower (auto-round/GPTQ QuantLinear or W4A16Linear) a
    :class:`W4A8Linear`, one at a time (memory stays flat), in place. ``fuse``: q/k/v and gate/up fused
    first, as the fused tower of :func:`.fast_text.accelerate_model` runs them (transformers' own
    decoder layers need them apart). Returns what runs, for the model's metadata and the logs."""
    tower = find_text_model(model)
    replace_quant_linears(tower, dtype=torch.bfloat16)
    if fuse:
        fuse_text_model(tower)
    names = [name for name, module in tower.named_modules() if isinstance(module, W4A16Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__}'s text tower has no 4-bit layers to run as W4A8: load a W4A16 "
                         "variant (notebook 03)")
    for name in names:
        try:
            tower.set_submodule(name, W4A8Linear.from_w4a16(tower.get_submodule(name)))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    device = tower.get_submodule(names[0]).compute_device
    return dict(activations="fp8", layers=len(names), device=str(device),
                runs=REFERENCE if device.type == "cpu" else KERNEL)
