"""`colquant.load`: a checkpoint read (`colquant.retriever.checkpoint`), then made fast (`colquant.kernels`).

The one entry point the notebooks, evaluation, sweeps, the bench and users call, for the real 4B
model, the embedded tiny model and the project's quantized variants alike. Reading knows nothing of
kernels; this module composes the two: it checks every argument before any download or read, reads
the checkpoint, then stores the token embeddings as asked, attaches the fused FP8 kernels to FP8
layers and, on CUDA by default, installs the fused text and vision towers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from colquant.basics.arguments import require_flag
from colquant.retriever import fp8
from colquant.retriever.checkpoint import (
    DEFAULT_MODEL_ID,
    read_model,
    read_remote_code,
    resolve_checkpoint,
    resolve_device,
    torch_dtype,
    verify_checkpoint,
)
from colquant.kernels import accelerate_model
from colquant.kernels import fp8_dispatch
from colquant.kernels.embedding import EMBEDDINGS, quantize_embeddings
from colquant.kernels.w4a8 import check_activations, checkpoint_problem, convert_model, device_problem
from colquant.retriever.weight_checks import CheckpointError, is_fp8_config

log = logging.getLogger(__name__)


def load(
    model_id_or_path: str | Path = DEFAULT_MODEL_ID,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = "auto",
    max_num_visual_tokens: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    accelerate: bool | None = None,
    bf16_copy: bool | None = None,
    embeddings: str = "bf16",
    fp8_accumulation: str | None = None,
    activations: str = "bf16",
) -> tuple[torch.nn.Module, Any]:
    """Load (model, processor) in eval mode, on the GPU when one is present (`device="auto"`).

    Native path (default): the project's ColQwen3 reads the checkpoint with strict key checks.
    `trust_remote_code=True` instead runs the hub's own code (needs a transformers it supports) for
    cross-checks against the native implementation.

    `device="auto"` is CUDA when present, else CPU. `accelerate` (default: on CUDA) swaps the text tower for the
    project's fused path: each 4-bit layer runs the kernel tuned fastest for this GPU, its shape and
    token count (tuned once, cached on disk: `colquant tune`), q/k/v and gate/up are fused for both
    precisions, and short queries replay CUDA graphs (`colquant.kernels`). Where no 4-bit kernel beats
    BF16 cuBLAS, `bf16_copy=None` keeps a BF16 copy of those layers if memory allows (speed first: the
    4-bit model is then as fast as BF16 but larger than it on the GPU), `False` never does (memory
    first: about 0.42x BF16's memory, slower at small batches), `True` always. Where the fused path
    cannot run, a warning names why and the model keeps transformers' forward.

    `embeddings="int8"` stores the text tower's token-embedding table as int8 with one scale per
    vocabulary row (`colquant.kernels.embedding`): 371 MiB less on the 4B, for a rounding error of at
    most absmax(row)/254 per value; the memory-first setting together with `bf16_copy=False`. The
    default `"bf16"` keeps the table as loaded.

    `fp8_accumulation` (FP8 variants only): how the FP8 GEMMs accumulate on Hopper-class GPUs,
    `"fast"` (the default: as vLLM serves FP8 checkpoints) or `"precise"` (fp32 promotion, slower);
    `fp8.set_accumulation` changes it on a loaded model. FP8 layers run the fused FP8 kernels wherever
    they can, with or without `accelerate`.

    `activations="fp8"` runs a 4-bit auto-round/GPTQ symmetric checkpoint (group 128) as W4A8: the same
    int4 weights re-encoded with e4m3 group scales, per-token e4m3 activations, FP8 tensor cores
    (`colquant.kernels.w4a8`). On CUDA every 4-bit text layer runs vLLM's CUTLASS W4A8 kernel (Hopper,
    vLLM 0.26.0's library), refused with the reason where it cannot run; on CPU a dequantized reference of
    exactly its arithmetic (`model._colquant_w4a8["runs"]` says which). The default `"bf16"` runs the
    checkpoint as saved.

    `max_num_visual_tokens` (visual tokens per page) defaults to what the checkpoint saved in
    `colquant_processor.json`, else the reference's 1280.
    """
    _check_embeddings(embeddings)
    _check_activations(activations, trust_remote_code, bf16_copy)
    require_flag("trust_remote_code", trust_remote_code)
    require_flag("accelerate", accelerate, none_means="on with CUDA, off on CPU")
    require_flag("bf16_copy", bf16_copy, none_means="a BF16 copy where BF16 is faster and memory allows")
    weights_dtype = torch_dtype(dtype)
    device = resolve_device(device)
    if activations == "fp8":
        _check_w4a8_device(device, weights_dtype)
    path = resolve_checkpoint(model_id_or_path, revision)  # after the checks: a download can take minutes
    if trust_remote_code:
        model, processor = read_remote_code(path, weights_dtype, device, max_num_visual_tokens)
        _store_embeddings(model, embeddings)
        return model, processor
    config = verify_checkpoint(path)
    is_fp8 = is_fp8_config(config.get("quantization_config"))
    _check_fp8_accumulation(fp8_accumulation, is_fp8, path)
    if activations == "fp8":
        _check_w4a8_checkpoint(config.get("quantization_config"), path)
    model, processor = read_model(path, config, weights_dtype, device, max_num_visual_tokens)
    _store_embeddings(model, embeddings)
    if is_fp8:
        fp8.set_accumulation(model, fp8_accumulation or fp8.DEFAULT_ACCUMULATION)
        fp8_dispatch.attach(model)
    accelerate = device.type == "cuda" if accelerate is None else accelerate
    if activations == "fp8":
        _run_as_w4a8(model, fuse=accelerate)
    if accelerate:
        accelerate_model(model, bf16_copy=bf16_copy)
    return model, processor


def _check_embeddings(embeddings: str) -> None:
    """Before any loading: a typo would otherwise cost a multi-GB load before failing."""
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings={embeddings!r} is not a token-embedding storage; use one of "
                         f"{', '.join(map(repr, EMBEDDINGS))} ('int8': one scale per vocabulary row, half the memory)")


def _check_activations(activations: str, trust_remote_code: bool, bf16_copy: bool | None) -> None:
    """Before any loading: the value, and the options W4A8 cannot be combined with."""
    check_activations(activations)
    if activations == "fp8" and trust_remote_code:
        raise ValueError("activations='fp8' runs the project's own ColQwen3 (its W4A8 layers); the hub's remote code "
                         "knows none: leave trust_remote_code off")
    if activations == "fp8" and bf16_copy:
        raise ValueError("bf16_copy=True keeps BF16 copies of W4A16 layers; W4A8 runs every 4-bit layer on its single "
                         "int4 copy: leave bf16_copy unset")


def _check_w4a8_device(device: torch.device, dtype: torch.dtype) -> None:
    """Before the download and the load: no W4A8 kernel here is known without reading a weight."""
    problem = device_problem(device, dtype)
    if problem:
        raise RuntimeError(f"activations='fp8' cannot run here: {problem}. Load with activations='bf16' (W4A16), "
                           "or on device='cpu' for W4A8's dequantized reference")


def _check_w4a8_checkpoint(quantization: dict[str, Any] | None, path: Path) -> None:
    problem = checkpoint_problem(quantization)
    if problem:
        raise CheckpointError(f"activations='fp8' runs a 4-bit auto-round/GPTQ symmetric checkpoint as W4A8, and "
                              f"{path} is not one: {problem}")


def _run_as_w4a8(model: torch.nn.Module, *, fuse: bool) -> None:
    """Every 4-bit text layer as W4A8 (`_check_w4a8_*` cleared the device and checkpoint); the model
    says what runs, the CUDA kernel or the CPU reference."""
    try:
        model._colquant_w4a8 = convert_model(model, fuse=fuse)
    except ValueError as error:  # a layer the kernel cannot take
        raise CheckpointError(f"activations='fp8': {error}") from error
    log.info("W4A8: %s", model._colquant_w4a8)


def _check_fp8_accumulation(accumulation: str | None, is_fp8: bool, path: Path) -> None:
    """Before the weights load: a bad value, or one given for a checkpoint without FP8 layers."""
    if accumulation is None:
        return
    fp8.check_accumulation(accumulation)
    if not is_fp8:
        raise ValueError(f"fp8_accumulation={accumulation!r} applies to FP8 variants only, and {path} is not one "
                         "(its config has no compressed-tensors float-quantized quantization_config): leave it unset")


def _store_embeddings(model: torch.nn.Module, embeddings: str) -> None:
    """Quantize the token-embedding table when asked (`_check_embeddings` validated the value)."""
    if embeddings == "int8":
        freed = quantize_embeddings(model)
        log.info("token embeddings stored as int8 per row: %.0f MiB freed", freed / 2**20)
