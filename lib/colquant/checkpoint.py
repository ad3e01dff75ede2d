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
import re
import socket
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from colquant import fp8
from colquant.arguments import require_flag, usable_device
from colquant.model import ColQwen3, ColQwen3Config
from colquant.processing import DEFAULT_MAX_NUM_VISUAL_TOKENS, ColQwen3Processor

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "TomoroAI/tomoro-colqwen3-embed-4b"
HUB_PROBE_TIMEOUT_S = 3.0
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.py"]
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
SHARD_NAME = re.compile(r"model-(?P<number>\d+)-of-(?P<total>\d+)\.safetensors")
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
                      "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn"}
FLOATING_DTYPES = frozenset({"bfloat16", "float16", "float32"})
INT32 = frozenset({"int32"})


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
    config = _read_json_object(config_file, "re-download the checkpoint or restore config.json from its source")
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
    shards = _shard_files(path)
    for shard in shards:
        _verify_shard(shard)
    _verify_tensors(path, shards)
    return config


def _read_json_object(file: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); {fix}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, not an object of settings; {fix}")
    return data


def _shard_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        index = _read_json_object(index_file, "re-download it (it maps every tensor to its shard)")
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{index_file} has no weight_map object; re-download it")
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    shards = sorted(path.glob("*.safetensors"))
    numbered = [match for shard in shards if (match := SHARD_NAME.fullmatch(shard.name))]
    if numbered:
        total = int(numbered[0]["total"])
        absent = sorted(set(range(1, total + 1)) - {int(match["number"]) for match in numbered})
        gaps = f"; shard(s) {', '.join(map(str, absent))} of {total} are missing too" if absent else ""
        raise CheckpointError(
            f"{path} holds sharded weights (model-*-of-{total:05d}.safetensors) but no model.safetensors.index.json"
            f"{gaps}. Re-download the checkpoint: without the index the shards cannot be read as one model."
        )
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


def _verify_tensors(path: Path, shards: list[Path]) -> None:
    """Every tensor's shape and dtype as the config's architecture (and its 4-bit packing, for a
    quantized checkpoint) requires: transformers would otherwise cast a wrong dtype silently and
    report a wrong shape as a bare RuntimeError. Reads only the shards' headers."""
    config = ColQwen3Config.from_pretrained(str(path))
    expected = _expected_tensors(config)
    problems, fixes = [], []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as reader:
            for name in reader.keys():
                header = reader.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(header.get_dtype(), header.get_dtype())
                problem = _tensor_problem(name, tuple(header.get_shape()), dtype, expected)
                if problem:
                    problems.append(f"{shard.name}: {problem[0]}")
                    fixes += [problem[1]] if problem[1] not in fixes else []
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} tensors in all)" if len(problems) > 4 else "")
        raise CheckpointError(f"{path} does not match its config.json: {shown}. {' '.join(fixes)}")


class _Expected(NamedTuple):
    """What one tensor must look like, and what to do when it does not."""

    shape: tuple[int, ...]
    dtypes: frozenset[str]
    shape_fix: str
    dtype_fix: str


def _expected_tensors(config: ColQwen3Config) -> dict[str, _Expected]:
    """Per tensor name, from a weightless (meta-device) model of the config; a quantized Linear's
    packed tensors follow from its widths and the config's quantization settings."""
    with torch.device("meta"):
        reference = ColQwen3(config)
    declared = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
    shape_fix = "The checkpoint is corrupt or from another model than its config.json describes: re-download it."
    dtype_fix = (f"config.json declares dtype {declared or 'none'} and loading would cast silently: "
                 "re-save the checkpoint in one dtype or correct config.json.")
    floating = frozenset({declared}) if declared else FLOATING_DTYPES
    expected = {
        name: _Expected(tuple(tensor.shape), floating if tensor.is_floating_point()
                        else frozenset({str(tensor.dtype).removeprefix("torch.")}), shape_fix, dtype_fix)
        for name, tensor in reference.state_dict().items()
    }
    quantization = getattr(config, "quantization_config", None)
    if hasattr(quantization, "to_dict"):  # transformers may have parsed it into its config class
        quantization = quantization.to_dict()
    if fp8.is_fp8_config(quantization):
        fix = "The FP8 checkpoint does not match its quantization_config: re-create the variant (notebook 03)."
        expected |= {name: _Expected(shape, dtypes, fix, fix)
                     for name, (shape, dtypes) in fp8.expected_tensors(reference, quantization).items()}
    elif quantization:
        expected |= _packed_tensors(reference, quantization["bits"], quantization["group_size"])
    return expected


def _packed_tensors(reference: torch.nn.Module, bits: int, group_size: int) -> dict[str, _Expected]:
    """The GPTQ-style packing auto-round writes: int32 words of 32/bits weights, one scale and one
    packed zero point per group of `group_size` inputs (one group per row when group_size <= 0)."""
    fix = (f"config.json's quantization_config says bits={bits}, group_size={group_size}, which does not describe "
           "these tensors: re-export the checkpoint, or set quantization_config to the settings it was quantized with.")
    expected = {}
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            n_in, n_out = module.in_features, module.out_features
            groups = 1 if group_size <= 0 else -(-n_in // group_size)
            for part, shape, dtypes in (("qweight", (n_in * bits // 32, n_out), INT32),
                                        ("qzeros", (groups, n_out * bits // 32), INT32),
                                        ("scales", (groups, n_out), FLOATING_DTYPES),
                                        ("g_idx", (n_in,), INT32)):
                expected[f"{name}.{part}"] = _Expected(shape, dtypes, fix, fix)
    return expected


def _tensor_problem(
    name: str, shape: tuple[int, ...], dtype: str, expected: dict[str, _Expected]
) -> tuple[str, str] | None:
    """(what is wrong with one tensor, the fix); names the model does not know are left to the key
    check after loading."""
    want = expected.get(name)
    if want is None:
        return None
    if shape != want.shape:
        return f"{name} has shape {list(shape)}, the architecture needs {list(want.shape)}", want.shape_fix
    if dtype not in want.dtypes:
        return f"{name} is stored as {dtype}, expected {' or '.join(sorted(want.dtypes))}", want.dtype_fix
    return None


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

    `max_num_visual_tokens` (visual tokens per page) defaults to what the checkpoint saved in
    `colquant_processor.json`, else the reference's 1280.
    """
    _check_embeddings(embeddings)
    require_flag("trust_remote_code", trust_remote_code)
    require_flag("accelerate", accelerate, none_means="on with CUDA, off on CPU")
    require_flag("bf16_copy", bf16_copy, none_means="a BF16 copy where BF16 is faster and memory allows")
    torch_dtype = _torch_dtype(dtype)
    device = resolve_device(device)
    path = resolve_checkpoint(model_id_or_path, revision)  # after the checks: a download can take minutes
    if trust_remote_code:
        model, processor = _load_remote_code(path, torch_dtype, device, max_num_visual_tokens)
        _store_embeddings(model, embeddings)
        return model, processor
    config = verify_checkpoint(path)
    is_fp8 = fp8.is_fp8_config(config.get("quantization_config"))
    _check_fp8_accumulation(fp8_accumulation, is_fp8, path)
    if is_fp8:
        model = fp8.load_model(path, torch_dtype, device)  # W8A8 FP8 (compressed-tensors layout)
        fp8.set_accumulation(model, fp8_accumulation or fp8.DEFAULT_ACCUMULATION)
    else:
        # Loading straight onto the GPU lets transformers' auto-round integration pick a CUDA kernel.
        device_map = str(device) if device.type == "cuda" else None
        model, info = ColQwen3.from_pretrained(
            str(path), dtype=torch_dtype, device_map=device_map, output_loading_info=True
        )
        _raise_on_key_mismatch(path, info)
        _raise_on_non_finite(path, model)
    model = model.to(device).eval()
    _store_embeddings(model, embeddings)
    accelerate = device.type == "cuda" if accelerate is None else accelerate
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


def _raise_on_non_finite(path: Path, model: torch.nn.Module) -> None:
    """One pass over the loaded weights: a NaN or Inf would otherwise surface as NaN scores far
    downstream (or as a quality drop blamed on quantization), with no hint of the tensor at fault."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{path}: tensor {name} holds {count} NaN/Inf value(s) (after casting to {tensor.dtype}); the "
                "checkpoint is corrupt or was saved from a diverged run: re-download it or re-create the variant"
            )


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
    path: Path, dtype: torch.dtype, device: torch.device, max_num_visual_tokens: int | None
) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(path), dtype=dtype, trust_remote_code=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(
        str(path), trust_remote_code=True, max_num_visual_tokens=max_num_visual_tokens or DEFAULT_MAX_NUM_VISUAL_TOKENS
    )
    return model, processor
