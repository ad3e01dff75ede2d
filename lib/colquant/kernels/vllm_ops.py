"""vLLM 0.26.0's Hopper 4-bit GEMMs as tuner candidates: Machete, Marlin and CUTLASS W4A8.

Why: on the H200 our W4A16 kernels stream packed weights at ~1.4 TB/s of the card's ~4.3 and lose to
BF16 cuBLAS from a few dozen tokens on (benchmarks/kernel-notes.md); vLLM ships maintained Hopper
kernels for exactly our weights (GPTQ-symmetric int4, group 128). Only vLLM's compiled op library is
used, not vLLM itself: ``vllm/_C_stable_libtorch.abi3.so`` links libtorch's stable ABI, libcudart 13
and libcuda, and ``torch.ops.load_library`` registers its ops under ``torch.ops._C``. It is found at
``$COLQUANT_VLLM_OPS_LIB`` (an explicit path: the GPU image, which cannot install vLLM) or in the
installed ``vllm`` package (``pip install 'colquant[vllm-kernels]'``); anything else is refused with a
message naming what is needed (:func:`load_error`).

The kernels and what they take (all from our symmetric layers: every zero point 8, ``sym_zero == 8``):

* Machete (Hopper only, W4A16): the GPTQ ``qweight`` [K/8, N] as ``uint4b8`` (value = stored - 8),
  column-major, repacked once by ``machete_prepack_B``; bf16 group scales [K/G, N]; an explicit
  ``schedule`` per call (:func:`machete_schedules`: the tuner times each, as configurations).
* Marlin (W4A16, sm80+): the same ``qweight`` repacked by ``gptq_marlin_repack``; bf16 scales with
  Marlin's column order inside each 64 columns (:func:`marlin_scales`); fp32 reduction.
* CUTLASS W4A8 (Hopper only): signed int4 (:func:`uint4b8_to_int4`: ``q - 8`` per nibble), reordered
  by ``cutlass_encode_and_reorder_int4b``; e4m3 group scales plus an fp32 scale per output channel
  (:func:`fp8_group_scales`); per-token e4m3 activations (the project's fused ``quantize_rows``).

The scales arrive as fp16 and become bf16 (<= 2^-9 relative per group, as for humming and tinygemm) or
e4m3 (W4A8: <= 2^-4 relative per group; the tuner checks W4A8 at :data:`W4A8_CHECK_REL_ERR`).
The re-encodings are plain torch (checked exactly on CPU); the repacks are the library's own CUDA ops,
whose layouts are not inverted here. Memory: a layer given a vLLM repack (:func:`prepare`) moves its
kernel-layout tensors to host memory, as humming's single-copy mode does: one 4-bit copy on the GPU.
"""

from __future__ import annotations

import functools

import torch

from colquant.kernels.backend import gpu_unavailable
from colquant.kernels.packing import kernel_to_gptq
from colquant.kernels.vllm_library import VLLM_VERSION, VllmLibrary

__all__ = ["VLLM_VERSION", "KINDS", "UINT4B8_ID", "INT4_ID", "scalar_type_id", "LIBRARY", "load_error",
           "unavailable_reason", "version", "uint4b8_to_int4", "fp8_group_scales", "marlin_scale_order",
           "marlin_scales", "machete_schedules", "Packed", "build_handle", "pack_w4a8", "layer_unsupported_reason",
           "prepare", "release", "W4A8_CHECK_REL_ERR"]

LIBRARY = VllmLibrary(
    relpath="_C_stable_libtorch.abi3.so", env="COLQUANT_VLLM_OPS_LIB", disable_env="COLQUANT_DISABLE_VLLM_OPS",
    what="kernel library", namespace="_C",
    ops=("machete_prepack_B", "machete_mm", "machete_supported_schedules", "gptq_marlin_repack", "marlin_gemm",
         "cutlass_encode_and_reorder_int4b", "cutlass_pack_scale_fp8", "cutlass_w4a8_mm"))
LIB_ENV, DISABLE_ENV = LIBRARY.env, LIBRARY.disable_env
KINDS = ("machete", "marlin", "w4a8")
# what each kernel needs of the GPU: (lowest compute capability, highest major version, why)
_GPU_NEED = {"machete": ((9, 0), 9, "Machete is built for Hopper (sm90a)"),
             "w4a8": ((9, 0), 9, "CUTLASS W4A8 is built for Hopper (sm90a)"),
             "marlin": ((8, 0), 12, "Marlin needs bf16 tensor cores")}
FP8_MAX = 448.0  # largest finite e4m3
INT4_MAG = 8  # largest |signed int4|: the kernel forms q * group_scale in e4m3, so |group_scale| <= 448 / 8
W4A8_CHECK_REL_ERR = 6e-2  # e4m3 activations and scales: up to 2^-4 relative per element, twice over
MARLIN_TILE_N, MARLIN_TILE_K = 64, 128  # shapes Marlin takes without padding (vLLM pads others; we refuse)


def scalar_type_id(exponent: int, mantissa: int, signed: bool, bias: int, finite_only: bool = False,
                   nan_repr: int = 1) -> int:
    """vLLM's ``ScalarType.id``: the fields packed low to high in 8, 8, 1, 32, 1 and 8 bits (the layout
    ``csrc/core/scalar_type.hpp`` decodes; ``nan_repr`` 1 is IEEE-754, vLLM's default for integers too)."""
    val, offset = 0, 0
    for member, width in ((exponent, 8), (mantissa, 8), (int(signed), 1), (bias, 32), (int(finite_only), 1),
                          (nan_repr, 8)):
        val |= (int(member) & ((1 << width) - 1)) << offset
        offset += width
    return val


UINT4B8_ID = scalar_type_id(0, 4, False, 8)  # GPTQ's symmetric int4: value = stored - 8
INT4_ID = scalar_type_id(0, 3, True, 0)  # signed int4 (three magnitude bits and a sign)


# --------------------------------------------------------------------------------------------
# finding and loading the library
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None once vLLM 0.26.0's op library is loaded into torch (loaded here, once); else a one-line
    reason naming what is needed (:meth:`VllmLibrary.load_error`)."""
    return LIBRARY.load_error()


def clear_cache() -> None:
    """Forget the cached decisions (tests, env changes); a loaded library stays loaded."""
    load_error.cache_clear()
    machete_schedules.cache_clear()
    _WORKSPACES.clear()


def unavailable_reason(device: torch.device | str, kind: str) -> str | None:
    """None when vLLM's ``kind`` kernel (one of :data:`KINDS`) can run on ``device``, else why not."""
    low, high_major, why = _GPU_NEED[kind]
    name = dict(machete="Machete", marlin="Marlin", w4a8="CUTLASS W4A8")[kind]
    reason = load_error() or gpu_unavailable(device, f"vLLM's {name}", load_error, min_capability=low,
                                             needed_for=why)  # the library first: what to install
    if reason is None and torch.cuda.get_device_capability(device)[0] > high_major:
        cap = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; {why}"
    return reason


def version() -> str | None:
    """The vLLM release whose library is loaded (None: not loaded); part of the tuned table's cache key."""
    return None if load_error() else LIBRARY.release()


# --------------------------------------------------------------------------------------------
# re-encodings (plain torch)
# --------------------------------------------------------------------------------------------


def uint4b8_to_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Packed uint4b8 words (GPTQ ``qweight``, any shape, int32) -> the same words as signed int4:
    each nibble ``q`` becomes ``q - 8`` in two's complement, i.e. ``q ^ 8``, so one XOR per word."""
    if qweight.dtype != torch.int32:
        raise ValueError(f"packed 4-bit weights must be int32 words, got {qweight.dtype}")
    return torch.bitwise_xor(qweight, torch.tensor(-0x77777778, dtype=torch.int32, device=qweight.device))  # 0x88888888


def fp8_group_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales [K/G, N] -> (e4m3 group scales [K/G, N], fp32 channel scales [N, 1]) with
    ``scales ~= e4m3 * channel`` (one e4m3 rounding). The channel scale is each column's largest
    |scale| / (448 / 8): CUTLASS W4A8 multiplies the int4 value (|q| <= 8) by the e4m3 group scale in
    e4m3, so the product stays finite. An all-zero column gets channel scale 1."""
    s = scales.float()
    amax = s.abs().amax(dim=0)
    chan = torch.where(amax > 0, amax / (FP8_MAX / INT4_MAG), torch.ones_like(amax))
    fp8 = (s / chan).clamp(-FP8_MAX / INT4_MAG, FP8_MAX / INT4_MAG).to(torch.float8_e4m3fn)
    return fp8, chan.reshape(-1, 1).contiguous()


def marlin_scale_order(device: torch.device | str = "cpu") -> torch.Tensor:
    """Marlin's column order for grouped scales inside each run of 64 columns: ``i + 8 j``, ``i`` outer."""
    return torch.tensor([i + 8 * j for i in range(8) for j in range(8)], device=device)


def marlin_scales(scales: torch.Tensor) -> torch.Tensor:
    """Group scales [K/G, N] (N a multiple of 64) -> Marlin's bf16 [K/G, N] in its column order."""
    n = scales.shape[1]
    order = marlin_scale_order(scales.device)
    return scales.to(torch.bfloat16).reshape(-1, order.numel()).index_select(1, order).reshape(-1, n).contiguous()


# --------------------------------------------------------------------------------------------
# the kernels
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def machete_schedules() -> tuple[str, ...]:
    """Machete's schedules for bf16 activations, uint4b8 weights and bf16 group scales, as the library
    lists them (the tuner's configurations). Empty where the library is not loaded."""
    if load_error():
        return ()
    return tuple(torch.ops._C.machete_supported_schedules(torch.bfloat16, UINT4B8_ID, torch.bfloat16, None, None,
                                                          None, None))


_WORKSPACES: dict = {}


def _marlin_workspace(device: torch.device) -> torch.Tensor:
    """Marlin's lock buffer (one int per multiprocessor, zero between calls; the kernel resets it),
    shared by every layer on ``device`` as vLLM does: calls on one stream never overlap."""
    key = str(device)
    if key not in _WORKSPACES:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        _WORKSPACES[key] = torch.zeros(sms, dtype=torch.int32, device=device)
    return _WORKSPACES[key]


class Packed:
    """One layer's weights repacked for one vLLM kernel (``kind``), and its call.
    ``self(x, out=None, bias=None, cfg=None)`` -> ``x @ W.T (+ bias)`` in bf16; ``cfg``: Machete's
    ``{"schedule": ...}`` (None: Machete's own heuristic), unused by the others. For ``"w4a8"``, ``x``
    is bf16 (quantized per token here by the fused ``quantize_rows``) or an ``(e4m3 rows, fp32 scales)``
    pair from a fused producer."""

    __slots__ = ("kind", "k", "n", "group_size", "tensors", "nbytes")

    def __init__(self, kind: str, k: int, n: int, group_size: int, tensors: tuple[torch.Tensor, ...]):
        self.kind, self.k, self.n, self.group_size, self.tensors = kind, k, n, group_size, tensors
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __call__(self, x, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 cfg: dict | None = None) -> torch.Tensor:
        if self.kind == "machete":
            b_q, s = self.tensors
            y = torch.ops._C.machete_mm(x, b_q, UINT4B8_ID, None, s, None, self.group_size, None, None,
                                        (cfg or {}).get("schedule"))
        elif self.kind == "marlin":
            b_q, s = self.tensors
            # no bias inside: Marlin's epilogue wants it in its column order (vLLM permutes it); ours is added below
            y = torch.ops._C.marlin_gemm(x, out, b_q, None, s, None, None, None, None, None,
                                         _marlin_workspace(x.device), UINT4B8_ID, x.shape[0], self.n, self.k,
                                         True, False, True, False)
            return y if bias is None else y.add_(bias)
        else:
            b_q, s, chan = self.tensors
            q, qs = x if isinstance(x, tuple) else _quantize_rows(x)
            y = torch.ops._C.cutlass_w4a8_mm(q, b_q, s, self.group_size, chan, qs, torch.bfloat16, None)
        if bias is not None:
            y.add_(bias)
        return y if out is None else out.copy_(y)


def _quantize_rows(x: torch.Tensor):
    from colquant.kernels.fp8_ops import quantize_rows

    return quantize_rows(x)


def layer_unsupported_reason(k: int, n: int, group_size: int, symmetric: bool, kind: str) -> str | None:
    """None when vLLM's ``kind`` kernel takes a layer of this shape, group size and zero points."""
    if not symmetric:
        return "asymmetric zero points (wired here as uint4b8 / signed int4 only: every zero point 8)"
    if kind == "machete" and (k % 64 or n % 128 or group_size not in (64, 128)):
        return f"Machete needs K % 64 == 0, N % 128 == 0 and group size 64 or 128 (K={k}, N={n}, G={group_size})"
    if kind == "marlin" and (k % MARLIN_TILE_K or n % MARLIN_TILE_N or k % group_size):
        return f"Marlin (unpadded) needs K % 128 == 0 and N % 64 == 0 (K={k}, N={n})"
    if kind == "w4a8" and (k % 128 or n % 128 or group_size != 128):
        return f"CUTLASS W4A8 needs K and N multiples of 128 and group size 128 (K={k}, N={n}, G={group_size})"
    return None


def build_handle(kind: str, qweight_k: torch.Tensor, zeros_u8: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> Packed:
    """Repack a symmetric layer's kernel-layout tensors (on their GPU) for vLLM's ``kind`` kernel."""
    k, n = qweight_k.shape[0] * 8, qweight_k.shape[1]
    why = layer_unsupported_reason(k, n, group_size, bool((zeros_u8 == 8).all()), kind)
    if why:
        raise ValueError(f"vLLM's {kind} kernel cannot run this layer: {why}")
    qweight = kernel_to_gptq(qweight_k, zeros_u8)[0]  # [K/8, N], eight consecutive features a word
    if kind == "machete":
        b_q = torch.ops._C.machete_prepack_B(qweight.t().contiguous().t(), torch.bfloat16, UINT4B8_ID, torch.bfloat16)
        return Packed(kind, k, n, group_size, (b_q, scales.to(torch.bfloat16).contiguous()))
    if kind == "marlin":
        empty = torch.empty(0, dtype=torch.int32, device=qweight.device)
        b_q = torch.ops._C.gptq_marlin_repack(qweight.contiguous(), empty, k, n, 4, False)
        return Packed(kind, k, n, group_size, (b_q, marlin_scales(scales)))
    return pack_w4a8(uint4b8_to_int4(qweight), *fp8_group_scales(scales), group_size)


def pack_w4a8(int4_words: torch.Tensor, group_scales: torch.Tensor, channel_scales: torch.Tensor,
              group_size: int) -> Packed:
    """The W4A8 encoding (signed int4 words [K/8, N] as :func:`uint4b8_to_int4` gives them, e4m3 group
    scales [K/G, N] and fp32 channel scales [N, 1] as :func:`fp8_group_scales` gives them; on the GPU)
    -> CUTLASS W4A8's layouts. One encoding feeds both this and the torch reference of
    :mod:`colquant.kernels.w4a8`, so the two run the same numbers."""
    k, n = int4_words.shape[0] * 8, int4_words.shape[1]
    b_q = torch.ops._C.cutlass_encode_and_reorder_int4b(int4_words.t().contiguous().t())
    return Packed("w4a8", k, n, group_size, (b_q, torch.ops._C.cutlass_pack_scale_fp8(group_scales.contiguous()),
                                             channel_scales))


# --------------------------------------------------------------------------------------------
# a layer's single 4-bit copy
# --------------------------------------------------------------------------------------------


def prepare(mod, kind: str) -> int:
    """Repack ``mod`` (a W4A16Linear) for vLLM's ``kind`` kernel once and move its kernel-layout
    tensors to host memory (:meth:`W4A16Linear.spill_kernel_tensors`): the repack is then its only
    4-bit copy on the GPU and serves every token count. Returns the repack's bytes."""
    if mod._vllm is not None:
        if mod._vllm.kind != kind:
            raise ValueError(f"layer already repacked for {mod._vllm.kind}; release() it before repacking for {kind}")
        return mod._vllm.nbytes
    mod._vllm = build_handle(kind, *mod.kernel_tensors(), mod.group_size)
    mod.spill_kernel_tensors()
    return mod._vllm.nbytes


def release(mod) -> None:
    """Drop the vLLM repack; the kernel-layout tensors go back to the compute device."""
    if mod._vllm is not None:
        mod.unspill_kernel_tensors()
        mod._vllm = None
