"""Finding, checking and loading ColQwen3 checkpoints (hub id or local directory).

`load` is the one entry point the notebooks, evaluation and sweeps use, for the real 4B model, the
embedded tiny model and the project's quantized variants alike. Problems are reported as
`CheckpointError` naming the file or tensors at fault and what to do about it, before transformers
would fall back to random initialisation or fail deep inside a shard reader.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch

from colquant import fp8
from colquant.arguments import require_flag, usable_device
from colquant.model import ColQwen3, ColQwen3Config
from colquant.processing import DEFAULT_MAX_NUM_VISUAL_TOKENS, ColQwen3Processor
from colquant.weight_checks import FLOATING_DTYPES, CheckpointError, is_fp8_config, read_json_object, verify_tensors

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "TomoroAI/tomoro-colqwen3-embed-4b"
HUB_PROBE_TIMEOUT_S = 3.0
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.py"]
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


def resolve_checkpoint(model_id_or_path: str | Path, revision: str | None = None) -> Path:
    """Local directory as is; otherwise a hub id, downloaded when online or read from the local cache."""
    candidate = Path(model_id_or_path).expanduser()
    if candidate.exists():
        if not candidate.is_dir():
            raise CheckpointError(f"{candidate} is a file; pass the checkpoint directory that holds config.json")
        return candidate
    text = str(model_id_or_path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or candidate.parent.is_dir():
        raise CheckpointError(
            f"no checkpoint directory at {candidate.absolute()}: the local folder does not exist"
            f"{_nearby_folders(candidate)}. Pass an existing directory, a hub id such as "
            f"{DEFAULT_MODEL_ID!r}, or build the offline default with `colquant.tiny.build(path)`."
        )
    return _download(text, revision)


def snapshot_revision(path: str | Path) -> str | None:
    """The commit of a checkpoint read from a huggingface_hub cache (`.../snapshots/<commit>`), else None."""
    path = Path(path)
    return path.name if path.parent.name == "snapshots" else None


def _nearby_folders(candidate: Path) -> str:
    """The folders beside a missing one, since a typo in the last part is the usual cause."""
    if not candidate.parent.is_dir():
        return f" (nor does its parent {candidate.parent})"
    siblings = sorted(p.name for p in candidate.parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    return f" ({candidate.parent} holds: {', '.join(siblings[:10]) or 'no folders'})"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` is CUDA when this machine has it, else CPU; None is CPU; anything else as given,
    once this machine is known to have it (`arguments.usable_device`)."""
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(device)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set or huggingface.co cannot be reached within a few seconds.

    Asking first avoids minutes of retries with backoff inside huggingface_hub and datasets on
    machines with no route to the hub (CI, air-gapped GPU boxes).
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return True
    return False


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS, local_files_only=offline
            )
        )
    except RepositoryNotFoundError as error:
        raise CheckpointError(f"the hub has no model {repo_id!r}: check the id and your access token") from error
    except (LocalEntryNotFoundError, OSError) as error:
        raise CheckpointError(
            f"cannot get {repo_id!r}: the hub is unreachable and the model is not in the local cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}). Fix: on a machine with hub access run "
            f"`hf download {repo_id}` (or copy its directory here and pass the path), or use the offline "
            "default `params/tiny.yaml`."
        ) from error


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check what the hub layout promises before transformers reads it: a config object, the
    tokenizer and image-processor files, the index and every shard, and each tensor's shape and
    dtype against the architecture (and the 4-bit packing) the config describes. Returns the config."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json: it is not a model checkpoint directory")
    config = read_json_object(config_file, "re-download the checkpoint or restore config.json from its source")
    if config.get("model_type") != "colqwen3":
        raise CheckpointError(
            f"{config_file} says model_type={config.get('model_type')!r}, expected 'colqwen3'. "
            "For hub repos with their own code use load(..., trust_remote_code=True)."
        )
    missing = [name for name in PROCESSOR_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}: the processor cannot be built without them. Re-download the "
            "checkpoint, or copy them from its base model (`processor.save_pretrained(path)` writes them)."
        )
    verify_tensors(path, ColQwen3Config.from_pretrained(str(path)), ColQwen3)
    return config


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
    `fp8.set_accumulation` changes it on a loaded model.

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
    torch_dtype = _torch_dtype(dtype)
    device = resolve_device(device)
    if activations == "fp8":
        _check_w4a8_device(device, torch_dtype)
    path = resolve_checkpoint(model_id_or_path, revision)  # after the checks: a download can take minutes
    if trust_remote_code:
        model, processor = _load_remote_code(path, torch_dtype, device, max_num_visual_tokens)
        _store_embeddings(model, embeddings)
        return model, processor
    config = verify_checkpoint(path)
    is_fp8 = is_fp8_config(config.get("quantization_config"))
    _check_fp8_accumulation(fp8_accumulation, is_fp8, path)
    if activations == "fp8":
        _check_w4a8_checkpoint(config.get("quantization_config"), path)
    if is_fp8:
        model = fp8.load_model(path, torch_dtype, device)  # W8A8 FP8 (compressed-tensors layout)
        fp8.set_accumulation(model, fp8_accumulation or fp8.DEFAULT_ACCUMULATION)
    else:
        # Loading straight onto the GPU lets transformers' auto-round integration pick a CUDA kernel.
        device_map = str(device) if device.type == "cuda" else None
        # strict: refused on missing, unexpected or non-finite tensors (colquant.weight_checks)
        model = ColQwen3.from_pretrained(str(path), dtype=torch_dtype, device_map=device_map)
    model = model.to(device).eval()
    _store_embeddings(model, embeddings)
    accelerate = device.type == "cuda" if accelerate is None else accelerate
    if activations == "fp8":
        _run_as_w4a8(model, fuse=accelerate)
    if accelerate:
        from colquant.kernels import accelerate_model

        fp8.fuse_text_projections(model)  # no-op without FP8 layers
        accelerate_model(model, bf16_copy=bf16_copy)
    processor = ColQwen3Processor.from_pretrained(path, max_num_visual_tokens=max_num_visual_tokens)
    model.processor = processor  # so model.encode_queries/encode_pages need no processor argument
    return model, processor


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in FLOATING_DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not a weight dtype; use one of {', '.join(sorted(FLOATING_DTYPES))}")
    return getattr(torch, dtype)


def _check_embeddings(embeddings: str) -> None:
    """Before any loading: a typo would otherwise cost a multi-GB load before failing."""
    from colquant.kernels.embedding import EMBEDDINGS

    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings={embeddings!r} is not a token-embedding storage; use one of "
                         f"{', '.join(map(repr, EMBEDDINGS))} ('int8': one scale per vocabulary row, half the memory)")


def _check_activations(activations: str, trust_remote_code: bool, bf16_copy: bool | None) -> None:
    """Before any loading: the value, and the options W4A8 cannot be combined with."""
    from colquant.kernels.w4a8 import check_activations

    check_activations(activations)
    if activations == "fp8" and trust_remote_code:
        raise ValueError("activations='fp8' runs the project's own ColQwen3 (its W4A8 layers); the hub's remote code "
                         "knows none: leave trust_remote_code off")
    if activations == "fp8" and bf16_copy:
        raise ValueError("bf16_copy=True keeps BF16 copies of W4A16 layers; W4A8 runs every 4-bit layer on its single "
                         "int4 copy: leave bf16_copy unset")


def _check_w4a8_device(device: torch.device, dtype: torch.dtype) -> None:
    """Before the download and the load: no W4A8 kernel here is known without reading a weight."""
    from colquant.kernels.w4a8 import device_problem

    problem = device_problem(device, dtype)
    if problem:
        raise RuntimeError(f"activations='fp8' cannot run here: {problem}. Load with activations='bf16' (W4A16), "
                           "or on device='cpu' for W4A8's dequantized reference")


def _check_w4a8_checkpoint(quantization: dict[str, Any] | None, path: Path) -> None:
    from colquant.kernels.w4a8 import checkpoint_problem

    problem = checkpoint_problem(quantization)
    if problem:
        raise CheckpointError(f"activations='fp8' runs a 4-bit auto-round/GPTQ symmetric checkpoint as W4A8, and "
                              f"{path} is not one: {problem}")


def _run_as_w4a8(model: torch.nn.Module, *, fuse: bool) -> None:
    """Every 4-bit text layer as W4A8 (`_check_w4a8_*` cleared the device and checkpoint); the model
    says what runs, the CUDA kernel or the CPU reference."""
    from colquant.kernels.w4a8 import convert_model

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
        from colquant.kernels.embedding import quantize_embeddings

        freed = quantize_embeddings(model)
        log.info("token embeddings stored as int8 per row: %.0f MiB freed", freed / 2**20)


def _load_remote_code(
    path: Path, dtype: torch.dtype, device: torch.device, max_num_visual_tokens: int | None
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(path), dtype=dtype, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(
        str(path), trust_remote_code=True, max_num_visual_tokens=max_num_visual_tokens or DEFAULT_MAX_NUM_VISUAL_TOKENS
    )
    return model, processor
