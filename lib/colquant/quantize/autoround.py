"""W4A16 quantization of ColQwen3's language model with auto-round, saved as a full checkpoint.

Scope, as in the seeds: only the decoder Linear layers of `vlm.model.language_model` become 4-bit
(group 128, symmetric); the vision tower, the deepstack mergers, the token embeddings and the 320-d
projection stay 16-bit. auto-round receives the text tower alone (a Qwen3VLTextModel, which has no
visual modules), so it takes its LLM path and quantizes the decoder blocks in place.

auto-round saves only the module it was given; `save_quantized_model` packs the layers in place
(auto-round's own QuantLinear, `auto_round:auto_gptq` packing) and writes the *whole* ColQwen3 with
a `quantization_config` whose `block_name_to_quantize` points at the full path, so
`colquant.load(path)` (through transformers' auto-round integration) rebuilds the 4-bit layers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from colquant.basics.files import atomic_directory, write_json, write_text
from colquant.basics.measure import Measurement, measure
from colquant.quantize.calibration import CalibrationSet, deepstack_replay
from colquant.quantize.cards import model_card, projection_bias_notice
from colquant.quantize.exports import complete_export
from colquant.retriever.checkpoint_files import EXPORTS_DIR, METADATA_FILE, size_on_disk
from colquant.retriever.remote_code import write_remote_code

log = logging.getLogger(__name__)

LANGUAGE_MODEL_BLOCKS = "vlm.model.language_model.layers"
SCRATCH_DIR = "ar_work_space"  # auto-round's offload/cache directory, placed under the output root


@dataclass(frozen=True)
class QuantizationSettings:
    """Everything that defines a variant; its name is derived from these."""

    method: str  # "autoround" or "rtn"
    bits: int
    group_size: int
    sym: bool
    iters: int
    batch_size: int
    seed: int

    @classmethod
    def from_profile(cls, profile: dict[str, Any], method: str = "autoround") -> "QuantizationSettings":
        if method not in ("autoround", "rtn"):
            raise ValueError(f"method={method!r}: use 'autoround' or 'rtn'")
        q = profile["quantization"]
        return cls(
            method=method,
            bits=q["bits"],
            group_size=q["group_size"],
            sym=q["sym"],
            iters=q["iters"] if method == "autoround" else 0,
            batch_size=q["batch_size"],
            seed=profile["calibration"]["seed"],
        )


def decoder_linear_names(language_model: torch.nn.Module) -> list[str]:
    """Names (relative to the text tower) of the Linear layers inside its decoder blocks."""
    return [
        name
        for name, module in language_model.named_modules()
        if name.startswith("layers.") and isinstance(module, torch.nn.Linear)
    ]


def quantize_language_model(
    model: torch.nn.Module,
    processor: Any,
    calibration: CalibrationSet,
    settings: QuantizationSettings,
    layer_bits: dict[str, int] | None = None,
) -> tuple[Any, Measurement]:
    """Run auto-round (or its pure RTN mode) on the text tower in place; returns (AutoRound, cost).

    `layer_bits` gives some decoder Linears (names relative to the text tower) their own width, e.g.
    AutoScheme's choice (`colquant.quantize.autoscheme`); the others take `settings.bits`.

    On a GPU auto-round tunes in bfloat16 (its default, and how the reference variants were made).
    On a CPU it would tune in bfloat16 only where the processor has AVX512-BF16/AMX and in float32
    elsewhere (auto-round's `CpuInfo().bf16`), so the same profile gave different variants on
    different laptops and CI runners. ColQuant turns auto-round's mixed precision off on every CPU:
    float32, the branch auto-round itself takes without bf16, on all of them. Either way auto-round
    casts the text tower to its compute dtype; `save_quantized_model` writes it back in the dtype the
    config declares.
    """
    from auto_round import AutoRound

    language_model = model.language_model
    group_size = settings.group_size
    narrow = [n for n, m in language_model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % group_size]
    if narrow:
        raise ValueError(f"group_size={group_size} does not divide the input width of {', '.join(narrow[:4])}")
    autoround = AutoRound(
        language_model,
        processor.tokenizer,
        scheme=f"W{settings.bits}A16",
        group_size=group_size,
        layer_config={name: {"bits": bits, "group_size": group_size, "sym": settings.sym}
                      for name, bits in (layer_bits or {}).items()} or None,
        sym=settings.sym,
        iters=settings.iters,
        disable_opt_rtn=settings.method == "rtn",
        nsamples=calibration.nsamples,
        seqlen=calibration.seqlen,
        batch_size=min(settings.batch_size, calibration.nsamples),
        dataset=calibration.items,
        seed=settings.seed,
        device_map=str(model.device),
        amp=model.device.type != "cpu",  # float32 on every CPU, whatever it supports (see above)
        enable_torch_compile=model.device.type == "cuda",  # on CPU compiling costs more than it saves
    )
    with measure(model.device) as cost, deepstack_replay(language_model):
        autoround.quantize()
    return autoround, cost


@contextmanager
def environment_variable(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration, then restore what it was (or unset it)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def scratch_dir(directory: Path) -> contextlib.AbstractContextManager[None]:
    """Point auto-round's scratch space (AR_WORK_SPACE, default `./ar_work_space` in whatever
    directory the process runs in) at `directory`; auto-round reads the variable when it needs it."""
    return environment_variable("AR_WORK_SPACE", str(directory))


def save_quantized_model(
    model: torch.nn.Module,
    processor: Any,
    autoround: Any,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any],
    export_formats: tuple[str, ...] = ("auto_round",),
) -> Path:
    """Write the full 4-bit ColQwen3 checkpoint (+ metadata JSON and model card), atomically.

    Formats other than `auto_round` (GPTQ/AWQ layouts read by vLLM and other servers) go under
    `exports/<format>/` as whole ColQwen3 checkpoints (`colquant.quantize.exports.complete_export`).
    """
    with atomic_directory(Path(out_dir)) as staging:
        _write_checkpoint(model, processor, autoround, staging, metadata, export_formats)
    return Path(out_dir)


def _write_checkpoint(
    model: torch.nn.Module, processor: Any, autoround: Any, staging: Path, metadata: dict[str, Any],
    export_formats: tuple[str, ...],
) -> None:
    cast_unquantized_tensors(model, declared_dtype(model))  # before any format packs or exports the tower
    for fmt in export_formats:
        if fmt != "auto_round":
            _save_tower(autoround, staging / EXPORTS_DIR / fmt, fmt, inplace=False)
    with tempfile.TemporaryDirectory() as tower_dir:
        _save_tower(autoround, Path(tower_dir), "auto_round", inplace=True)  # packs layers in place
        quantization_config = json.loads((Path(tower_dir) / "config.json").read_text())["quantization_config"]
    quantization_config["block_name_to_quantize"] = LANGUAGE_MODEL_BLOCKS
    if "extra_config" in quantization_config:  # per-layer widths by full name (auto-round reads other keys as regexes)
        prefix = LANGUAGE_MODEL_BLOCKS.removesuffix("layers")
        layers = quantization_config["extra_config"]
        quantization_config["extra_config"] = {prefix + name: layer for name, layer in layers.items()}
    model.config.quantization_config = quantization_config
    # auto-round also wrote its tower-relative config ("layers") into the text config; transformers
    # would fall back to it if the top-level one were lost, and build no 4-bit layer from it
    model.config.text_config.__dict__.pop("quantization_config", None)
    model.save_pretrained(str(staging), max_shard_size="2GB")
    processor.save_pretrained(staging)
    write_remote_code(staging)  # transformers' AutoModel/AutoProcessor load it without colquant
    for fmt in export_formats:
        if fmt != "auto_round":
            complete_export(staging, staging / EXPORTS_DIR / fmt)  # whole retrievers, not text towers
    metadata = {**metadata, "quantization_config": quantization_config, "size_on_disk_bytes": size_on_disk(staging)}
    write_json(staging / METADATA_FILE, metadata)
    write_text(staging / "README.md", model_card(metadata, staging))
    bias_notice = projection_bias_notice(staging)
    if bias_notice:
        log.warning(bias_notice)


def declared_dtype(model: torch.nn.Module) -> torch.dtype:
    """The weight dtype the model's config declares (what `save_pretrained` writes into config.json)."""
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"the model's config declares dtype {dtype!r}; load the base model with a floating dtype")
    return dtype


def cast_unquantized_tensors(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter and saved buffer outside the 4-bit layers to `dtype`, in place.

    auto-round leaves the text tower in its compute dtype (float32 on a CPU, see
    `quantize_language_model`): embeddings and norms would be saved as float32 (float16 in the GPTQ
    export) under a config that declares bfloat16, which the strict loader refuses. The decoder's
    Linear layers keep their tuned weights until packing gives them the dtypes their format defines
    (int32 codes, float16 scales); buffers that are not saved (RoPE's float32 inverse frequencies)
    keep theirs.
    """
    language_model = model.language_model
    quantized = {id(language_model.get_submodule(name)) for name in decoder_linear_names(language_model)}
    for module in model.modules():
        if id(module) in quantized or hasattr(module, "qweight"):
            continue
        saved_buffers = [b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for tensor in [*module.parameters(recurse=False), *saved_buffers]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)


def _save_tower(autoround: Any, directory: Path, fmt: str, *, inplace: bool) -> None:
    # auto-round 0.16 keeps the first format it was asked for and ignores `format` on later calls;
    # assigning the format string makes save_quantized resolve it afresh
    autoround.formats = fmt
    autoround.save_quantized(str(directory), format=fmt, inplace=inplace)


def quantization_metadata(
    variant: str,
    settings: QuantizationSettings,
    calibration: CalibrationSet,
    cost: Measurement,
    *,
    base_model: str,
    base_model_revision: str,
    random_weights: bool,
    quantized_layers: list[str],
) -> dict[str, Any]:
    return {
        "variant": variant,
        "base_model": base_model,
        "base_model_revision": base_model_revision,
        "random_weights": random_weights,
        "settings": asdict(settings),
        "calibration": {
            "source": calibration.source,
            "source_used": calibration.source_used,
            "fallback_reason": calibration.fallback_reason,
            "seqlen": calibration.seqlen,
            "nsamples": calibration.nsamples,
            "multimodal": calibration.multimodal,
        },
        "wall_time_s": round(cost.wall_time_s, 2),
        "peak_memory_bytes": cost.peak_memory_bytes,
        "memory_kind": cost.memory_kind,
        "quantized_layers": len(quantized_layers),
        "scope": f"{LANGUAGE_MODEL_BLOCKS}.*  (Linear layers); vision tower, embeddings, projection kept 16-bit",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def layer_types(model: torch.nn.Module) -> pd.DataFrame:
    """Count of layer classes per component, with their bit width: proof of what was quantized."""
    from colquant.retriever.architecture import component_of

    rows = [
        {"component": component_of(name), "layer type": type(module).__name__, "bits": getattr(module, "bits", 16)}
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or hasattr(module, "qweight") or hasattr(module, "weight_scale")
    ]
    return pd.DataFrame(rows).value_counts().rename("layers").reset_index().sort_values(["component", "bits"], ignore_index=True)
