"""gemlite (PyPI ``gemlite``, mobiusml: Triton A16W4 GEMV / GEMM kernels with their own autotuning) as a
kernel candidate.

Why: its few-token kernels (GEMV, GEMV "rev-split-K", split-K GEMM) are written for the latency-bound
regime where the project's Triton GEMMs and tinygemm reach at best ~30% of HBM bandwidth. Measured on
the H200 (benchmarks/kernel-notes.md, "Kernel routes") it won no token bucket of the 4B's shapes, its
GEMV kinds missed the tuner's 1e-2 accuracy check, and its autotuning costs seconds per (kind, shape,
M): it is an opt-in extra (``colquant[gemlite]``), not part of ``gpu``. Imported lazily: without it
(or without CUDA) the ``gemlite-*`` candidates are not offered, and :func:`unavailable_reason` says why.

Layout (gemlite 0.6: ``GemLiteLinear.pack`` with ``packing_bitwidth`` 32):

* it takes the integers as uint8 ``[N, K]`` and packs them into int32 ``[K/8, N]`` with eight
  *consecutive* input features per word, low nibble first: exactly auto_gptq's ``qweight``
  (:mod:`.packing`), not our k-blocked layout (16-row interleave inside blocks of 128);
* scales ``[N, K/G]`` in the activation dtype; zero points either an integer (every zero 8: the
  symmetric layers, no zero tensor is read) or a ``[N, K/G]`` tensor in the activation dtype used as
  ``w = (q - z) * s`` (``fma_mode=False``, gemlite's ``W_group_mode`` 3): integer zeros stay exact,
  where its default ``fma_mode`` folds ``-z * s`` into one rounded bf16 term.

So the only rounding against our dequantized weight is fp16 scale -> bf16 (<= 2^-9 relative per
group, as tinygemm's); with fp16 activations the arithmetic is identical.

Memory: gemlite keeps its own packed copy of the layer (K*N/2 bytes + bf16 scales and zeros: the
:data:`~colquant.kernels.linear.COPY_KINDS` entry), like tinygemm. It could *replace* ours for a
layer only if one of two things held: the project's Triton kernels read the auto_gptq word order
(one shift per row of eight consecutive features instead of sixteen rows per 128-feature block),
or gemlite served every token count of that layer (its GEMM kernel covers large M; the page path
would then be gemlite's, measured in benchmarks/kernel_routes.py) with the kernel-layout tensors
moved to the host as humming's single-copy mode does. Neither is done: it is measured first.

Tuning: gemlite autotunes each (kernel kind, M, N, K) on first call (Triton compiles + benchmarks,
seconds per shape). :func:`save_configs` writes what it found next to colquant's tuned table (one
file per GPU and gemlite version) and :func:`load_configs` reads it back, so a later process does
not autotune again.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from colquant.basics.files import OutputError, atomic_write
from colquant.kernels.backend import default_cache_dir, gpu_unavailable, package_import_error, slug
from colquant.kernels.packing import unpack_kblocked

logger = logging.getLogger("colquant.kernels")

__all__ = ["MATMUL_TYPES", "PackArgs", "Handle", "import_error", "unavailable_reason", "version",
           "layer_unsupported_reason", "pack_arguments", "dequantize_arguments", "build_handle", "nbytes",
           "config_path", "load_configs", "save_configs"]

# gemlite's kernel kinds for 16-bit activations (its GEMV_SPLITK is for 8-bit weights)
MATMUL_TYPES = ("GEMV", "GEMV_REVSPLITK", "GEMM_SPLITK", "GEMM")
MIN_K = 32  # GemLiteLinear: in_features % 32 == 0


@functools.lru_cache(maxsize=None)
def import_error() -> str | None:
    """None when gemlite imports, else why not (what to install)."""
    return package_import_error("gemlite", "COLQUANT_DISABLE_GEMLITE", "pip install 'colquant[gemlite]'",
                                ("gemlite",))


def clear_cache() -> None:
    import_error.cache_clear()
    _LOADED.clear()


def unavailable_reason(device=None) -> str | None:
    """None when the gemlite candidates can run on ``device`` (default: the current CUDA device)."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    return gpu_unavailable(device, "gemlite", import_error)


def version() -> str | None:
    if import_error():
        return None
    import gemlite

    return getattr(gemlite, "__version__", None)


def layer_unsupported_reason(k: int, group_size: int, dtype: torch.dtype) -> str | None:
    """None when a (K, group size, activation dtype) layer fits gemlite's A16W4 path, else why not."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"activation dtype {dtype} (gemlite's A16W4 takes fp16 or bf16)"
    if k % MIN_K or group_size < 16 or k % group_size:
        return f"K={k}, group size {group_size} (gemlite needs K % 32 == 0, K % group == 0, group >= 16)"
    return None


@dataclass(frozen=True)
class PackArgs:
    """What :meth:`GemLiteLinear.pack` receives for one layer: the integers ``w_q`` uint8 ``[N, K]``,
    ``scales`` ``[N, K/G]`` and ``zeros`` (the int 8 for a symmetric layer, else ``[N, K/G]``), the
    last two in the activation dtype."""

    w_q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | int


def pack_arguments(qweight_k: torch.Tensor, zeros_u8: torch.Tensor, scales: torch.Tensor, *,
                   dtype: torch.dtype = torch.bfloat16, symmetric: bool | None = None) -> PackArgs:
    """Our kernel layout (k-blocked integers, uint8 zeros, fp16 scales) as gemlite's pack arguments.
    ``symmetric`` (default: every zero point is 8) passes the integer zero 8 instead of a tensor."""
    if symmetric is None:
        symmetric = bool((zeros_u8 == 8).all())
    w_q = unpack_kblocked(qweight_k).t().to(torch.uint8).contiguous()
    zeros = 8 if symmetric else zeros_u8.t().to(dtype).contiguous()
    return PackArgs(w_q, scales.t().to(dtype).contiguous(), zeros)


def dequantize_arguments(args: PackArgs, group_size: int) -> torch.Tensor:
    """``W [N, K]`` as gemlite's ``W_group_mode`` 3 computes it from ``args``: ``(q - z) * s`` in the
    scales' dtype (one rounding). The check that :func:`pack_arguments` loses nothing."""
    dtype = args.scales.dtype
    q = args.w_q.to(dtype)
    z = args.zeros if isinstance(args.zeros, int) else args.zeros.repeat_interleave(group_size, dim=1)
    return (q - z) * args.scales.repeat_interleave(group_size, dim=1)


def _gemlite_dtype(dtype: torch.dtype):
    from gemlite import DType

    return {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}[dtype]


class Handle:
    """A packed ``GemLiteLinear`` plus what its launch needs, resolved once (tensor and meta arguments):
    calling it goes straight to ``gemlite.forward_functional`` with the kernel kind fixed
    (``matmul_type``, one of :data:`MATMUL_TYPES`) or gemlite's own dispatch by token count (``None``)."""

    __slots__ = ("layer", "tensor_args", "meta_args", "n", "nbytes")

    def __init__(self, layer):
        self.layer = layer
        self.tensor_args = layer.get_tensor_args()
        self.meta_args = layer.get_meta_args()
        self.n = layer.out_features
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensor_args[:3])

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 matmul_type: str | None = None) -> torch.Tensor:
        from gemlite.core import GEMLITE_MATMUL_TYPES_MAPPING, forward_functional

        index = -1 if matmul_type is None else GEMLITE_MATMUL_TYPES_MAPPING[matmul_type]
        y = forward_functional(x, bias, self.tensor_args, self.meta_args, index)
        if out is None:
            return y
        return out.copy_(y)  # gemlite allocates its output (zeroed for its atomic split-K reductions)


def build_handle(qweight_k: torch.Tensor, zeros_u8: torch.Tensor, scales: torch.Tensor, group_size: int, *,
                 dtype: torch.dtype = torch.bfloat16) -> Handle:
    """Pack one layer for gemlite on the device of ``qweight_k`` (a CUDA GPU)."""
    from gemlite import GemLiteLinear

    k, n = qweight_k.shape[0] * 8, qweight_k.shape[1]
    why = layer_unsupported_reason(k, group_size, dtype)
    if why:
        raise ValueError(f"gemlite cannot run this layer: {why}")
    args = pack_arguments(qweight_k, zeros_u8, scales, dtype=dtype)
    gdt = _gemlite_dtype(dtype)
    layer = GemLiteLinear(W_nbits=4, group_size=group_size, in_features=k, out_features=n, input_dtype=gdt,
                          output_dtype=gdt)
    with torch.cuda.device(qweight_k.device):
        layer.pack(args.w_q, args.scales, args.zeros, bias=None, fma_mode=False, packing_bitwidth=32)
    return Handle(layer)


def nbytes(k: int, n: int, group_size: int, symmetric: bool, dtype_bytes: int = 2) -> int:
    """GPU bytes of one layer's gemlite copy (packed weights, scales, zeros unless symmetric)."""
    groups = k // group_size
    return k * n // 2 + groups * n * dtype_bytes * (1 if symmetric else 2)


# --------------------------------------------------------------------------------------------
# gemlite's own autotuning results, kept per GPU
# --------------------------------------------------------------------------------------------

_LOADED: set[str] = set()


def config_path(device, cache_dir: Path | str | None = None) -> Path:
    """``<colquant kernel cache>/gemlite-<gpu>-<gemlite version>.json``."""
    gpu = torch.cuda.get_device_name(torch.device(device))
    return Path(cache_dir or default_cache_dir()) / f"gemlite-{slug(gpu)}-{slug(version() or 'none')}.json"


def load_configs(device, cache_dir: Path | str | None = None) -> bool:
    """Give gemlite the kernel configurations it autotuned on this GPU before (once per process)."""
    path = config_path(device, cache_dir)
    if str(path) in _LOADED or not path.exists():
        return False
    import gemlite

    ok = bool(gemlite.load_config(str(path), print_error=False))
    _LOADED.add(str(path))
    if not ok:
        logger.warning("colquant.kernels: ignoring gemlite's config cache %s (unreadable); gemlite autotunes "
                       "again", path)
    return ok


def save_configs(device, cache_dir: Path | str | None = None) -> Path | None:
    """Write what gemlite autotuned in this process (merged with the file's earlier content) atomically.
    An unwritable cache is not fatal (the next process autotunes again)."""
    import gemlite

    path = config_path(device, cache_dir)

    def merged(staging: Path) -> None:  # gemlite's cache_config adds to the file it is given
        if path.exists():
            staging.write_bytes(path.read_bytes())
        gemlite.cache_config(str(staging))

    try:
        return atomic_write(path, merged)
    except OutputError as exc:
        logger.warning("colquant.kernels: %s; the next process autotunes gemlite again", exc)
        return None
