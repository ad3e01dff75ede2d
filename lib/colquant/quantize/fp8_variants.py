"""FP8 variants: quantizing a model's Linear layers to `FP8Linear`, and saving the variants notebook 03 makes.

The layer, its arithmetic and the checkpoint layout vLLM reads (written by `save_fp8_model`, read back
by `colquant.load`) are :mod:`colquant.retriever.fp8`'s; this is making and writing the variants.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from colquant.basics.files import atomic_directory, write_json, write_text
from colquant.basics.measure import Measurement
from colquant.quantize.cards import fp8_card
from colquant.retriever.checkpoint_files import METADATA_FILE, size_on_disk
from colquant.retriever.fp8 import METHOD, NO_CALIBRATION, SCOPES, FP8Linear, quantization_config
from colquant.retriever.remote_code import write_remote_code

VARIANTS: dict[str, tuple[str, str]] = {"lm": ("fp8-lm", "lm"), "all": ("fp8-all", "lm+vision")}  # kind -> (name, scope)


def fp8_targets(model: nn.Module, scope: str) -> list[str]:
    """Names of the Linear layers ``scope`` covers (see SCOPES); the 320-d projection stays 16-bit."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: use one of {', '.join(SCOPES)}")
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(SCOPES[scope])]


@torch.no_grad()
def quantize_fp8(model: nn.Module, scope: str = "lm") -> list[str]:
    """Replace the Linear layers in ``scope`` ("lm" or "lm+vision") by `FP8Linear`, in place, one at
    a time so memory stays flat; returns their names."""
    names = fp8_targets(model, scope)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layers under {', '.join(SCOPES[scope])}: "
                         "quantize_fp8 expects a ColQwen3 (colquant.load)")
    for name in names:
        model.set_submodule(name, FP8Linear.from_linear(model.get_submodule(name)))
    return names


def variant_names(profile: dict[str, Any]) -> list[str]:
    """The FP8 variants a profile asks for (`quantization.fp8`: `lm`, `all`), in that order."""
    return [VARIANTS[kind][0] for kind in profile["quantization"].get("fp8", [])]


def save_fp8_model(model: nn.Module, processor: Any, out_dir: Path, scope: str, metadata: dict[str, Any]) -> Path:
    """Write the FP8 ColQwen3 (compressed-tensors layout + metadata JSON and model card) atomically:
    into a staging folder first, swapped in whole (`files.atomic_directory`)."""
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


def fp8_metadata(name: str, scope: str, layers: list[str], cost: Measurement, *, base_model: str,
                 base_model_revision: str, random_weights: bool) -> dict[str, Any]:
    """What notebook 03, the report and the card read about a variant; FP8 has no calibration."""
    return {
        "variant": name,
        "base_model": base_model,
        "base_model_revision": base_model_revision,
        "random_weights": random_weights,
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
