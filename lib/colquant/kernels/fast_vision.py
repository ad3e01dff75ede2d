"""The fast vision tower: Qwen3-VL's ViT as a few large kernels per block, for page encoding.

A 1,280-token page is 5,120 patches through 24 ViT blocks. transformers' eager tower spends most of
its time outside the matrix products: rotary embeddings in float32 over seven elementwise kernels,
per-image attention calls, the position-embedding resampling recomputed on every call. This module
runs the same function with:

* the patch embedding (a Conv3d whose kernel equals its stride) as one GEMM;
* position embeddings and rotary cos/sin computed once per image grid and cached (a corpus has few
  distinct page sizes);
* per block: the residual add fused into the LayerNorm after it (one Triton kernel writes the sum and
  its LayerNorm: :mod:`.vision_ops`), the (already fused) qkv GEMM with its bias, one Triton kernel for the 2-D
  rotary embedding of q and k (float32 math, as transformers does), attention over the images of
  the batch (a declared backend, :mod:`.vision_attention`: equal-size images as one batched SDPA call,
  whose backend torch picks, cuDNN on the H200; torch's varlen flash attention; or, for an FP8 tower
  on Hopper, FlashAttention-3's FP8 forward fed by a rope+quantization producer), the output GEMM, and
  the MLP's first GEMM with bias and tanh-GELU fused into cuBLASLt's epilogue (`torch._addmm_activation`);
* the patch merger and the deepstack mergers as in transformers.

With FP8 vision Linears (the fp8-all variant) the GEMMs are W8A8 `FP8Linear` calls whose inputs come
quantized from their producers: residual add+LayerNorm+quantization before qkv and fc1
(:mod:`.vision_ops`), tanh-GELU+quantization before fc2 (:mod:`.fp8_ops`); the attention output is
quantized inside `proj`. Where vLLM's FlashAttention-3 loads on a Hopper GPU the attention runs in FP8
too (``fa3-fp8``); elsewhere SDPA, with the reason logged once.

`accelerate_vision(model)` installs it on CUDA (the tower is BF16 in the 4-bit variants, so BF16
and 4-bit models share it; FP8 in fp8-all). On CPU, or without Triton, nothing is installed and the eager
tower runs, with a logged reason. `fast_vision_forward` itself also runs on CPU with torch
reference ops, which is how the tests check the math against transformers without a GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from colquant.kernels import fp8_dispatch
from colquant.kernels import vision_attention
from colquant.kernels.backend import gpu_unavailable, triton_import_error
from colquant.kernels.vision_attention import ATTENTION_CHOICES, SDPA_BACKENDS, attention
from colquant.retriever.fp8 import FP8Linear, ReferenceProducers, quantize_rows_reference

logger = logging.getLogger("colquant.kernels")

Attention = Literal["fa3-fp8", "sdpa", "varlen"]
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


@dataclass
class VisionSettings:
    """How the fast tower runs. `attention`: a row of `vision_attention.ATTENTION_BACKENDS` (`fa3-fp8`,
    `sdpa`, `varlen`), or None: the tower's default where it can run (`vision_attention.choose_attention`),
    chosen at install or first call and recorded here with the rows passed over and why
    (`attention_passed_over`); `sdpa_backends`: SDPA backends to allow, in priority order (None:
    torch's own choice)."""

    attention: Attention | None = None
    attention_passed_over: dict[str, str] = field(default_factory=dict)
    sdpa_backends: tuple[str, ...] | None = None
    max_cached_grids: int = 64
    grids: dict[tuple[tuple[int, int, int], ...], "GridPlan"] = field(default_factory=dict)
    calls: int = 0

    def __post_init__(self) -> None:
        """Refuse unknown names now (a bench flag's typo), not at the first page batch."""
        if self.attention is not None and self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"unknown vision attention {self.attention!r}; use one of {', '.join(ATTENTION_CHOICES)}")
        unknown = [name for name in self.sdpa_backends or () if name not in SDPA_BACKENDS]
        if unknown:
            raise ValueError(f"unknown SDPA backend(s) {unknown}; use {', '.join(SDPA_BACKENDS)}")


@dataclass
class GridPlan:
    """Everything about a batch that depends only on its image grids, computed once per grid tuple."""

    pos_embeds: torch.Tensor  # (patches, hidden), model dtype
    cos: torch.Tensor  # (patches, head_dim) float32
    sin: torch.Tensor
    segments: list[tuple[int, int, int]]  # (first patch, frames, patches per frame): equal frames grouped
    cu_seqlens: torch.Tensor  # (frames + 1,) int32, for varlen attention
    max_seqlen: int


# --------------------------------------------------------------------------------------------
# availability and installation
# --------------------------------------------------------------------------------------------


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the fast tower can run on `device`; else why not (CPU, no CUDA, no Triton, pre-Ampere)."""
    return gpu_unavailable(device, "the fast vision tower", triton_import_error)


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The Qwen3-VL vision tower inside `model` (or `model` itself)."""
    tower = _vision_tower(model)
    if tower is None:
        raise ValueError(f"no Qwen3-VL vision tower (patch_embed, blocks, merger) found in {type(model).__name__}")
    return tower


def has_vision_tower(model: nn.Module) -> bool:
    """Whether `model` holds a Qwen3-VL vision tower (a bare text tower does not)."""
    return _vision_tower(model) is not None


def _vision_tower(model: nn.Module) -> nn.Module | None:
    names = ("patch_embed", "blocks", "merger", "rotary_pos_emb")
    return next((m for m in (model, *model.modules()) if all(hasattr(m, name) for name in names)), None)


def accelerate_vision(model: nn.Module, settings: VisionSettings | None = None) -> dict[str, Any]:
    """Install the fast vision tower on CUDA (idempotent); returns what was done and why.

    The tower's class becomes a subclass whose `forward` is :func:`fast_vision_forward`, so
    parameter names, `state_dict`, `dtype` and `isinstance` checks are unchanged;
    :func:`restore_vision` puts transformers' forward back."""
    visual = find_vision_tower(model)
    device = next(visual.parameters()).device
    reason = unavailable_reason(device) or _unsupported_linears(visual)
    if reason is not None:
        logger.info("colquant.kernels: the vision tower keeps transformers' eager forward because %s", reason)
        return dict(installed=False, reason=reason)
    _output_class()  # fail now, naming the transformers version, rather than at the first page
    chosen = settings or getattr(visual, "_colquant_vision", None) or VisionSettings()
    _resolve_attention(chosen, visual, device)
    visual._colquant_vision = chosen
    if not getattr(type(visual), "_colquant_fast", False):
        visual.__class__ = _fast_class(type(visual))
    info = dict(installed=True, reason=None, attention=chosen.attention,
                attention_passed_over=chosen.attention_passed_over, sdpa_backends=chosen.sdpa_backends)
    logger.info("colquant.kernels: fast vision tower: %s", info)
    return info


def _resolve_attention(settings: VisionSettings, visual: nn.Module, device: torch.device) -> None:
    """Fill in `settings.attention` where None (the tower's default here, noting what was passed over);
    an attention asked for by name that cannot run here is refused with the reason."""
    if settings.attention is None:
        settings.attention, settings.attention_passed_over = vision_attention.choose_attention(visual, device)
    else:
        vision_attention.check_attention(settings.attention, visual, device)


def _unsupported_linears(visual: nn.Module) -> str | None:
    """The fast tower multiplies by 16-bit Linears' weights directly and calls FP8Linear layers
    (fp8-all); any other quantized layer (read as numbers, it would be wrong) keeps transformers'
    forward, which calls the layers."""
    other = sorted({type(m).__name__ for m in visual.modules()
                    if hasattr(m, "in_features") and type(m) not in (nn.Linear, FP8Linear)})
    return (f"its Linears are quantized ({', '.join(other)}) and the fast tower takes 16-bit or FP8 layers only"
            if other else None)


def restore_vision(model: nn.Module) -> None:
    """Undo :func:`accelerate_vision`: transformers' eager forward again (A/B timing, checks)."""
    visual = find_vision_tower(model)
    if getattr(type(visual), "_colquant_fast", False):
        visual.__class__ = type(visual).__mro__[1]


def _fast_class(base: type) -> type:
    return type(f"Fast{base.__name__}", (base,), {"forward": _fast_forward, "_colquant_fast": True})


def _fast_forward(self: nn.Module, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
    """Drop-in for Qwen3VLVisionModel.forward (inference: no attention maps, no hidden states)."""
    wanted = [name for name, value in kwargs.items() if value and name != "return_dict"]
    if wanted:
        raise NotImplementedError(f"the fast vision tower returns no {', '.join(wanted)}; call "
                                  "colquant.kernels.fast_vision.restore_vision(model) to get them")
    settings: VisionSettings = self._colquant_vision
    settings.calls += 1
    with torch.no_grad():
        return fast_vision_forward(self, hidden_states, grid_thw, settings)


def _output_class() -> type:
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    output = getattr(modeling_qwen3_vl, "BaseModelOutputWithDeepstackFeatures", None)
    if output is None:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__}'s Qwen3-VL vision tower has no "
                           "BaseModelOutputWithDeepstackFeatures output; the fast vision tower needs transformers>=5.0")
    return output


# --------------------------------------------------------------------------------------------
# the forward
# --------------------------------------------------------------------------------------------


def fast_vision_forward(visual: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
                        settings: VisionSettings | None = None) -> Any:
    """The vision tower's output (last hidden state, merged tokens, deepstack features) computed
    with fused ops: Triton/cuBLASLt on CUDA, their torch equivalents elsewhere."""
    settings = settings or VisionSettings()
    if settings.attention is None:
        _resolve_attention(settings, visual, pixels.device)
    plan = grid_plan(visual, grid_thw, settings)
    # the residual stream travels as (x, delta) with x + delta the hidden state: each block's first
    # LayerNorm adds the pending delta (the position embeddings, then the previous block's MLP output)
    x, delta = patch_embed(visual.patch_embed, pixels), plan.pos_embeds
    deepstack_at = list(getattr(visual, "deepstack_visual_indexes", []))
    deepstack = []
    tanh_gelu = getattr(visual.config, "hidden_act", None) in _TANH_GELU
    for index, block in enumerate(visual.blocks):
        x, delta = block_forward(block, x, delta, plan, settings, tanh_gelu)
        if index in deepstack_at:
            deepstack.append(visual.deepstack_merger_list[deepstack_at.index(index)](x + delta))
    x = x + delta
    return _output_class()(last_hidden_state=x, pooler_output=visual.merger(x), deepstack_features=deepstack)


def patch_embed(module: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Conv3d with kernel == stride over flattened patches is a GEMM: (patches, C*T*P*P) @ W^T."""
    weight = module.proj.weight
    flat = pixels.to(weight.dtype).reshape(-1, weight[0].numel())
    return F.linear(flat, weight.reshape(weight.shape[0], -1), module.proj.bias)


def block_forward(block: nn.Module, x: torch.Tensor, delta: torch.Tensor, plan: GridPlan, settings: VisionSettings,
                  tanh_gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One ViT block on the hidden state ``x + delta``: h = x + delta + proj(attn(rope(qkv(LN(x + delta))))),
    then h + fc2(gelu(fc1(LN(h)))). Each residual add runs inside the LayerNorm after it
    (:func:`add_layernorm_into`), so the block returns ``(h, fc2 output)`` and leaves their sum to the
    next block's first LayerNorm (or the caller)."""
    attn, mlp = block.attn, block.mlp
    heads = attn.num_heads
    x, normed = add_layernorm_into(attn.qkv, block.norm1, x, delta)
    a = self_attention(linear(attn.qkv, normed), plan, settings, heads)
    x, normed = add_layernorm_into(mlp.linear_fc1, block.norm2, x, linear(attn.proj, a))
    h = fc1_activation(mlp, normed, tanh_gelu)
    return x, linear(mlp.linear_fc2, h)


def linear(layer: nn.Module, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``layer(x)``: a 16-bit Linear as one GEMM with its bias (cuBLASLt epilogue); an FP8Linear
    (fp8-all) through its own forward, which takes bf16 rows or a producer's (e4m3, scales) pair."""
    if isinstance(layer, FP8Linear):
        return layer(x)
    return torch.addmm(layer.bias, x, layer.weight.t())


def add_layernorm_into(consumer: nn.Module, norm: nn.LayerNorm, x: torch.Tensor, delta: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """``(x + delta, LayerNorm(x + delta))``, the LayerNorm as ``consumer``'s input: 16-bit, or quantized
    for an FP8Linear. One Triton kernel on CUDA (:mod:`.vision_ops`; the quantizing one where the FP8
    kernels run), its torch twin elsewhere."""
    args = (x, delta, norm.weight, norm.bias, norm.eps)
    if isinstance(consumer, FP8Linear):
        kernels = fp8_dispatch.producers(x.device) is not ReferenceProducers
        residual, q, scale = (_vision_ops().add_layernorm_quant if kernels else add_layernorm_quant_reference)(*args)
        return residual, (q, scale)
    return (_vision_ops().add_layernorm if x.is_cuda else add_layernorm_reference)(*args)


def add_layernorm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`vision_ops.add_layernorm`'s twin: transformers' residual add, then nn.LayerNorm of the sum."""
    residual = x + delta
    return residual, F.layer_norm(residual, weight.shape, weight, bias, eps)


def add_layernorm_quant_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, eps: float
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`vision_ops.add_layernorm_quant`'s twin: :func:`add_layernorm_reference` with the normed rows
    quantized per row."""
    residual, normed = add_layernorm_reference(x, delta, weight, bias, eps)
    return (residual, *quantize_rows_reference(normed))


@functools.cache
def _vision_ops() -> Any:
    """The Triton kernel module, imported on first CUDA use (importing this module must not need Triton)."""
    from colquant.kernels import vision_ops

    return vision_ops


def fc1_activation(mlp: nn.Module, h: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                   tanh_gelu: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """act(fc1(h)) as fc2's input. BF16 fc1 on CUDA with tanh-GELU (Qwen3-VL's `gelu_pytorch_tanh`):
    one cuBLASLt GEMM with bias and GELU epilogue (the tanh approximation; the CUDA test checks it).
    FP8 fc2 with tanh-GELU: the GELU fused with fc2's quantization. Otherwise the module's own
    activation after the GEMM (on CPU `_addmm_activation` applies the erf GELU instead)."""
    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    if isinstance(fc2, FP8Linear) and tanh_gelu:
        return fp8_dispatch.producers(fc1.weight.device).gelu_tanh_quant(linear(fc1, h))
    if tanh_gelu and type(fc1) is nn.Linear and h.is_cuda:
        return torch._addmm_activation(fc1.bias, h, fc1.weight.t(), use_gelu=True)
    return mlp.act_fn(linear(fc1, h))


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k, (patches, heads, head_dim), rotated (2-D RoPE, float32 math) from the packed qkv rows."""
    if qkv.is_cuda:
        return rope_qk_triton(qkv, cos, sin, heads)
    return rope_qk_reference(qkv, cos, sin, heads)


def rope_qk_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb_vision`: x*cos + rotate_half(x)*sin in float32."""
    n = qkv.shape[0]
    parts = qkv.view(n, 3, heads, -1)
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()
    out = []
    for x in (parts[:, 0], parts[:, 1]):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        out.append((xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(qkv.dtype))
    return out[0], out[1]


def self_attention(qkv: torch.Tensor, plan: GridPlan, settings: VisionSettings, heads: int) -> torch.Tensor:
    """A block's attention from its packed qkv rows, (patches, heads * head_dim): rotary, then the
    settings' backend (:mod:`.vision_attention`); for ``fa3-fp8`` the rotary writes e4m3 q, k, v."""
    if settings.attention == "fa3-fp8":
        return vision_attention.attention_fp8(*quantized_rotary(qkv, plan, heads), plan)
    q, k = rotary(qkv, plan.cos, plan.sin, heads)
    return attention(q, k, qkv.view(qkv.shape[0], 3, heads, -1)[:, 2], plan, settings)


def quantized_rotary(qkv: torch.Tensor, plan: GridPlan, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 (patches, 3, heads, head_dim) of rotated q, k and v, fp32 descales (frames, 3, heads)):
    two Triton passes on CUDA (:func:`.vision_ops.rope_quant_qkv`), the torch twins elsewhere."""
    if qkv.is_cuda:
        return _vision_ops().rope_quant_qkv(qkv, plan.cos, plan.sin, heads, plan.cu_seqlens, plan.max_seqlen)
    q, k = rope_qk_reference(qkv, plan.cos, plan.sin, heads)
    return vision_attention.quantize_qkv_reference(q, k, qkv.view(qkv.shape[0], 3, heads, -1)[:, 2], plan.cu_seqlens)


def rope_qk_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_qk_reference` as one Triton kernel: each program reads one patch's q and k rows
    and its cos/sin row once and writes rotated q and k (float32 math, model-dtype stores)."""
    n, width = qkv.shape
    dim = width // (3 * heads)
    if not qkv.is_contiguous() or dim % 2 or cos.shape != (n, dim):
        raise ValueError(f"rope_qk_triton needs contiguous qkv (patches, 3*heads*head_dim) and cos/sin "
                         f"(patches, head_dim); got qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}")
    q = torch.empty((n, heads, dim), device=qkv.device, dtype=qkv.dtype)
    k = torch.empty_like(q)
    _rope_kernel()[(n,)](qkv, cos, sin, q, k, heads, dim // 2, _pow2(heads), _pow2(dim // 2))
    return q, k


_ROPE_KERNEL: list = []


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _rope_kernel():  # compiled on first use: importing this module must not need Triton
    if not _ROPE_KERNEL:
        _ROPE_KERNEL.append(_define_rope_kernel())
    return _ROPE_KERNEL[0]


def _define_rope_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotate(src, dst, c1, c2, s1, s2, mask, HALF):
        x1 = tl.load(src, mask=mask).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
        tl.store(dst, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def rope_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, H, HALF, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.arange(0, BLOCK_H)[:, None]
        col = tl.arange(0, BLOCK_D)[None, :]
        mask = (head < H) & (col < HALF)
        dim = 2 * HALF
        c1 = tl.load(cos_ptr + row * dim + col, mask=col < HALF)
        c2 = tl.load(cos_ptr + row * dim + HALF + col, mask=col < HALF)
        s1 = tl.load(sin_ptr + row * dim + col, mask=col < HALF)
        s2 = tl.load(sin_ptr + row * dim + HALF + col, mask=col < HALF)
        src = qkv_ptr + row * 3 * H * dim + head * dim + col
        dst = row * H * dim + head * dim + col
        rotate(src, q_ptr + dst, c1, c2, s1, s2, mask, HALF)
        rotate(src + H * dim, k_ptr + dst, c1, c2, s1, s2, mask, HALF)

    return rope_kernel


# --------------------------------------------------------------------------------------------
# per-grid plan: position embeddings, rotary tables, attention segments
# --------------------------------------------------------------------------------------------


def grid_plan(visual: nn.Module, grid_thw: torch.Tensor, settings: VisionSettings) -> GridPlan:
    """The cached plan for these image grids (one host read of `grid_thw` per call)."""
    key = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
    plan = settings.grids.get(key)
    if plan is None:
        if len(settings.grids) >= settings.max_cached_grids:
            settings.grids.pop(next(iter(settings.grids)))
        plan = settings.grids[key] = _build_plan(visual, key)
    return plan


def _build_plan(visual: nn.Module, grids: tuple[tuple[int, int, int], ...]) -> GridPlan:
    device = visual.pos_embed.weight.device
    per_image = [_image_tables(visual, grid) for grid in grids]
    pos = torch.cat([p for p, _ in per_image])
    angles = torch.cat([a for _, a in per_image])
    emb = torch.cat((angles, angles), dim=-1)
    segments: list[tuple[int, int, int]] = []
    start = 0
    for t, h, w in grids:
        if segments and segments[-1][2] == h * w:
            first, frames, length = segments[-1]
            segments[-1] = (first, frames + t, length)
        else:
            segments.append((start, t, h * w))
        start += t * h * w
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    return GridPlan(pos_embeds=pos, cos=emb.cos().contiguous(), sin=emb.sin().contiguous(),
                    segments=segments, cu_seqlens=cu, max_seqlen=max(lengths))


def _image_tables(visual: nn.Module, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(position embeddings, rotary angles) of one image, in the tower's merge-block patch order.

    Position embeddings: the learned square table resampled to (h, w) bilinearly with aligned
    corners (what transformers' interpolation indices reproduce); rotary angles: row and column
    times the inverse frequencies, concatenated."""
    t, h, w = grid
    merge = visual.spatial_merge_size
    weight = visual.pos_embed.weight
    side = int(weight.shape[0] ** 0.5)
    table = weight.float().t().reshape(1, -1, side, side)
    mode = getattr(visual, "interpolation_mode", "bilinear")
    corners = getattr(visual, "interpolation_align_corners", True)
    grid_emb = F.interpolate(table, size=(h, w), mode=mode, align_corners=corners)[0].permute(1, 2, 0)
    rows = torch.arange(h, device=weight.device).view(-1, 1).expand(h, w)
    cols = torch.arange(w, device=weight.device).view(1, -1).expand(h, w)
    order = [_merge_order(a, merge) for a in (grid_emb, rows, cols)]
    pos = order[0].reshape(-1, weight.shape[1]).to(weight.dtype).repeat(t, 1)
    inv_freq = visual.rotary_pos_emb.inv_freq.float().to(weight.device)
    angles = torch.cat((order[1].reshape(-1, 1) * inv_freq, order[2].reshape(-1, 1) * inv_freq), dim=-1)
    return pos, angles.repeat(t, 1)


def _merge_order(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w, ...) -> (h/m, w/m, m, m, ...): patches ordered merge block by merge block."""
    h, w = grid.shape[:2]
    rest = grid.shape[2:]
    return grid.reshape(h // merge, merge, w // merge, merge, *rest).transpose(1, 2)
