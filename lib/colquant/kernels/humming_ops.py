"""humming-kernels (PyPI ``humming-kernels``, NVRTC-JIT W4A16 GEMMs) as a dispatcher candidate.

The package is optional and imported lazily: without it (or without CUDA) the ``"humming"``
candidate is simply not offered, and :func:`unavailable_reason` says why (``backend_report``
lists it).

Weights: humming takes auto_gptq tensors (``qweight`` int32 [K/8, N], ``scales`` [K/G, N]) through
its ``gptq`` schema and repacks them into its own layout once (:func:`prepare`). Only symmetric
layers (every zero point 8, ``W4A16Linear.sym_zero == 8``) are offered: humming's ``sym`` GPTQ
path reads no zero points. Its scales are held in the activation dtype (bf16): fp16 scales are
rounded to bf16 (relative error <= 2^-9 per weight group; the calibration's error check covers it).

Memory: the repacked weights (+ bf16 scales, + a 8 KiB lock buffer) would be a second 4-bit copy
of the layer. By default (``single_copy``) :func:`prepare` therefore moves the layer's kernel-layout
tensors (``qweight_k``, ``zeros_u8``, ``scales``) to host memory once humming's copy exists, and the
layer then sends every token count to humming (also where the calibration measured dequant+cuBLAS
faster, i.e. >= ~11k tokens: see benchmarks/kernel-notes.md for the cost). The host copy keeps the
reference path (``force_reference``), ``to_gptq``/``dequantize`` and :func:`release` exact; humming's
layout is produced by a CUDA repack kernel and is not inverted here.
``COLQUANT_HUMMING_KEEP_KERNEL_COPY=1`` keeps both copies on the GPU (the table's choice per M).
:func:`colquant.kernels.copies.prepare_humming` repacks only the layers whose shape the dispatcher picks humming for;
:attr:`W4A16Linear.weight_bytes` counts what stays on the GPU, ``host_bytes`` what moved.
"""

from __future__ import annotations

import functools
import os

import torch

from colquant.kernels.backend import gpu_unavailable, package_import_error

__all__ = ["Handle", "unavailable_reason", "available", "unsupported_reason", "build_handle", "attach", "prepare",
           "release", "matmul", "version"]


@functools.lru_cache(maxsize=None)
def import_error() -> str | None:
    """None when humming-kernels imports, else why not (what to install)."""
    return package_import_error("humming-kernels", "COLQUANT_DISABLE_HUMMING", "pip install 'colquant[humming]'",
                                ("humming", "humming.layer"))


def unavailable_reason(device=None) -> str | None:
    """None when the humming candidate can run on ``device`` (default: the current CUDA device)."""
    device = torch.device(device) if device is not None else torch.device("cuda")
    return gpu_unavailable(device, "humming-kernels", import_error)


_OK: dict = {}


def available(device) -> bool:
    key = str(device)
    hit = _OK.get(key)
    if hit is None:
        hit = _OK[key] = unavailable_reason(device) is None
    return hit


def clear_cache() -> None:
    _OK.clear()
    import_error.cache_clear()


def version() -> str | None:
    if import_error():
        return None
    import humming

    return getattr(humming, "__version__", None)


def unsupported_reason(mod) -> str | None:
    """None when ``mod`` (a W4A16Linear) can be repacked for humming, else why not."""
    if mod.sym_zero != 8:
        return "asymmetric zero points (humming's gptq path is symmetric-only here)"
    if mod.dtype not in (torch.float16, torch.bfloat16):
        return f"activation dtype {mod.dtype}"
    return None


def _layer_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))


def build_from_gptq(qweight, scales, group_size: int, *, bias=None, dtype=torch.bfloat16):
    """A transformed ``humming.layer.HummingLayer`` from symmetric auto_gptq tensors (on their GPU)."""
    from humming.layer import HummingLayer

    device = qweight.device
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    with torch.cuda.device(device):
        layer = HummingLayer(shape_n=n, shape_k=k,
                             weight_config={"quant_method": "gptq", "bits": 4, "group_size": int(group_size),
                                            "sym": True, "desc_act": False},
                             has_bias=bias is not None, torch_dtype=dtype)
        # parameters are created empty on the host: hand over ours instead of copying into them
        for name, t in (("qweight", qweight.contiguous()), ("scales", scales.to(dtype).contiguous()),
                        ("bias", None if bias is None else bias.to(dtype).contiguous())):
            if t is not None:
                setattr(layer, name, torch.nn.Parameter(t, requires_grad=False))
        for name in ("qzeros", "g_idx"):  # unused by the symmetric path; keep them tiny
            p = getattr(layer, name, None)
            if p is not None:
                setattr(layer, name, torch.nn.Parameter(torch.zeros_like(p, device=device), requires_grad=False))
        layer.transform()
    return layer


class Handle:
    """A transformed HummingLayer plus what its launch needs, resolved once: the kernel-config tensor
    (``HummingKernel.prepare_kernels``: JIT-compiles the layer's kernels now, outside any CUDA-graph
    capture) and the weight tensors. Calling it goes straight to the ``humming::launch_kernel`` op:
    the per-call Python of ``HummingLayer.forward`` (config-op dispatch, getattrs) is skipped, which
    matters on the eager (graph-free) page path where the host, not the GPU, sets the pace."""

    __slots__ = ("layer", "cfgs", "args", "n", "nbytes")

    def __init__(self, layer):
        self.layer = layer
        self.n = layer.shape_n
        self.nbytes = _layer_bytes(layer)
        self.cfgs = None
        try:
            from humming.kernel.humming import HummingKernel
            from humming.ops.utils import init_humming_launcher

            init_humming_launcher()
            dev = layer.weight.device
            self.cfgs = HummingKernel.prepare_kernels(layer.humming_config.to_str(), None, None, dev)
            self.args = tuple(getattr(layer, name, None) for name in
                              ("weight", "weight_scale", "weight_scale_2", "zero_point", "bias"))
        except Exception:  # pragma: no cover - other humming versions: the layer's own forward
            self.cfgs = None

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfgs is None:
            return self.layer(x, outputs=out)
        if out is None:
            out = torch.empty((x.shape[0], self.n), dtype=x.dtype, device=x.device)
        w, ws, ws2, zp, b = self.args
        torch.ops.humming.launch_kernel.out(self.cfgs, x, w, ws, ws2, None, None, zp, b, out,
                                            None, None, None, None, self.layer.locks, 1, 0)
        return out


def build_handle(qweight, scales, group_size: int, *, bias=None, dtype=torch.bfloat16) -> Handle:
    return Handle(build_from_gptq(qweight, scales, group_size, bias=bias, dtype=dtype))


def _single_copy_default() -> bool:
    return os.environ.get("COLQUANT_HUMMING_KEEP_KERNEL_COPY", "") in ("", "0")


def attach(mod, handle, *, single_copy: bool | None = None) -> int:
    """Give ``mod`` (a W4A16Linear) the humming ``handle`` made from its weights; with ``single_copy``
    (default: unless ``COLQUANT_HUMMING_KEEP_KERNEL_COPY=1``) move its kernel-layout tensors to host
    memory, so that humming's is the only 4-bit copy on the device. Returns humming's bytes."""
    if single_copy is None:
        single_copy = _single_copy_default()
    mod._humming = handle  # a plain attribute (not a module or buffer): state_dict unchanged
    mod._humming_bytes = int(handle.nbytes)
    if single_copy:
        mod.spill_kernel_tensors()
    return mod._humming_bytes


def prepare(mod, *, single_copy: bool | None = None) -> int:
    """Repack ``mod``'s weights for humming (once); returns the bytes that copy takes. See
    :func:`attach` for ``single_copy``."""
    h = getattr(mod, "_humming", None)
    if h is not None:
        return mod._humming_bytes
    why = unsupported_reason(mod)
    if why:
        raise ValueError(f"humming cannot run this layer: {why}")
    qw, _, sc = mod.to_gptq()
    h = build_handle(qw, sc, mod.group_size, bias=mod.bias, dtype=mod.dtype)
    del qw, sc
    return attach(mod, h, single_copy=single_copy)


def release(mod) -> None:
    """Drop humming's copy; spilled kernel-layout tensors go back to the compute device first."""
    mod.unspill_kernel_tensors()
    if getattr(mod, "_humming", None) is not None:
        mod._humming = None
        mod._humming_bytes = 0


def run_layer(h, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h``: a :class:`Handle` (or a bare transformed HummingLayer)."""
    if isinstance(h, Handle):
        return h(x, out)
    return h(x, outputs=out)


def matmul(x: torch.Tensor, mod, *, act: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``triton_ops.w4a16_matmul`` for a prepared W4A16Linear (2-D contiguous x;
    ``act``: x is [M, 2K] gate|up and silu(gate)*up is applied first)."""
    if act:
        from colquant.kernels.triton_ops import silu_mul

        x = silu_mul(x)
    return run_layer(mod._humming, x, out)

