"""`W4A16Linear`: a 4-bit-weight, 16-bit-activation Linear whose GEMM is chosen by token count.

On CUDA with Triton the dispatcher picks, for the number of tokens ``M`` in the call:

* ``"triton"``: the fused kernel with a tile/split-K configuration for that ``M`` (weights are
  read as 4-bit and dequantized inside the main loop: few tokens -> small tiles, K split over
  programs; more tokens -> larger tiles);
* ``"dequant+cublas"``: for large ``M`` dequantize the weight once into a shared 16-bit scratch
  and call cuBLAS (the extra pass costs < 5% once the GEMM is compute-bound);
* ``"bf16"``: cuBLAS on a dequantized BF16 copy of the weight, where the tuner measured BF16 faster
  than every 4-bit kernel and :func:`.autotune.keep_bf16_copies` kept one (else the entry's 4-bit
  fallback runs);
* ``"tinygemm"``: torch core's ``aten._weight_int4pack_mm`` (:mod:`.tinygemm`) on a copy of the
  4-bit weights in its layout, kept where the tuner measured it fastest and memory allows
  (:mod:`.copies`; else the entry's fallback runs);
* ``"gemlite"``: one of gemlite's kernel kinds (optional package, :mod:`.gemlite_ops`; ``cfg``
  names it) on a copy of the weights packed for it, kept like tinygemm's;
* ``"humming"``: humming-kernels' GEMM (optional package, see :mod:`.humming_ops`) on a copy of
  the weights repacked for it; only ever chosen through a measured table entry, and only where the
  package imports (elsewhere such entries fall back to the default choice). Once a layer is
  repacked, its kernel-layout tensors move to host memory (one 4-bit copy on the GPU) and humming
  serves every ``M`` of that layer (:attr:`W4A16Linear.spilled`).
* ``"machete"`` / ``"marlin"``: vLLM's Hopper kernels (optional library, :mod:`.vllm_ops`; Machete's
  ``cfg`` names its schedule) on the layer's weights repacked for that kernel, kept (like humming's,
  as the layer's only 4-bit copy on the GPU) where :func:`.copies.prepare_vllm` finds it never slower
  than the layer's own kernels; such a layer runs that kernel at every ``M`` (BF16 where it holds a copy).

Elsewhere (CPU, no Triton, old GPU) it runs the reference path, dequantize + ``torch.matmul``,
after one logged message naming what is missing. The table of choices per (K, N, M) is
``DISPATCH``; :mod:`.autotune` measures the candidates on the GPU at hand on first use (cached on
disk per GPU and versions) and fills it.
"""

from __future__ import annotations

import bisect
import collections
import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from colquant.kernels import gemlite_ops, humming_ops, tinygemm
from colquant.kernels import reference as ref
from colquant.kernels.backend import use_fast_path
from colquant.kernels.packing import (
    dequantize_kernel,
    gptq_to_kernel,
    kernel_to_gptq,
    rtn_quantize_gptq,
)

__all__ = ["W4A16Linear", "DISPATCH", "Dispatcher", "quantize_linears_rtn", "replace_quant_linears",
           "is_quant_linear", "linear_forward", "force_reference"]


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------

# kinds that run on a copy of the weights besides the layer's own 4-bit tensors: what that copy is
COPY_KINDS = {"bf16": "a BF16 copy of the layer's weight",
              "tinygemm": "a second copy of the 4-bit weights in tinygemm's layout",
              "gemlite": "a second copy of the 4-bit weights in gemlite's packed layout",
              "machete": "the 4-bit weights repacked for vLLM's Machete (the layer's only 4-bit copy on the GPU)",
              "marlin": "the 4-bit weights repacked for vLLM's Marlin (the layer's only 4-bit copy on the GPU)"}
VLLM_KINDS = ("machete", "marlin")  # vllm_ops kinds a W4A16Linear can hold (W4A8 is a mode of its own)

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 1 << 62)


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the key the dispatch table uses)."""
    return M_BUCKETS[bisect.bisect_left(M_BUCKETS, m)]


@dataclass
class Dispatcher:
    """Per (K, N, M-bucket) choice: ("triton", cfg), ("dequant+cublas", None), ("humming", None),
    ("tinygemm", {"inner_k_tiles": t, "fallback": [kind, cfg]}), ("gemlite", {"matmul_type": kind, "fallback":
    [kind, cfg]}) or ("bf16", {"fallback": [kind, cfg]})
    (a copy kind names what runs where the layer holds no such copy), filled by :func:`.autotune.ensure_tuned` for the GPU at hand.

    Without a tuned entry (a layer used without :func:`accelerate_model`): Triton with
    ``triton_ops.default_config`` below ``dequant_min_m`` tokens, dequantize + cuBLAS from there on.
    """

    dequant_min_m: int = 65
    table: dict = field(default_factory=dict)
    stats: collections.Counter = field(default_factory=collections.Counter)
    record_stats: bool = False

    def default(self, m: int, k: int, n: int):
        """The built-in choice (no measured entry)."""
        if m >= self.dequant_min_m:
            return ("dequant+cublas", None)
        return ("triton", _triton_ops().default_config(m, n, k))

    def choose(self, m: int, k: int, n: int):
        key = (k, n, m_bucket(m))
        hit = self.table.get(key)
        if hit is None:
            hit = self.default(m, k, n)
        if self.record_stats:
            self.stats[(k, n, m, hit[0])] += 1
        return hit

    def set(self, k: int, n: int, bucket: int, choice) -> None:
        self.table[(k, n, bucket)] = choice

    def to_json(self) -> list:
        return [dict(K=k, N=n, M_bucket=b, kind=c[0], cfg=c[1]) for (k, n, b), c in sorted(self.table.items())]

    def load_json(self, entries) -> int:
        """Fill the table from :meth:`to_json` output (a list, or a path to a JSON file holding
        that list or a benchmark report with a ``dispatch_table`` key)."""
        if isinstance(entries, (str, bytes)) or hasattr(entries, "read_text"):
            import json
            from pathlib import Path

            data = json.loads(Path(entries).read_text())
            entries = data.get("dispatch_table", []) if isinstance(data, dict) else data
        for e in entries:
            self.set(int(e["K"]), int(e["N"]), int(e["M_bucket"]), (e["kind"], e.get("cfg")))
        return len(entries)


DISPATCH = Dispatcher()

_FORCE_REFERENCE = [False]
_KERNEL_TENSORS = ("qweight_k", "zeros_u8", "scales")  # the layer's own 4-bit copy (spilled to the host when repacked)


@functools.cache
def _triton_ops():
    """The Triton kernels module, imported once (a ``from ... import`` per call costs microseconds of
    host time on every Linear of the host-bound eager page path)."""
    from colquant.kernels import triton_ops

    return triton_ops


class force_reference:
    """Context manager: run every colquant kernel through its torch reference (for checks)."""

    def __enter__(self):
        self._prev = _FORCE_REFERENCE[0]
        _FORCE_REFERENCE[0] = True

    def __exit__(self, *exc):
        _FORCE_REFERENCE[0] = self._prev


def fast(device) -> bool:
    return not _FORCE_REFERENCE[0] and use_fast_path(device)


_SCRATCH: dict = {}
_SCRATCH_KEEP: list = []  # never freed: CUDA graphs may hold their addresses
_SCRATCH_HINT: dict = {}


def scratch_hint(numel: int, device) -> None:
    """Largest weight (K*N) the dequantize+cuBLAS path will need on ``device``: the scratch is then
    allocated once, at that size, on first use (one buffer shared by every layer)."""
    key = str(torch.device(device))
    _SCRATCH_HINT[key] = max(_SCRATCH_HINT.get(key, 0), int(numel))


def _scratch(numel: int, dtype, device) -> torch.Tensor:
    key = (str(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        numel = max(numel, _SCRATCH_HINT.get(str(device), 0))
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buf
        _SCRATCH_KEEP.append(buf)
    return buf


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


class W4A16Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as 4-bit integers, group-wise fp16 scales and 4-bit
    zero points, in the kernel's k-blocked layout (see :mod:`colquant.kernels.packing`)."""

    # humming state (humming_ops.attach sets them per instance); class defaults keep the per-call
    # lookups off nn.Module.__getattr__'s slow miss path (the eager page path is host-bound)
    _spilled = False
    _humming = None
    _humming_bytes = 0
    _compute_device = None
    tinygemm_inner_k_tiles = 0  # set with the tinygemm copy (its layout depends on it)
    _gemlite = None  # gemlite_ops.Handle: gemlite's packed copy, only where the tuner picked it
    _vllm = None  # vllm_ops.Packed: vLLM's repack (machete or marlin), the layer's only 4-bit copy on the GPU

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 device=None, dtype=torch.bfloat16):
        super().__init__()
        if in_features % group_size or in_features % 128 or out_features % 8:
            raise ValueError(f"W4A16Linear needs in_features % 128 == 0, in_features % group_size == 0 and "
                             f"out_features % 8 == 0, got {in_features}, {out_features}, group {group_size}")
        if not (group_size % 128 == 0 or (128 % group_size == 0 and group_size % 16 == 0)):
            raise ValueError(f"group_size {group_size} must be a multiple of 128 or divide 128 (>= 16)")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.dtype = dtype
        self.sym_zero = 0  # 8 when every zero point is 8: kernels then skip reading them
        g = in_features // group_size
        self.register_buffer("qweight_k", torch.zeros((in_features // 8, out_features), dtype=torch.int32,
                                                      device=device))
        self.register_buffer("zeros_u8", torch.zeros((g, out_features), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros((g, out_features), dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        # dequantized [out, in] copy, only where BF16 beats every 4-bit kernel (autotune.keep_bf16_copies);
        # not saved: the checkpoint stays 4-bit
        self.register_buffer("bf16_weight", None, persistent=False)
        # tinygemm's packed weight and [K/G, N, 2] scales-and-zeros, only where the tuner picked it
        self.register_buffer("tinygemm_weight", None, persistent=False)
        self.register_buffer("tinygemm_sz", None, persistent=False)

    def keep_bf16_copy(self) -> None:
        """Hold a dequantized 16-bit weight for the token counts where the tuned table picks ``"bf16"``."""
        self.bf16_weight = self.dequantize().contiguous()

    def keep_tinygemm_copy(self, inner_k_tiles: int = 8) -> None:
        """Hold the weights in tinygemm's layout for the token counts where the table picks ``"tinygemm"``."""
        why = tinygemm.layer_unsupported_reason(self.in_features, self.out_features, self.group_size, self.dtype,
                                                inner_k_tiles)
        if why:
            raise ValueError(f"tinygemm cannot run this layer: {why}")
        self.tinygemm_weight, self.tinygemm_sz = tinygemm.pack(*self.kernel_tensors(), inner_k_tiles=inner_k_tiles,
                                                               dtype=self.dtype)
        self.tinygemm_inner_k_tiles = inner_k_tiles

    def keep_gemlite_copy(self) -> None:
        """Hold the weights packed for gemlite for the token counts where the table picks ``"gemlite"``
        (a plain attribute, not a buffer: the checkpoint stays ours; :attr:`weight_bytes` counts it)."""
        self._gemlite = gemlite_ops.build_handle(*self.kernel_tensors(), self.group_size, dtype=self.dtype)

    def has_copy(self, kind: str, cfg: dict | None) -> bool:
        """Whether this layer holds the copy a :data:`COPY_KINDS` choice runs on."""
        if kind == "bf16":
            return self.bf16_weight is not None
        if kind == "gemlite":
            return self._gemlite is not None
        if kind in VLLM_KINDS:
            return self._vllm is not None and self._vllm.kind == kind
        return self.tinygemm_weight is not None and self.tinygemm_inner_k_tiles == (cfg or {}).get("inner_k_tiles")

    def spill_kernel_tensors(self) -> None:
        """Move the kernel-layout tensors to host memory once a repacked copy (humming's, vLLM's) serves
        this layer: one 4-bit copy on the GPU. They stay registered buffers (the state_dict is unchanged)
        and keep the reference path, ``to_gptq``/``dequantize`` and the repack's release exact."""
        if self.spilled:
            return
        dev = self.scales.device
        for name in _KERNEL_TENSORS:
            setattr(self, name, getattr(self, name).to("cpu"))
        self._compute_device = dev
        self._spilled = True

    def unspill_kernel_tensors(self) -> None:
        """Bring spilled kernel-layout tensors back to the compute device (a repack being released)."""
        if not self.spilled:
            return
        for name in _KERNEL_TENSORS:
            setattr(self, name, getattr(self, name).to(self._compute_device))
        self._spilled = False

    def _refresh_sym(self) -> None:
        self.sym_zero = 8 if bool((self.zeros_u8 == 8).all()) else 0

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, group_size: int, *, bias=None, g_idx=None,
                  dtype=torch.bfloat16, zero_offset: int = 1) -> "W4A16Linear":
        """From auto_gptq-layout tensors (auto-round ``auto_round:auto_gptq``: ``zero_offset=1``)."""
        k = qweight.shape[0] * 8
        n = qweight.shape[1]
        if g_idx is not None:
            trivial = torch.arange(k, device=g_idx.device, dtype=torch.int64) // group_size
            if not torch.equal(g_idx.to(torch.int64), trivial):
                raise NotImplementedError("act-order checkpoints (non-trivial g_idx) are not supported by "
                                          "W4A16Linear; re-export with desc_act=False")
        self = cls(k, n, group_size, bias=bias is not None, device=qweight.device, dtype=dtype)
        qk, zu = gptq_to_kernel(qweight, qzeros, zero_offset=zero_offset)
        self.qweight_k.copy_(qk)
        self.zeros_u8.copy_(zu)
        self.scales.copy_(scales.to(torch.float16))
        if bias is not None:
            self.bias.copy_(bias.to(dtype))
        self._refresh_sym()
        return self

    @classmethod
    def from_quantlinear(cls, ql: nn.Module, dtype=torch.bfloat16) -> "W4A16Linear":
        """From an auto-round / GPTQ QuantLinear (4 bits). The zero-point convention follows the
        class: auto-round's ``*_zp`` / gptq kernels store ``zero - 1``, plain ``auto_round`` ones
        store the zero itself."""
        bits = getattr(ql, "bits", 4)
        if bits != 4:
            raise NotImplementedError(f"only 4-bit QuantLinear is supported, got {bits} bits")
        mod = type(ql).__module__
        zero_offset = 0 if (mod.endswith("qlinear_torch") or mod.endswith("qlinear_tritonv2")) else 1
        zero_offset = getattr(ql, "colquant_zero_offset", zero_offset)
        bias = getattr(ql, "bias", None)
        return cls.from_gptq(ql.qweight, ql.qzeros, ql.scales, ql.group_size, bias=bias,
                             g_idx=getattr(ql, "g_idx", None), dtype=dtype, zero_offset=zero_offset)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "W4A16Linear":
        """RTN W4 (sym, auto-round's rule) of a float Linear, via the auto_gptq layout."""
        qw, qz, sc = rtn_quantize_gptq(linear.weight.data, group_size)
        return cls.from_gptq(qw, qz, sc, group_size, bias=linear.bias, dtype=linear.weight.dtype)

    @classmethod
    def concat(cls, parts: list["W4A16Linear"]) -> "W4A16Linear":
        """Fuse Linears that share their input (q/k/v, gate/up) by concatenating along N."""
        k = parts[0].in_features
        gs = parts[0].group_size
        if any(p.in_features != k or p.group_size != gs for p in parts):
            raise ValueError("fused parts must share in_features and group_size")
        has_bias = any(p.bias is not None for p in parts)
        n = sum(p.out_features for p in parts)
        dev = parts[0].compute_device
        self = cls(k, n, gs, bias=has_bias, device=dev, dtype=parts[0].dtype)
        kt = [p.kernel_tensors(dev) for p in parts]
        self.qweight_k = torch.cat([t[0] for t in kt], dim=1)
        self.zeros_u8 = torch.cat([t[1] for t in kt], dim=1)
        self.scales = torch.cat([t[2] for t in kt], dim=1)
        self._refresh_sym()
        if has_bias:
            self.bias = torch.cat([p.bias if p.bias is not None else
                                   torch.zeros(p.out_features, dtype=self.dtype, device=self.scales.device)
                                   for p in parts])
        return self

    # ----------------------------------------------------------------- views
    def to_gptq(self):
        """(qweight, qzeros, scales) in auto_gptq layout (exact inverse of from_gptq)."""
        qk, zu, sc = self.kernel_tensors()
        qw, qz = kernel_to_gptq(qk, zu)
        return qw, qz, sc

    def dequantize(self, dtype=None) -> torch.Tensor:
        """W as [out_features, in_features] (nn.Linear's layout), on :attr:`compute_device`."""
        return dequantize_kernel(*self.kernel_tensors(), self.group_size, dtype=dtype or self.dtype).t()

    @property
    def _kernel_bytes(self) -> int:
        return self.qweight_k.numel() * 4 + self.zeros_u8.numel() + self.scales.numel() * 2

    @property
    def spilled(self) -> bool:
        """True when humming's repack is this layer's only 4-bit copy on its device: the kernel-layout
        tensors (``qweight_k``, ``zeros_u8``, ``scales``) then live in host memory, kept for the
        reference path, ``to_gptq``/``dequantize`` and :func:`humming_ops.release`."""
        return self._spilled

    @property
    def compute_device(self) -> torch.device:
        """Where the layer computes (the kernel-layout tensors' device unless they were spilled)."""
        return self._compute_device if self.spilled else self.scales.device

    def kernel_tensors(self, device=None):
        """(qweight_k, zeros_u8, scales) on ``device`` (default :attr:`compute_device`); a temporary
        copy when the layer's own are spilled to the host."""
        device = torch.device(device) if device is not None else self.compute_device
        return tuple(t if t.device == device else t.to(device) for t in (self.qweight_k, self.zeros_u8, self.scales))

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held on the compute device: the kernel-layout tensors unless spilled to the
        host, humming's repacked copy where one was made, the bias (see :attr:`host_bytes`)."""
        b = 0 if self.spilled else self._kernel_bytes
        b += self._humming_bytes  # humming's repacked copy, where one was made
        b += self._gemlite.nbytes if self._gemlite is not None else 0
        b += self._vllm.nbytes if self._vllm is not None else 0
        for t in (self.bf16_weight, self.tinygemm_weight, self.tinygemm_sz):
            if t is not None:
                b += t.numel() * t.element_size()
        return b + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    @property
    def host_bytes(self) -> int:
        """Bytes of this layer's weights kept in host memory (the spilled kernel-layout copy)."""
        return self._kernel_bytes if self.spilled else 0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, act=False)

    def forward_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``self(silu(gate) * up)`` for ``gate_up = [..., 2 * in_features]`` (gate first)."""
        return self._run(gate_up, act=True)

    def _run(self, x, act):
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m = x2.shape[0]
        if m == 0 or x2.dtype not in (torch.float16, torch.bfloat16) or not fast(x2.device):
            y = ref.w4a16_matmul(x2, *self.kernel_tensors(x2.device), self.group_size, bias=self.bias, act=act)
        else:
            y = self._dispatch(x2, act)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def _dispatch(self, x2, act):
        m = x2.shape[0]
        if self._vllm is not None:
            return self._run_vllm(x2, act)
        if self.spilled:  # humming's repack is the only 4-bit copy on the GPU: it serves every M
            if DISPATCH.record_stats:
                DISPATCH.stats[(self.in_features, self.out_features, m, "humming")] += 1
            return humming_ops.matmul(x2, self, act=act)
        tk = _triton_ops()
        kind, cfg = self._resolve(m, x2.device)
        if kind == "triton":
            return tk.w4a16_matmul(x2, self.qweight_k, self.zeros_u8, self.scales, self.group_size,
                                   bias=self.bias, act=act, cfg=cfg, sym_zero=self.sym_zero)
        a = tk.silu_mul(x2) if act else x2
        if kind == "bf16":
            return nn.functional.linear(a, self.bf16_weight, self.bias)
        if kind == "tinygemm":
            return tinygemm.matmul(a, self.tinygemm_weight, self.tinygemm_sz, self.group_size, bias=self.bias)
        if kind == "gemlite":
            return self._gemlite(a, bias=self.bias, matmul_type=cfg.get("matmul_type"))
        if kind == "humming":
            humming_ops.prepare(self)  # no-op once repacked (copies.prepare_humming does it at conversion time)
            return humming_ops.matmul(a, self)
        w = _scratch(self.in_features * self.out_features, x2.dtype, x2.device)
        w = w[: self.in_features * self.out_features].view(self.in_features, self.out_features)
        tk.dequant_w4(self.qweight_k, self.zeros_u8, self.scales, self.group_size, out=w, sym_zero=self.sym_zero)
        if self.bias is not None:
            return torch.addmm(self.bias.to(a.dtype), a, w)
        return a @ w

    def _run_vllm(self, x2, act):
        """The layer's vLLM repack at every ``M``: with the table's config where the table picks that
        kernel (Machete's schedule), its own default elsewhere; a BF16 copy where the table picks one."""
        m, k, n = x2.shape[0], self.in_features, self.out_features
        kind, cfg = DISPATCH.table.get((k, n, m_bucket(m))) or (self._vllm.kind, None)
        a = _triton_ops().silu_mul(x2) if act else x2
        if kind == "bf16" and self.bf16_weight is not None:
            run = "bf16"
            y = nn.functional.linear(a, self.bf16_weight, self.bias)
        else:
            run = self._vllm.kind
            y = self._vllm(a, bias=self.bias, cfg=cfg if kind == run else None)
        if DISPATCH.record_stats:
            DISPATCH.stats[(k, n, m, run)] += 1
        return y

    def _resolve(self, m: int, device):
        """The table's choice at ``m`` tokens, walked down its fallbacks to one this layer can run:
        a copy it holds, humming where it can be repacked now, else its own 4-bit tensors."""
        kind, cfg = DISPATCH.choose(m, self.in_features, self.out_features)
        while kind in COPY_KINDS and not self.has_copy(kind, cfg):
            fallback = (cfg or {}).get("fallback")
            kind, cfg = fallback if fallback else DISPATCH.default(m, self.in_features, self.out_features)
        if kind == "humming" and self._humming is None and (
                humming_ops.unsupported_reason(self) or not humming_ops.available(device)
                or torch.cuda.is_current_stream_capturing()):
            kind, cfg = DISPATCH.default(m, self.in_features, self.out_features)
        return kind, cfg


# --------------------------------------------------------------------------------------------
# model-level helpers
# --------------------------------------------------------------------------------------------


def linear_forward(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused tower's Linear call, without ``nn.Module.__call__``'s hook handling (the eager page
    path is host-bound: each microsecond per call costs ~0.15 ms per forward on the 4B)."""
    if isinstance(mod, nn.Linear):
        return nn.functional.linear(x, mod.weight, mod.bias)
    if isinstance(mod, W4A16Linear):
        return mod._run(x, act=False)
    return mod(x)


def is_quant_linear(mod: nn.Module) -> bool:
    """An auto-round / GPTQ style packed Linear (qweight, qzeros, scales buffers)."""
    return (not isinstance(mod, W4A16Linear) and all(hasattr(mod, a) for a in ("qweight", "qzeros", "scales"))
            and isinstance(getattr(mod, "qweight"), torch.Tensor))


def replace_quant_linears(model: nn.Module, dtype=None) -> int:
    """Swap every 4-bit auto-round/GPTQ QuantLinear in ``model`` for a :class:`W4A16Linear`; returns how
    many were swapped. ``dtype`` is the activation dtype (default: the model's). Layers of other widths
    (the frontier's W2/W3/W8 and mixed-width variants) have no kernel here and keep auto-round's
    QuantLinear, which computes with dequantized weights."""
    dtype = dtype or getattr(model, "dtype", torch.bfloat16)
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    names = [n for n, m in model.named_modules() if is_quant_linear(m) and getattr(m, "bits", 4) == 4]
    for name in names:
        model.set_submodule(name, W4A16Linear.from_quantlinear(model.get_submodule(name), dtype=dtype))
    return len(names)


@torch.no_grad()
def quantize_linears_rtn(module: nn.Module, group_size: int = 128, *, names=None) -> int:
    """Replace the nn.Linear children of ``module`` (all, or those whose qualified name ends with one
    of ``names``) by RTN-quantized :class:`W4A16Linear`, one at a time so memory stays flat."""
    todo = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)
            and m.in_features % group_size == 0 and m.out_features % 8 == 0
            and (names is None or any(n.endswith(s) for s in names))]
    for name in todo:
        lin = module.get_submodule(name)
        module.set_submodule(name, W4A16Linear.from_linear(lin, group_size))
        del lin
    return len(todo)
