"""FP8 variants on disk: the compressed-tensors "float-quantized" checkpoint layout vLLM reads,
loading it back with strict checks, and producing/saving the variants notebook 03 makes.

Why a module of its own: `colquant.fp8` holds the arithmetic and the `FP8Linear` layer that run at
inference time; this is the I/O around them. The public names stay importable from `colquant.fp8`.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from colquant.fp8 import METHOD, NO_CALIBRATION, SCOPES, VARIANTS, FP8Linear, quantize_fp8
from colquant.cards import fp8_card
from colquant.checkpoint_files import METADATA_FILE, size_on_disk
from colquant.weight_checks import CheckpointError, quantized_layer_names, raise_on_non_finite, shard_files

# --------------------------------------------------------------------------------------------
# the checkpoint format (compressed-tensors "float-quantized", as vLLM reads it)
# --------------------------------------------------------------------------------------------


def quantization_config(scope: str) -> dict[str, Any]:
    """config.json's `quantization_config`: channel-wise e4m3 weights, dynamic token-wise e4m3
    activations, for the Linear layers whose names start with the scope's prefixes."""
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": [f"re:^{re.escape(prefix)}.*" for prefix in SCOPES[scope]],
            "weights": {**fp8, "strategy": "channel", "dynamic": False},
            "input_activations": {**fp8, "strategy": "token", "dynamic": True},
            "output_activations": None,
            "format": "float-quantized",
        }},
        "ignore": ["embedding_proj_layer"],
        "kv_cache_scheme": None,
        "colquant_scope": scope,
    }


def load_model(path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An FP8 ColQwen3 from a checkpoint written by `save_fp8_model` (header checks already done by
    `colquant.checkpoint.verify_checkpoint`); missing or unexpected tensors raise CheckpointError."""
    from safetensors import safe_open
    from transformers import initialization

    from colquant.model import ColQwen3, ColQwen3Config

    config = ColQwen3Config.from_pretrained(str(path))
    quantization = config.quantization_config
    del config.quantization_config  # the FP8 layers are built here, not by a transformers quantizer
    with initialization.no_init_weights(), torch.device(device):
        model = ColQwen3._from_config(config, dtype=dtype)
    for name in quantized_layer_names(model, quantization, path):
        linear = model.get_submodule(name)
        model.set_submodule(name, FP8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                            dtype=dtype, device=device))
    model.config.quantization_config = quantization
    wanted = model.state_dict()
    found: set[str] = set()
    for shard in shard_files(path):
        with safe_open(str(shard), framework="pt") as reader:
            for key in reader.keys():
                if key in wanted:
                    wanted[key].copy_(reader.get_tensor(key))
                    found.add(key)
                elif not any(re.fullmatch(p, key) for p in ColQwen3._keys_to_ignore_on_load_unexpected):
                    raise CheckpointError(f"{path}: {shard.name} holds {key}, which the FP8 ColQwen3 of its config.json "
                                          "does not have; the checkpoint is from another model or scope: re-create it")
    missing = sorted(set(wanted) - found)
    if missing:
        shown = ", ".join(missing[:6]) + (f" ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise CheckpointError(f"{path} lacks {shown}: an FP8 layer needs its weight and weight_scale. The checkpoint "
                              "is incomplete: re-create the variant (notebook 03) or re-download it")
    raise_on_non_finite(path, model)
    return model


# --------------------------------------------------------------------------------------------
# variants (notebook 03)
# --------------------------------------------------------------------------------------------


def variant_names(profile: dict[str, Any]) -> list[str]:
    """The FP8 variants a profile asks for (`quantization.fp8`: `lm`, `all`), in that order."""
    return [VARIANTS[kind][0] for kind in profile["quantization"].get("fp8", [])]


def save_fp8_model(model: nn.Module, processor: Any, out_dir: Path, scope: str, metadata: dict[str, Any]) -> Path:
    """Write the FP8 ColQwen3 (compressed-tensors layout + metadata JSON and model card) atomically:
    into a staging folder first, swapped in whole (`files.atomic_directory`)."""
    from colquant.files import atomic_directory, write_json, write_text
    from colquant.remote_code import write_remote_code

    with atomic_directory(Path(out_dir)) as staging:
        model.config.quantization_config = quantization_config(scope)
        model.save_pretrained(str(staging), max_shard_size="2GB")
        processor.save_pretrained(staging)
        write_remote_code(staging)
        metadata = {**metadata, "quantization_config": model.config.quantization_config,
                    "size_on_disk_bytes": size_on_disk(staging)}
        write_json(staging / METADATA_FILE, metadata)
        write_text(staging / "README.md", fp8_card(metadata))
    return Path(out_dir)


def fp8_metadata(profile: dict[str, Any], name: str, scope: str, layers: list[str], cost: Any) -> dict[str, Any]:
    """What notebook 03, the report and the card read about a variant; FP8 has no calibration."""
    from colquant import workspace

    return {
        "variant": name,
        "base_model": str(profile["model"]["id"]),
        "base_model_revision": workspace.base_model_revision(profile),
        "random_weights": profile["random_weights"],
        "settings": {"method": METHOD, "bits": 8, "format": "float8_e4m3fn", "group_size": None, "sym": True,
                     "iters": 0, "seed": None, "weights": "per output channel", "activations": "dynamic per token",
                     "scope": scope},
        "calibration": {"source": "none", "source_used": "none", "fallback_reason": None, "seqlen": None,
                        "nsamples": 0, "multimodal": False, "needed": False, "note": NO_CALIBRATION},
        "wall_time_s": round(cost.wall_time_s, 2),
        "peak_memory_bytes": cost.peak_memory_bytes,
        "memory_kind": cost.memory_kind,
        "quantized_layers": len(layers),
        "scope": f"{' and '.join(SCOPES[scope])}* (Linear layers); embeddings and the 320-d projection kept 16-bit",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def produce_fp8_variant(profile: dict[str, Any], kind: str) -> dict[str, Any]:
    """Quantize the profile's base model to the FP8 variant `kind` ("lm" or "all") in
    `variants/<name>`, unless one made from the same base weights and dtype exists. Returns its
    metadata (`reused: True` when nothing had to be done)."""
    from colquant import workspace
    from colquant.measure import measure

    if kind not in VARIANTS:
        raise ValueError(f"FP8 variant kind {kind!r}: use one of {', '.join(VARIANTS)}")
    name, scope = VARIANTS[kind]
    out = workspace.variants_dir(profile) / name
    base = workspace.base_model(profile)
    inputs = workspace.fingerprint(METHOD, scope, workspace.checkpoint_fingerprint(base), profile["model"]["dtype"])
    if (out / workspace.METADATA_FILE).exists():
        existing = workspace.read_variant_metadata(out)
        if existing.get("inputs_fingerprint") == inputs:
            return {**existing, "reused": True}
    model, processor = workspace.load_variant(profile, base, accelerate=False)  # quantize transformers' layers
    with measure(model.device) as cost:
        layers = quantize_fp8(model, scope)
    metadata = fp8_metadata(profile, name, scope, layers, cost)
    save_fp8_model(model, processor, out, scope, {**metadata, "inputs_fingerprint": inputs})
    return {**workspace.read_variant_metadata(out), "reused": False}
