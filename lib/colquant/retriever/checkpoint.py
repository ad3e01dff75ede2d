"""Finding, checking and reading ColQwen3 checkpoints (hub id or local directory).

`colquant.load` (:mod:`colquant.inference.loading`) reads every checkpoint through here, the real 4B model, the
embedded tiny model and the project's quantized variants alike, then adds the fast path; nothing here
knows of kernels. Problems are reported as `CheckpointError` naming the file or tensors at fault and
what to do about it, before transformers would fall back to random initialisation or fail deep
inside a shard reader.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch

from colquant.basics.arguments import usable_device
from colquant.retriever import fp8
from colquant.retriever.model import ColQwen3, ColQwen3Config
from colquant.retriever.processing import DEFAULT_MAX_NUM_VISUAL_TOKENS, ColQwen3Processor
from colquant.retriever.weight_checks import FLOATING_DTYPES, CheckpointError, is_fp8_config, read_json_object, verify_tensors

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


def read_model(path: Path, config: dict[str, Any], dtype: torch.dtype, device: torch.device,
               max_num_visual_tokens: int | None = None) -> tuple[torch.nn.Module, ColQwen3Processor]:
    """(model, processor) of a checkpoint `verify_checkpoint` passed (its `config`), in eval mode on
    `device`, the processor attached to the model (`model.encode_queries` needs no processor argument).

    The project's ColQwen3 reads the weights with strict key checks; W8A8 FP8 checkpoints (the
    compressed-tensors layout) get `FP8Linear` layers, computing their reference until the fast path
    attaches its kernels. `max_num_visual_tokens` (visual tokens per page) defaults to what the
    checkpoint saved in `colquant_processor.json`, else the reference's 1280."""
    if is_fp8_config(config.get("quantization_config")):
        model = fp8.load_model(path, dtype, device)
    else:
        # Loading straight onto the GPU lets transformers' auto-round integration pick a CUDA kernel.
        device_map = str(device) if device.type == "cuda" else None
        # strict: refused on missing, unexpected or non-finite tensors (colquant.retriever.weight_checks)
        model = ColQwen3.from_pretrained(str(path), dtype=dtype, device_map=device_map)
    model = model.to(device).eval()
    processor = ColQwen3Processor.from_pretrained(path, max_num_visual_tokens=max_num_visual_tokens)
    model.processor = processor
    return model, processor


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A weight dtype given by name (`bfloat16`, ...) or as a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in FLOATING_DTYPES:
        raise CheckpointError(f"dtype={dtype!r} is not a weight dtype; use one of {', '.join(sorted(FLOATING_DTYPES))}")
    return getattr(torch, dtype)


def read_remote_code(
    path: Path, dtype: torch.dtype, device: torch.device, max_num_visual_tokens: int | None
) -> tuple[torch.nn.Module, Any]:
    """(model, processor) built by the checkpoint's own code (`trust_remote_code`), for cross-checks."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(path), dtype=dtype, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(
        str(path), trust_remote_code=True, max_num_visual_tokens=max_num_visual_tokens or DEFAULT_MAX_NUM_VISUAL_TOKENS
    )
    return model, processor
