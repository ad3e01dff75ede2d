"""Finding, checking and loading ColQwen3 checkpoints (hub id or local directory).

`load` is the one entry point the notebooks, evaluation and sweeps use, for the real 4B model, the
embedded tiny model and the project's quantized variants alike. Problems are reported as
`CheckpointError` naming the file or tensors at fault and what to do about it, before transformers
would fall back to random initialisation or fail deep inside a shard reader.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from colquant.model import ColQwen3
from colquant.processing import ColQwen3Processor

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "TomoroAI/tomoro-colqwen3-embed-4b"
HUB_PROBE_TIMEOUT_S = 3.0
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.py"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreachable, incomplete or does not match the architecture."""


def resolve_checkpoint(model_id_or_path: str | Path, revision: str | None = None) -> Path:
    """Local directory as is; otherwise a hub id, downloaded when online or read from the local cache."""
    candidate = Path(model_id_or_path).expanduser()
    if candidate.exists():
        if not candidate.is_dir():
            raise CheckpointError(f"{candidate} is a file; pass the checkpoint directory that holds config.json")
        return candidate
    text = str(model_id_or_path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(
            f"no checkpoint directory at {candidate} and {text!r} is not a hub id (owner/name). "
            "Pass an existing directory, a hub id such as "
            f"{DEFAULT_MODEL_ID!r}, or build the offline default with `colquant.tiny.build(path)`."
        )
    return _download(text, revision)


def snapshot_revision(path: str | Path) -> str | None:
    """The commit of a checkpoint read from a huggingface_hub cache (`.../snapshots/<commit>`), else None."""
    path = Path(path)
    return path.name if path.parent.name == "snapshots" else None


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


def verify_checkpoint(path: Path) -> None:
    """Check the files the hub layout promises are there and readable: config, index, every shard."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json: it is not a model checkpoint directory")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "colqwen3":
        raise CheckpointError(
            f"{config_file} says model_type={config.get('model_type')!r}, expected 'colqwen3'. "
            "For hub repos with their own code use load(..., trust_remote_code=True)."
        )
    for shard in _shard_files(path):
        _verify_shard(shard)


def _shard_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = [path / name for name in sorted(set(weight_map.values()))]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    return shards


def _verify_shard(shard: Path) -> None:
    """Open the shard's header: safetensors checks it against the file size, so a truncated
    download fails here with the shard's name instead of deep inside from_pretrained."""
    if not shard.exists():
        raise CheckpointError(f"shard {shard.name} is listed in the index but missing from {shard.parent}: re-download it")
    try:
        with safe_open(str(shard), framework="pt"):
            pass
    except Exception as error:  # safetensors raises its own SafetensorError type
        raise CheckpointError(
            f"shard {shard.name} in {shard.parent} is truncated or corrupt ({error}); delete it and download again"
        ) from error


def load(
    model_id_or_path: str | Path = DEFAULT_MODEL_ID,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = None,
    max_num_visual_tokens: int = 1280,
    revision: str | None = None,
    trust_remote_code: bool = False,
    accelerate: bool | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load (model, processor) in eval mode.

    Native path (default): the project's ColQwen3 reads the checkpoint with strict key checks.
    `trust_remote_code=True` instead runs the hub's own code (needs a transformers it supports) for
    cross-checks against the native implementation.

    `accelerate` (default: on CUDA) swaps the text tower for the project's fused path: 4-bit layers
    run the Triton W4A16 kernels, q/k/v and gate/up are fused for both precisions, and short
    queries replay CUDA graphs (`colquant.kernels`). Where that cannot run, a warning names why and
    the model keeps transformers' forward.
    """
    path = resolve_checkpoint(model_id_or_path, revision)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    if trust_remote_code:
        return _load_remote_code(path, torch_dtype, device, max_num_visual_tokens)
    verify_checkpoint(path)
    # Loading straight onto the GPU lets transformers' auto-round integration pick a CUDA kernel.
    device_map = str(device) if device.type == "cuda" else None
    model, info = ColQwen3.from_pretrained(
        str(path), dtype=torch_dtype, device_map=device_map, output_loading_info=True
    )
    _raise_on_key_mismatch(path, info)
    model = model.to(device).eval()
    accelerate = device.type == "cuda" if accelerate is None else accelerate
    if accelerate:
        from colquant.kernels import accelerate_model

        accelerate_model(model)
    processor = ColQwen3Processor.from_pretrained(path, max_num_visual_tokens=max_num_visual_tokens)
    return model, processor


def _raise_on_key_mismatch(path: Path, info: dict[str, Any]) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(name) for name in info.get(kind, ()))
        if names:
            shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise CheckpointError(
            f"{path} does not match the ColQwen3 architecture ({'; '.join(problems)}). "
            "The checkpoint is incomplete or from another model; re-download it or check the model id."
        )


def _load_remote_code(
    path: Path, dtype: torch.dtype, device: torch.device, max_num_visual_tokens: int
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(path), dtype=dtype, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(
        str(path), trust_remote_code=True, max_num_visual_tokens=max_num_visual_tokens
    )
    return model, processor
