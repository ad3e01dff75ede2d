"""Extra weight copies a tuned table may ask for, kept only where GPU memory allows.

Why a separate step: the tuner (:mod:`.autotune`) measures which kernel is fastest per layer shape
and token bucket, but some winners run on their own copy of the weights: BF16 cuBLAS (where no 4-bit
kernel beats it: the never-slower-than-BF16 rule), tinygemm (its own 4-bit layout), humming (its
repack), gemlite (its packing). Whether to pay that memory is a policy: by default a copy is kept only if all copies asked
for take at most :data:`COPY_FREE_FRACTION` of the free GPU memory; ``allow=False`` never keeps them
(memory first: those token counts run the entry's fallback, which needs no copy), ``True`` always.
Every decision is logged with its cost.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch
from torch import nn

from colquant.kernels import gemlite_ops, humming_ops, tinygemm, vllm_ops
from colquant.kernels.autotune import BF16_MARGIN, CANDIDATES, ensure_tuned, layer_shapes
from colquant.kernels.linear import COPY_KINDS, DISPATCH, VLLM_KINDS, W4A16Linear
from colquant.kernels.tune_cache import read_table

logger = logging.getLogger("colquant.kernels")

COPY_FREE_FRACTION = 0.5  # keep copies only if they take at most half the free GPU memory
# the fewest tokens one forward of a ColQwen3 tower carries (the query template and its 10 augmentation
# tokens alone are more): a copy that only serves token buckets below this is never used
MIN_TOKENS = 16


def _kinds_in_chain(choice) -> list[tuple[str, dict | None]]:
    """The choice and its fallbacks, in order."""
    chain = []
    while choice is not None:
        kind, cfg = choice
        chain.append((kind, cfg))
        choice = (cfg or {}).get("fallback") if kind in COPY_KINDS else None
    return chain


def wanted_copies(model: nn.Module, kind: str, min_tokens: int = MIN_TOKENS) -> dict[tuple[int, int], dict | None]:
    """(K, N) -> the cfg of the ``kind`` copy the table would run at some token bucket reaching
    ``min_tokens`` (its most frequent one): each entry's choice and fallbacks are walked until one is
    ``kind`` or a copy the layers hold."""
    held = {(m.in_features, m.out_features): m for m in model.modules() if isinstance(m, W4A16Linear)}
    seen: dict[tuple[int, int], collections.Counter] = collections.defaultdict(collections.Counter)
    cfgs: dict = {}
    for (k, n, bucket), choice in DISPATCH.table.items():
        if (k, n) not in held or bucket < min_tokens:
            continue
        for ck, cfg in _kinds_in_chain(choice):
            if ck == kind:
                key = (cfg or {}).get("inner_k_tiles")
                seen[(k, n)][key] += 1
                cfgs[(k, n, key)] = cfg
                break
            if ck in COPY_KINDS and held[(k, n)].has_copy(ck, cfg):
                break
    return {kn: cfgs[(*kn, c.most_common(1)[0][0])] for kn, c in seen.items()}


def _copy_bytes(kind: str, m: W4A16Linear) -> int:
    if kind == "bf16":
        return m.in_features * m.out_features * 2
    if kind == "gemlite":
        return gemlite_ops.nbytes(m.in_features, m.out_features, m.group_size, m.sym_zero == 8)
    groups = m.in_features // m.group_size
    return m.in_features * m.out_features // 2 + groups * m.out_features * 2 * 2  # weights + bf16 scales/zeros


def keep_copies(model: nn.Module, kind: str, *, allow: bool | None = None, min_tokens: int = MIN_TOKENS) -> dict:
    """Give the 4-bit layers of ``model`` the ``kind`` copy (``"bf16"``, ``"tinygemm"``, ``"gemlite"``) the tuned
    table asks for at ``min_tokens`` or more. Returns what was decided (layers, bytes, kept) and logs it."""
    wanted = wanted_copies(model, kind, min_tokens)
    layers = [(m, wanted[(m.in_features, m.out_features)]) for m in model.modules()
              if isinstance(m, W4A16Linear) and (m.in_features, m.out_features) in wanted
              and not m.has_copy(kind, wanted[(m.in_features, m.out_features)])]
    need = sum(_copy_bytes(kind, m) for m, _ in layers)
    info = dict(layers=len(layers), bytes=need, kept=False)
    if not layers:
        return info
    device = layers[0][0].compute_device
    missing = _copy_unavailable(kind, device)
    if missing:  # a table tuned elsewhere (or loaded from JSON) names a kernel that cannot run here
        logger.warning("colquant.kernels: the tuned table runs %s for %d layers, but %s: those token "
                       "counts run the next-best kernel", kind, len(layers), missing)
        return dict(info, reason=missing)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    keep = need <= COPY_FREE_FRACTION * free if allow is None else allow
    if keep:
        for m, cfg in layers:
            if kind == "bf16":
                m.keep_bf16_copy()
            elif kind == "gemlite":
                m.keep_gemlite_copy()
            else:
                m.keep_tinygemm_copy((cfg or {}).get("inner_k_tiles", 8))
    info.update(kept=bool(keep), free_bytes=int(free))
    why = "not allowed" if allow is False else f"only {free / 2**20:.0f} MiB free"
    logger.warning("colquant.kernels: the tuned table runs %s on %s at some token counts for %d layers; %s",
                   kind, COPY_KINDS[kind], len(layers),
                   f"kept them ({need / 2**20:.0f} MiB more GPU memory)" if keep else
                   f"not kept ({need / 2**20:.0f} MiB; {why}): those token counts run the next-best kernel")
    return info


def _copy_unavailable(kind: str, device: torch.device) -> str | None:
    """Why a ``kind`` copy cannot be made on ``device`` (None: it can)."""
    if kind == "tinygemm":
        return tinygemm.op_missing()
    if kind == "gemlite":
        return gemlite_ops.unavailable_reason(device)
    return None


def prepare_humming(model: nn.Module, *, only_dispatched: bool = True, single_copy: bool | None = None) -> dict:
    """Repack every symmetric W4A16Linear of ``model`` whose (K, N) the dispatcher sends to humming for
    some token count (all of them with ``only_dispatched=False``). Returns counts and bytes
    (``bytes``: humming's copies; ``host_bytes``: kernel-layout copies moved to the host)."""
    shapes = {(k, n) for (k, n, _), c in DISPATCH.table.items() if c[0] == "humming"}
    info = dict(prepared=0, skipped=0, bytes=0, host_bytes=0, reason=None)
    mods = [m for m in model.modules() if isinstance(m, W4A16Linear)]
    if not mods:
        return info
    info["reason"] = humming_ops.unavailable_reason(mods[0].compute_device)
    if info["reason"]:
        return info
    for m in mods:
        if only_dispatched and (m.in_features, m.out_features) not in shapes:
            continue
        if humming_ops.unsupported_reason(m):
            info["skipped"] += 1
            continue
        info["bytes"] += humming_ops.prepare(m, single_copy=single_copy)
        info["host_bytes"] += m.host_bytes
        info["prepared"] += 1
    return info


def vllm_repacks(entries: list[dict], min_tokens: int = MIN_TOKENS) -> dict[tuple[int, int], str]:
    """(K, N) -> the vLLM kernel (``"machete"`` / ``"marlin"``) a layer of that shape should be repacked
    for: one the tuned ``entries`` pick at some bucket reaching ``min_tokens``, and that is within
    :data:`~.autotune.BF16_MARGIN` of the layer's own kernels (Triton, dequant+cuBLAS) at *every* such
    bucket, because a repacked layer runs it at every token count (one 4-bit copy). The faster in
    total where both qualify."""
    own = {c.name for c in CANDIDATES if c.kind in ("triton", "dequant+cublas")}
    name_of = {c.kind: c.name for c in CANDIDATES if c.kind in VLLM_KINDS}
    by_shape: dict[tuple[int, int], list[dict]] = collections.defaultdict(list)
    for e in entries:
        if min_tokens <= e["M_bucket"] < 1 << 62:
            by_shape[(e["K"], e["N"])].append(e)
    chosen = {}
    for shape, rows in by_shape.items():
        totals = {}
        for kind, name in name_of.items():
            if not any(kind in (e["kind"], e.get("fallback_name")) or e["name"] == name for e in rows):
                continue
            times = [(e["timed_us"].get(name), min((t for c, t in e["timed_us"].items() if c in own),
                                                   default=None)) for e in rows]
            if all(t is not None and o is not None and t <= BF16_MARGIN * o for t, o in times):
                totals[kind] = sum(t for t, _ in times)
        if totals:
            chosen[shape] = min(totals, key=totals.get)
    return chosen


def prepare_vllm(model: nn.Module, entries: list[dict], min_tokens: int = MIN_TOKENS) -> dict:
    """Repack the symmetric W4A16Linears of ``model`` whose shape :func:`vllm_repacks` assigns a vLLM
    kernel (their kernel-layout tensors move to the host). Returns counts, bytes and per-kind layers."""
    plan = vllm_repacks(entries, min_tokens)
    info = dict(prepared=0, skipped=0, bytes=0, kinds={}, reason=None)
    mods = [m for m in model.modules() if isinstance(m, W4A16Linear) and (m.in_features, m.out_features) in plan]
    for m in mods:
        kind = plan[(m.in_features, m.out_features)]
        why = vllm_ops.unavailable_reason(m.compute_device, kind) or vllm_ops.layer_unsupported_reason(
            m.in_features, m.out_features, m.group_size, m.sym_zero == 8, kind)
        if why:
            info["skipped"] += 1
            info["reason"] = why
            continue
        info["bytes"] += vllm_ops.prepare(m, kind)
        info["prepared"] += 1
        info["kinds"][kind] = info["kinds"].get(kind, 0) + 1
    if mods:
        logger.info("colquant.kernels: %d layers repacked for vLLM's kernels %s (%.0f MiB, their own 4-bit "
                    "copies moved to the host)%s", info["prepared"], info["kinds"], info["bytes"] / 2**20,
                    f"; {info['skipped']} skipped: {info['reason']}" if info["skipped"] else "")
    return info


def prepare_dispatch(model: nn.Module, device: torch.device | str, *, bf16_copy: bool | None = None,
                     cache_dir: Path | str | None = None, min_tokens: int = MIN_TOKENS) -> dict:
    """What :func:`accelerate_model` does for the 4-bit layers: the tuned table, then the copies it
    asks for: BF16 first (``bf16_copy``, see :func:`keep_copies`), then tinygemm's and gemlite's where no
    BF16 copy serves those token counts (each about a quarter of a BF16 copy), then vLLM's repacks
    (:func:`prepare_vllm`: they replace the layer's own 4-bit copy on the GPU)."""
    shapes = layer_shapes(model)
    if not shapes:
        return dict(tuned=False, reason="no 4-bit layers")
    info = ensure_tuned(shapes, device, cache_dir=cache_dir)
    if "reason" not in info:
        info["bf16_copy"] = keep_copies(model, "bf16", allow=bf16_copy, min_tokens=min_tokens)
        info["tinygemm_copy"] = keep_copies(model, "tinygemm", min_tokens=min_tokens)
        info["gemlite_copy"] = keep_copies(model, "gemlite", min_tokens=min_tokens)
        info["vllm_repack"] = prepare_vllm(model, read_table(Path(info["cache"]), info["key"]) or [], min_tokens)
    return info
