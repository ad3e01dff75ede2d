"""The accelerated text tower: fused projections, fused kernels, and a CUDA-graph query path.

``accelerate_model(model)`` rewrites the Qwen3-VL text tower of a ColQwen3 (or a bare
``Qwen3VLTextModel``) in place:

* auto-round / GPTQ QuantLinears become :class:`W4A16Linear` (dispatching on token count);
* q/k/v and gate/up are fused along N (``self_attn.qkv_proj``, ``mlp.gate_up_proj``), for bf16
  ``nn.Linear``, 4-bit and FP8 alike; the separate modules are dropped so no weight is held twice;
* FP8 layers (the tower's and the vision tower's) get the fused FP8 kernels (:mod:`.fp8_dispatch`);
* the tower's forward becomes one loop of fused kernels per layer: add+RMSNorm, qkv GEMM,
  attention (for <= 128 tokens one kernel does q/k RMSNorm, RoPE, masking, softmax and P@V straight
  from the qkv rows; longer sequences use a norm+RoPE kernel and SDPA/flash), o GEMM,
  add+RMSNorm, gate_up GEMM, down GEMM with silu(gate)*up fused into its input (4-bit) or a
  silu-mul kernel (bf16); where a GEMM takes FP8 rows (FP8, W4A8) its producer (add+RMSNorm, silu*mul)
  writes FP8 rows and per-token scales instead (:func:`layer_producers`);
* text-only calls that fit ``graph_max_tokens`` run through CUDA graphs captured per
  (batch bucket, length bucket, FP8 accumulation): inputs are left-padded into static buffers (positions and key
  mask padded so the result equals the unpadded call) and the graph is replayed, so batch-1
  latency is not bound by kernel launches.

Deepstack visual features (pages) and 3-D M-RoPE positions go through the same eager fused loop.
On CPU or without Triton every fused op runs its torch reference (slow but identical logic), after
a logged message naming what is missing.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from colquant.kernels import fp8_dispatch
from colquant.kernels import reference as ref
from colquant.kernels.backend import capture_stream, fast_path_unavailable, warn_once
from colquant.kernels.copies import MIN_TOKENS, prepare_dispatch
from colquant.retriever.fp8 import FP8Linear, ReferenceProducers
from colquant.kernels.linear import (
    _FORCE_REFERENCE,
    W4A16Linear,
    fast,
    linear_forward,
    replace_quant_linears,
    scratch_hint,
)

logger = logging.getLogger("colquant.kernels")

__all__ = ["accelerate_model", "find_text_model", "fuse_text_model", "AccelState", "offload_embeddings",
           "restore_embeddings", "OffloadedEmbedding", "reset_graphs", "LayerProducers", "layer_producers"]


def find_text_model(model: nn.Module) -> nn.Module:
    """The Qwen3-VL(-like) text tower inside ``model`` (or ``model`` itself)."""
    for cand in (model, getattr(model, "language_model", None)):
        if isinstance(cand, nn.Module) and _looks_like_text_model(cand):
            return cand
    for _, mod in model.named_modules():
        if _looks_like_text_model(mod):
            return mod
    raise ValueError(f"no Qwen3-VL text tower (layers + rotary_emb + norm) found in {type(model).__name__}")


def _looks_like_text_model(mod) -> bool:
    return all(hasattr(mod, a) for a in ("layers", "rotary_emb", "norm", "embed_tokens"))


# --------------------------------------------------------------------------------------------
# fusion
# --------------------------------------------------------------------------------------------


def _fuse(mods: list[nn.Module]) -> nn.Module | None:
    if all(isinstance(m, W4A16Linear) for m in mods):
        return W4A16Linear.concat(mods)
    if all(isinstance(m, FP8Linear) for m in mods):
        return FP8Linear.concat(mods)  # exact: one scale per output channel
    if all(type(m) is nn.Linear for m in mods):
        w = torch.cat([m.weight.data for m in mods], dim=0)
        has_bias = any(m.bias is not None for m in mods)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta", dtype=w.dtype)
        fused.weight = nn.Parameter(w, requires_grad=False)
        if has_bias:
            b = torch.cat([m.bias.data if m.bias is not None else w.new_zeros(m.out_features) for m in mods])
            fused.bias = nn.Parameter(b, requires_grad=False)
        return fused
    return None


@torch.no_grad()
def fuse_text_model(text_model: nn.Module) -> dict:
    """Fuse q/k/v and gate/up of every decoder layer (idempotent). Returns counts."""
    fused = {"qkv": 0, "gate_up": 0, "unfused": 0}
    for layer in text_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj"):
            qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            if qkv is None:
                fused["unfused"] += 1
                continue
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
            fused["qkv"] += 1
        if not hasattr(mlp, "gate_up_proj"):
            gu = _fuse([mlp.gate_proj, mlp.up_proj])
            if gu is None:
                fused["unfused"] += 1
                continue
            mlp.gate_up_proj = gu
            del mlp.gate_proj, mlp.up_proj
            fused["gate_up"] += 1
    return fused


# --------------------------------------------------------------------------------------------
# the fused forward
# --------------------------------------------------------------------------------------------


@dataclass
class AccelState:
    graphs: bool = True
    graph_max_tokens: int = 4096
    max_graphs: int = 48
    runner: "QueryGraphs | None" = None
    calls: dict = field(default_factory=lambda: {"graph": 0, "eager": 0})


def _ops(device):
    if fast(device):
        from colquant.kernels import triton_ops as tk

        return tk
    return ref


def _dims(text_model):
    cfg = text_model.config
    hq = cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    return hq, hkv, d


def _positions(position_ids, B, T, device):
    """Same rules as Qwen3VLTextModel.forward -> (3, B, T) positions for the rotary embedding. ColQwen3.forward
    always passes them (text: real tokens numbered from the attention mask; pages: M-RoPE), so this path and
    the query graphs number tokens exactly as transformers' forward does."""
    if position_ids is None:
        p = torch.arange(T, device=device).view(1, 1, -1).expand(3, B, -1)
        return p
    if position_ids.ndim == 2:
        position_ids = position_ids[None].expand(4, position_ids.shape[0], -1)
    if position_ids.ndim == 3 and position_ids.shape[0] == 4:
        position_ids = position_ids[1:]
    return position_ids


# --------------------------------------------------------------------------------------------
# producers: the kernel that makes each GEMM's input, chosen by the GEMM's layer type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerProducers:
    """The kernels that make one decoder layer's GEMM inputs. ``attn_in`` / ``mlp_in`` take
    ``(residual, delta, norm weight, eps)`` and return ``(residual + delta, input)``; ``down_in`` takes
    the gate_up rows. The input is a bf16 tensor, or an ``(e4m3 rows, scales)`` pair where the GEMM takes
    e4m3 rows (an FP8Linear, a W4A8Linear: the quantization fused into its producer instead of a
    separate pass over the activation inside the layer)."""

    attn_in: Callable
    mlp_in: Callable
    down_in: Callable


def _norm_then_quantize(add_rmsnorm_quant: Callable, residual: torch.Tensor, delta: torch.Tensor | None,
                        weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``add_rmsnorm``'s signature and residual, with the normed rows handed on quantized."""
    residual, q, scale = add_rmsnorm_quant(residual, delta, weight, eps)
    return residual, (q, scale)


def norm_producer(consumer: nn.Module, ops) -> Callable:
    """add+RMSNorm feeding ``consumer``: fused with the FP8 quantization for a layer that takes e4m3 rows
    (``takes_fp8_rows``: FP8Linear, W4A8Linear), else ``ops``'s."""
    if getattr(consumer, "takes_fp8_rows", False):
        return partial(_norm_then_quantize, fp8_producers(_device_of(consumer), ops).add_rmsnorm_quant)
    return ops.add_rmsnorm


def act_producer(consumer: nn.Module, ops) -> Callable:
    """silu(gate)*up feeding ``consumer``: fused with the FP8 quantization where it takes e4m3 rows, else ``ops``'s."""
    if getattr(consumer, "takes_fp8_rows", False):
        return fp8_producers(_device_of(consumer), ops).silu_mul_quant
    return ops.silu_mul


def fp8_producers(device: torch.device, ops):
    """The Triton quantizing producers with the Triton tower on an FP8 GPU; their torch twins otherwise
    (the reference tower, or a GPU without FP8 tensor cores)."""
    return fp8_dispatch.producers(device) if ops is not ref else ReferenceProducers


def _device_of(layer: nn.Module) -> torch.device:
    return getattr(layer, "compute_device", None) or layer.weight.device  # W4A8Linear keeps its weights on the host


def layer_producers(text_model, ops) -> list[LayerProducers]:
    """Each decoder layer's producers, from its fused layers' types (bf16, W4A16: ``ops``'s own kernels)."""
    return [LayerProducers(attn_in=norm_producer(layer.self_attn.qkv_proj, ops),
                           mlp_in=norm_producer(layer.mlp.gate_up_proj, ops),
                           down_in=act_producer(layer.mlp.down_proj, ops))
            for layer in text_model.layers]


def fused_core(text_model, inputs_embeds, pos3, key_mask, *, all_valid: bool,
               visual_pos_masks=None, deepstack_visual_embeds=None) -> torch.Tensor:
    """The tower from embeddings to the final norm, with fused ops. ``key_mask [B, T]`` int
    (1 = real token) or None; ``all_valid`` says the mask has no padding (then plain causal)."""
    B, T, H = inputs_embeds.shape
    hq, hkv, d = _dims(text_model)
    dev = inputs_embeds.device
    ops = _ops(dev)
    use_fast = ops is not ref
    cos, sin = text_model.rotary_emb(inputs_embeds, pos3)
    cos = cos.contiguous()
    sin = sin.contiguous()
    short = T <= 128 and use_fast
    if short and key_mask is None:
        key_mask = torch.ones((B, T), dtype=torch.int32, device=dev)
    layers = text_model.layers
    producers = layer_producers(text_model, ops)
    res = inputs_embeds.reshape(B * T, H).contiguous()
    ln0 = layers[0].input_layernorm
    _, x = producers[0].attn_in(res, None, ln0.weight, ln0.variance_epsilon)
    n_deep = len(deepstack_visual_embeds) if deepstack_visual_embeds is not None else 0
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = linear_forward(attn.qkv_proj, x)
        eps_h = attn.q_norm.variance_epsilon
        if short:
            a = ops.short_attention(qkv, cos, sin, attn.q_norm.weight, attn.k_norm.weight, key_mask, eps_h,
                                    B, T, hq, hkv, d)
        else:
            q, k, v = ops.qk_norm_rope(qkv, cos, sin, attn.q_norm.weight, attn.k_norm.weight, eps_h,
                                       B, T, hq, hkv, d)
            a = _sdpa(q, k, v, None if all_valid else key_mask)
        o = linear_forward(attn.o_proj, a)
        ln = layer.post_attention_layernorm
        res, x = producers[i].mlp_in(res, o, ln.weight, ln.variance_epsilon)
        gu = linear_forward(mlp.gate_up_proj, x)
        # silu(gate) * up once, then the down GEMM (fusing it into the 4-bit kernel's prologue
        # recomputes it for every N tile: measured slower on the H100 at every token count)
        dn = linear_forward(mlp.down_proj, producers[i].down_in(gu))
        last = i + 1 == len(layers)
        nxt = text_model.norm if last else layers[i + 1].input_layernorm
        next_in = ops.add_rmsnorm if last else producers[i + 1].attn_in  # the final norm feeds no GEMM
        if i < n_deep:
            res = (res + dn).view(B, T, H)
            res = text_model._deepstack_process(res, visual_pos_masks, deepstack_visual_embeds[i])
            res = res.reshape(B * T, H)
            _, x = next_in(res, None, nxt.weight, nxt.variance_epsilon)
        else:
            res, x = next_in(res, dn, nxt.weight, nxt.variance_epsilon)
    return x.view(B, T, H)


def _sdpa(q, k, v, key_mask):
    B, HQ, T, D = q.shape
    if key_mask is None:
        try:
            o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != HQ)
        except TypeError:  # torch without enable_gqa
            return ref.sdpa(q, k, v, None)
        return o.transpose(1, 2).reshape(B * T, HQ * D)
    return ref.sdpa(q, k, v, key_mask)


def _fast_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, use_cache=None, visual_pos_masks=None, deepstack_visual_embeds=None,
                  **kwargs):
    """Drop-in for Qwen3VLTextModel.forward (no KV cache: an encoder needs none)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if past_key_values is not None or use_cache:
        raise NotImplementedError("the accelerated ColQuant text tower keeps no KV cache; call it with "
                                  "use_cache=False (ColQwen3 does)")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    B, T, _ = inputs_embeds.shape
    if attention_mask is not None and attention_mask.ndim != 2:
        raise NotImplementedError("the accelerated text tower takes a 2-D padding mask")
    pos3 = _positions(position_ids, B, T, inputs_embeds.device)
    state: AccelState = self._colquant_accel
    with torch.no_grad():
        if (state.runner is not None and deepstack_visual_embeds is None and not _FORCE_REFERENCE[0]
                and not torch.cuda.is_current_stream_capturing()):
            out = state.runner.run(inputs_embeds, pos3, attention_mask)
            if out is not None:
                state.calls["graph"] += 1
                return BaseModelOutputWithPast(last_hidden_state=out)
        key_mask = None
        all_valid = True
        if attention_mask is not None:
            all_valid = bool(attention_mask.bool().all())
            key_mask = None if all_valid else attention_mask.to(torch.int32).contiguous()
        state.calls["eager"] += 1
        out = fused_core(self, inputs_embeds, pos3, key_mask, all_valid=all_valid,
                         visual_pos_masks=visual_pos_masks, deepstack_visual_embeds=deepstack_visual_embeds)
    return BaseModelOutputWithPast(last_hidden_state=out)


# --------------------------------------------------------------------------------------------
# CUDA graphs for queries
# --------------------------------------------------------------------------------------------


def _bucket_T(t: int) -> int:
    if t <= 128:
        return -(-t // 4) * 4
    if t <= 512:
        return -(-t // 32) * 32
    return -(-t // 128) * 128


def _bucket_B(b: int) -> int:
    if b <= 8:
        return 1 << (b - 1).bit_length()
    return -(-b // 8) * 8


class _Graph:
    __slots__ = ("graph", "emb", "pos", "mask", "out")


class QueryGraphs:
    """Static-shape replays of the fused tower for text-only inputs (queries)."""

    def __init__(self, text_model, max_tokens: int = 4096, max_graphs: int = 48):
        self.tm = text_model
        # a graph replays the GEMMs it captured: the FP8 layers' accumulation is part of its key
        self.fp8_layers = [m for m in text_model.modules() if isinstance(m, FP8Linear)]
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.graphs: dict = {}
        self.pool = None

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None

    def run(self, emb, pos3, attention_mask):
        if emb.device.type != "cuda":
            return None
        B, T, H = emb.shape
        Bb, Tb = _bucket_B(B), _bucket_T(T)
        if Bb * Tb > self.max_tokens:
            return None
        key = self.key(Bb, Tb)
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            g = self._capture(Bb, Tb, H, emb.dtype, emb.device)
            self.graphs[key] = g
        P = Tb - T
        g.mask.zero_()
        g.pos.zero_()
        g.emb[:B, P:].copy_(emb)
        if attention_mask is None:
            g.mask[:B, P:].fill_(1)
        else:
            g.mask[:B, P:].copy_(attention_mask)
        g.pos[:, :B, P:].copy_(pos3)
        g.graph.replay()
        return g.out[:B, P:].clone()

    def key(self, batch_bucket: int, length_bucket: int) -> tuple:
        """What a captured graph depends on besides the weights: its shape buckets and how its FP8
        GEMMs accumulate (`fp8.set_accumulation` may change it after capture)."""
        return (batch_bucket, length_bucket, *(layer.accumulation for layer in self.fp8_layers))

    def _capture(self, Bb, Tb, H, dtype, device) -> _Graph:
        g = _Graph()
        # Ordinary tensors even when the first call of this shape runs under torch.inference_mode:
        # every later call writes the inputs in place, and an inference tensor refuses that outside
        # inference mode.
        with torch.inference_mode(False):
            g.emb = torch.zeros((Bb, Tb, H), dtype=dtype, device=device)
            g.pos = torch.zeros((3, Bb, Tb), dtype=torch.long, device=device)
            g.mask = torch.zeros((Bb, Tb), dtype=torch.int32, device=device)
            g.mask[:, -1] = 1

        def body():
            return fused_core(self.tm, g.emb, g.pos, g.mask, all_valid=False)

        s = capture_stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(2):
                body()
        torch.cuda.current_stream(device).wait_stream(s)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self.pool), torch.no_grad():
            g.out = body()
        logger.debug("captured query graph batch=%d tokens=%d", Bb, Tb)
        return g


# --------------------------------------------------------------------------------------------
# token embeddings in host memory (optional)
# --------------------------------------------------------------------------------------------


class OffloadedEmbedding(nn.Module):
    """The token-embedding table kept in pinned host memory: rows are gathered on the CPU and copied
    to the GPU (B x T x hidden bytes per call). Frees vocab x hidden x 2 bytes of GPU memory
    (742 MiB for the 4B) at the cost of a host round trip before each forward."""

    def __init__(self, emb: nn.Embedding, device):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.weight.shape
        self.padding_idx = emb.padding_idx
        w = emb.weight.detach().to("cpu")
        self.weight_cpu = w.pin_memory() if torch.cuda.is_available() else w
        self.device = torch.device(device)

    @property
    def weight(self):
        return self.weight_cpu

    def forward(self, input_ids):
        rows = self.weight_cpu.index_select(0, input_ids.reshape(-1).to("cpu"))
        return rows.view(*input_ids.shape, self.embedding_dim).to(self.device, non_blocking=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on host"


def offload_embeddings(model: nn.Module) -> int:
    """Move the text tower's token embeddings to pinned host memory; returns bytes freed on the GPU.
    (Models whose output head is tied to the embeddings keep that GPU copy alive: ColQwen3 has none.)"""
    tm = find_text_model(model)
    emb = tm.embed_tokens
    if isinstance(emb, OffloadedEmbedding):
        return 0
    device = emb.weight.device
    tm.embed_tokens = OffloadedEmbedding(emb, device)
    freed = emb.weight.numel() * emb.weight.element_size()
    del emb
    return freed


def restore_embeddings(model: nn.Module) -> None:
    """Undo :func:`offload_embeddings`."""
    tm = find_text_model(model)
    emb = tm.embed_tokens
    if not isinstance(emb, OffloadedEmbedding):
        return
    new = nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta",
                       dtype=emb.weight_cpu.dtype)
    new.weight = nn.Parameter(emb.weight_cpu.to(emb.device), requires_grad=False)
    tm.embed_tokens = new


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def accelerate_model(model: nn.Module, *, graphs: bool = True, graph_max_tokens: int = 4096,
                     max_graphs: int = 48, offload_embeddings_to_host: bool = False,
                     bf16_copy: bool | None = None, min_tokens: int = MIN_TOKENS) -> nn.Module:
    """Swap the text tower's linears for fused ones (4-bit or bf16) and install the fused forward
    with its CUDA-graph query path. Returns ``model`` (modified in place).

    On a CUDA GPU the 4-bit layers dispatch through the kernel table tuned for this GPU (tuned on
    first use, then read from the disk cache: :mod:`.autotune`). ``bf16_copy``: where BF16 beats
    every 4-bit kernel, keep a BF16 copy of those layers if memory allows (None), never (False:
    memory first) or always (True); see :func:`.copies.keep_copies`. ``min_tokens``: the fewest tokens
    one forward carries; copies that would serve only fewer are not kept (tinygemm wins only there).

    ``offload_embeddings_to_host``: keep the token-embedding table in pinned host memory (saves
    742 MiB on the 4B; see :class:`OffloadedEmbedding`)."""
    n_q = replace_quant_linears(model)
    fp8_dispatch.attach(model)
    if offload_embeddings_to_host:
        offload_embeddings(model)
    tm = find_text_model(model)
    counts = fuse_text_model(tm)
    if counts["unfused"]:
        warn_once("mixed", f"colquant.kernels: {counts['unfused']} projections mix 4-bit and 16-bit parts or hold "
                           "layers of other widths (2/3/8-bit, which run dequantized) and were left as they were; "
                           "the tower keeps transformers' forward")
        return model
    device = next(tm.parameters()).device
    reason = fast_path_unavailable(device)
    if reason is not None:
        warn_once("accel:" + reason,
                  f"colquant.kernels: accelerate_model runs the fused tower with reference ops (no Triton "
                  f"kernels, no CUDA graphs) because {reason}.",
                  level=logging.INFO if device.type == "cpu" else logging.WARNING)
    sizes = [m.in_features * m.out_features for m in tm.modules() if isinstance(m, W4A16Linear)]
    tuning = None
    if sizes:
        scratch_hint(max(sizes), device)
        if reason is None:
            tuning = prepare_dispatch(tm, device, bf16_copy=bf16_copy, min_tokens=min_tokens)
    state = AccelState(graphs=graphs and reason is None, graph_max_tokens=graph_max_tokens,
                       max_graphs=max_graphs)
    if state.graphs:
        state.runner = QueryGraphs(tm, graph_max_tokens, max_graphs)
    tm._colquant_accel = state
    tm.forward = types.MethodType(_fast_forward, tm)
    info = dict(quant_linears_converted=n_q, **counts, backend="triton" if reason is None else "reference",
                reason=reason, graphs=state.graphs, tuning=tuning, vision=_accelerate_vision_tower(model))
    model._colquant_acceleration = info
    logger.info("colquant.kernels: accelerated text tower: %s", info)
    return model


def _accelerate_vision_tower(model: nn.Module) -> dict | None:
    """Pages spend most of their time in the vision tower: install its fast path too (it says why
    not on CPU or without the kernels); a bare text tower has none."""
    from colquant.kernels.fast_vision import accelerate_vision, has_vision_tower

    return accelerate_vision(model) if has_vision_tower(model) else None


def reset_graphs(model: nn.Module) -> None:
    """Free the captured query graphs (between benchmark settings, or when the layers they replay
    are replaced); a model without an accelerated text tower has none."""
    for module in model.modules():
        state = getattr(module, "_colquant_accel", None)
        if state is not None and state.runner is not None:
            state.runner.reset()
