"""FlashAttention-3's FP8 forward from vLLM 0.26.0's build: the vision tower's attention in e4m3 on Hopper.

Why: a 16-page batch spends ~93 ms of the fp8-all tower's ~350 in its 24 vision attentions (cuDNN, BF16,
benchmarks/results/attention-backends-h200.log); the GEMMs around them already run on FP8 tensor cores.
FlashAttention-3 has an FP8 (e4m3) forward for Hopper: variable-length batches, non-causal, head dims
64-256, one fp32 *descale* per (sequence, key/value head) for each of q, k and v (the kernel multiplies the
scores by ``q_descale * k_descale`` and the output by ``v_descale``), output in bf16. vLLM ships it compiled
for torch 2.11 and CUDA 13 as ``vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so``; ``torch.ops.load_library``
registers its ops under ``torch.ops._vllm_fa3_C``.

Only that library is used, through a hand-written wrapper (:func:`varlen_attention_fp8`): vLLM's own
``vllm/vllm_flash_attn/flash_attn_interface.py`` imports its FA2 build beside it and calls into
``vllm.platforms``, i.e. imports vLLM's engine. The wrapper passes the 37 arguments of vLLM 0.26.0's
``_vllm_fa3_C.fwd`` schema (read off that release's interface module, FA3 branch of
``flash_attn_varlen_func``) and checks what the kernel would otherwise refuse deep inside.

Found at ``$COLQUANT_VLLM_FA3_LIB`` (an explicit path: the GPU image, which cannot install vLLM; see
benchmarks/stage_vllm_lib.sh) or in the installed ``vllm`` package (``pip install 'colquant[vllm-kernels]'``);
anything else is refused with a message naming what is needed (:func:`load_error`, :func:`unavailable_reason`).
:func:`varlen_attention_fp8_reference` is its torch twin (dequantize, attend in fp32), what CPU runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from colquant.kernels.backend import gpu_unavailable
from colquant.kernels.vllm_library import VllmLibrary

__all__ = ["LIBRARY", "LIB_ENV", "DISABLE_ENV", "HEAD_DIMS", "load_error", "clear_cache", "unavailable_reason",
           "head_dim_unsupported_reason", "varlen_attention_fp8", "varlen_attention_bf16",
           "varlen_attention_fp8_reference"]

LIBRARY = VllmLibrary(relpath="vllm_flash_attn/_vllm_fa3_C.abi3.so", env="COLQUANT_VLLM_FA3_LIB",
                      disable_env="COLQUANT_DISABLE_VLLM_FA3", what="FlashAttention-3 library",
                      namespace="_vllm_fa3_C", ops=("fwd",))
LIB_ENV, DISABLE_ENV = LIBRARY.env, LIBRARY.disable_env
HEAD_DIMS = (64, 96, 128, 192, 256)  # the e4m3 forward's compiled head dims (run_mha_fwd_<90, e4m3, D, D> in the library)
NEEDED_FOR = "FlashAttention-3 is built for Hopper (sm90)"
E4M3 = torch.float8_e4m3fn  # the only FP8 type of its forward


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None once vLLM 0.26.0's FA3 library is loaded into torch (loaded here, once); else a one-line
    reason naming what is needed (:meth:`VllmLibrary.load_error`)."""
    return LIBRARY.load_error()


def clear_cache() -> None:
    """Forget the cached decisions (tests, env changes); a loaded library stays loaded."""
    load_error.cache_clear()
    _reason_on.cache_clear()


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when FA3's FP8 forward can run on ``device``; else why not: the library first (what to
    install), then no CUDA device, then a GPU that is not Hopper (the build has sm90 kernels only)."""
    reason = load_error() or gpu_unavailable(device, "FlashAttention-3", load_error, min_capability=(0, 0))
    if reason is None and torch.cuda.get_device_capability(device)[0] != 9:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; {NEEDED_FOR}"
    return reason


@functools.lru_cache(maxsize=None)
def _reason_on(device: str) -> str | None:
    """:func:`unavailable_reason`, once per device: the vision tower calls FA3 in every block."""
    return unavailable_reason(device)


def head_dim_unsupported_reason(head_dim: int) -> str | None:
    """None when the e4m3 forward has kernels for ``head_dim``; else why not."""
    if head_dim in HEAD_DIMS:
        return None
    return f"FlashAttention-3's FP8 forward has head dims {', '.join(map(str, HEAD_DIMS))}; this one is {head_dim}"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, dtype: torch.dtype,
           descales: tuple[torch.Tensor, ...]) -> None:
    """Refuse, naming the problem, what the kernel would refuse (or misread) deep inside."""
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape or {t.dtype for t in (q, k, v)} != {dtype}:
        raise ValueError(f"varlen attention takes q, k, v of one (tokens, heads, head_dim) shape in {dtype}; got "
                         f"{[(tuple(t.shape), t.dtype) for t in (q, k, v)]}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v need a contiguous last dimension (FlashAttention-3 reads head_dim as rows)")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or not cu_seqlens.is_contiguous():
        raise ValueError(f"cu_seqlens must be a contiguous 1-D int32 tensor (sequences + 1), got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    want = (cu_seqlens.numel() - 1, q.shape[1])
    for name, descale in zip(("q_descale", "k_descale", "v_descale"), descales):
        if descale.dtype != torch.float32 or tuple(descale.shape) != want:
            raise ValueError(f"{name} must be float32 of shape (sequences, heads) = {want}, got {descale.dtype} "
                             f"{tuple(descale.shape)}")


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
         softmax_scale: float, q_descale: torch.Tensor | None, k_descale: torch.Tensor | None,
         v_descale: torch.Tensor | None) -> torch.Tensor:
    """``torch.ops._vllm_fa3_C.fwd`` as vLLM 0.26.0's ``flash_attn_varlen_func`` calls it for FA3, with
    queries and keys sharing ``cu_seqlens``, bidirectional, no window, no paging, no rotary."""
    reason = _reason_on(str(q.device))
    if reason:
        raise RuntimeError(f"FlashAttention-3 cannot run here: {reason}")
    out, _lse, *_ = torch.ops._vllm_fa3_C.fwd(
        q, k, v, None, None, None, None,  # k_new, v_new, q_v, out
        cu_seqlens, cu_seqlens, None, None, None,  # cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k
        max_seqlen, max_seqlen, None, None, None,  # max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k
        None, None, None,  # rotary_cos, rotary_sin, seqlens_rotary
        q_descale, k_descale, v_descale, softmax_scale,
        False, -1, -1, 0.0, True,  # causal, window left/right, softcap, rotary_interleaved
        None, 0, None, 0,  # scheduler_metadata, num_splits (0: the library's heuristic), pack_gqa, sm_margin
        None, 1, 0, None)  # s_aux, cp_world_size, cp_rank, cp_tot_seqused_k
    return out


def varlen_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, q_descale: torch.Tensor, k_descale: torch.Tensor, v_descale: torch.Tensor,
                         softmax_scale: float) -> torch.Tensor:
    """Bidirectional attention within each sequence of a packed batch, on FP8 tensor cores.

    ``q``, ``k``, ``v``: e4m3 (tokens, heads, head_dim) with a contiguous last dimension (views of one
    buffer are fine); their values are ``e4m3 * descale[sequence, head]``. ``cu_seqlens``: int32
    (sequences + 1,) token offsets; ``max_seqlen``: the longest sequence (a host int). Descales: fp32
    (sequences, heads), any strides. Returns bf16 (tokens, heads, head_dim)."""
    _check(q, k, v, cu_seqlens, E4M3, (q_descale, k_descale, v_descale))
    why = head_dim_unsupported_reason(q.shape[-1])
    if why:
        raise ValueError(why)
    return _fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, q_descale, k_descale, v_descale)


def varlen_attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, softmax_scale: float) -> torch.Tensor:
    """The same kernel family on bf16 inputs: the control that tells FA3's own speed from FP8's
    (benchmarks/fa3_attention_bench.py)."""
    _check(q, k, v, cu_seqlens, torch.bfloat16, ())
    return _fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, None, None, None)


def varlen_attention_fp8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                   max_seqlen: int, q_descale: torch.Tensor, k_descale: torch.Tensor,
                                   v_descale: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """:func:`varlen_attention_fp8`'s twin: each sequence's q, k, v dequantized per head and attended
    in fp32, then rounded to bf16. (FA3 also rounds the probabilities to e4m3 before multiplying by v;
    the twin keeps them in fp32, so it is the FP8 inputs' exact attention, not the kernel's.)"""
    _check(q, k, v, cu_seqlens, E4M3, (q_descale, k_descale, v_descale))
    bounds = cu_seqlens.tolist()
    parts = []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        qs, ks, vs = (t[start:end].float() * d[s][None, :, None] for t, d in
                      ((q, q_descale), (k, k_descale), (v, v_descale)))
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (qs, ks, vs)), scale=softmax_scale)
        parts.append(out.transpose(0, 1))
    return torch.cat(parts).to(torch.bfloat16)
