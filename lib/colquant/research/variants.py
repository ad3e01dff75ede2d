"""Producing a profile's quantized variants: notebook 03's one call per variant.

`colquant.quantize.autoround` (auto-round W4A16) and `colquant.quantize.fp8_variants` (FP8) know how to quantize a
model and save it; `colquant.research.workspace` knows where a profile's inputs and outputs live. This module
joins them for a profile: it names the variant from its settings, decides whether an identical
checkpoint already exists, and otherwise loads the base model (through `workspace.load_variant`),
quantizes it and saves it under `variants/<name>`. The seeds' variant and its RTN baseline come from
`quantization` (`produce_variant`); the frontier's grid (`quantization.grid`, `colquant.quantize.weight_grid`) from
`produce_grid_variants`, AutoScheme's with the per-layer widths the library chose (`colquant.quantize.autoscheme`).

With `quantization.w4a8`, the auto-round variant of one calibration seqlen (`workspace.w4a8_seqlen`: the
one named, or the largest) also gets a W4A8 run:
`variants/<w4a8 name>` holds no weights, only metadata naming that checkpoint, the weights it was made
for and the load option (`activations="fp8"`, `colquant.kernels.w4a8`), and a card; notebooks 04-07
load it through `workspace.load_variant` and compare it like any variant.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from colquant.basics.files import atomic_directory, fingerprint, write_json, write_text
from colquant.basics.measure import Measurement, measure
from colquant.quantize.autoscheme import AutoSchemeSettings, achieved_average_bits, choose_layer_bits
from colquant.quantize.calibration import CalibrationSet
from colquant.quantize.cards import w4a8_card
from colquant.quantize.fp8_variants import VARIANTS as FP8_VARIANTS
from colquant.quantize.fp8_variants import fp8_metadata, quantize_fp8, save_fp8_model
from colquant.research import workspace
from colquant.research.params import quantization_section
from colquant.retriever.checkpoint_files import METADATA_FILE, checkpoint_fingerprint, read_variant_metadata
from colquant.retriever.fp8 import METHOD as FP8_METHOD
from colquant.quantize.autoround import (
    SCRATCH_DIR,
    QuantizationSettings,
    decoder_linear_names,
    quantization_metadata,
    quantize_language_model,
    save_quantized_model,
    scratch_dir,
)
from colquant.quantize.weight_formats import kernel_path, weight_format
from colquant.quantize.weight_grid import WeightSetting, grid_variants

GRID_EXPORT_FORMATS = ("auto_round",)  # grid variants are evaluated, not served: no GPTQ/AWQ exports
SELECTION = ("auto-round AutoScheme: delta loss (|gradient x quantization error|) of the backbone's next-token loss "
             "(tied embeddings as the LM head) on the calibration set's text, minimised under the average-bits budget")


def produce_variant(profile: dict[str, Any], seqlen: int, method: str = "autoround") -> dict[str, Any]:
    """Quantize the profile's base model into `variants/<name>` unless an identical one exists.

    Identical means the same `inputs_fingerprint`: settings, the calibration file notebook 02 saved
    for `seqlen` and the base checkpoint's content, dtype. Returns the variant's metadata (with
    `reused: True` when nothing had to be done).
    """
    settings = QuantizationSettings.from_profile(profile, method)
    calibration_path = workspace.calibration_file(profile, seqlen)
    calibration = CalibrationSet.load(calibration_path)
    name = quantization_section(profile).variant_name(seqlen, method, calibration_source=calibration.source_used)
    produced = _produce(profile, name, settings, calibration_path, calibration,
                        tuple(profile["quantization"]["export_formats"]))
    return _with_w4a8_run(profile, seqlen, method, produced)


def produce_grid_variants(profile: dict[str, Any], seqlen: int, made: Collection[str] = ()) -> list[dict[str, Any]]:
    """The grid's variants, made by the run of the grid's seqlen (none at other seqlens); a grid point
    that is a variant of `made` (the seeds' W4 g128 and its RTN) is that variant, not made twice."""
    grid = profile["quantization"]["grid"]
    if grid is None or seqlen != grid["seqlen"]:
        return []
    source = CalibrationSet.load(workspace.calibration_file(profile, seqlen)).source_used
    return [produce_grid_point(profile, point) for name, point in grid_variants(profile, source).items() if name not in made]


def produce_grid_point(profile: dict[str, Any], point: WeightSetting) -> dict[str, Any]:
    """One grid point, quantized on the calibration set of the grid's seqlen (or reused, as `produce_variant`)."""
    calibration_path = workspace.calibration_file(profile, profile["quantization"]["grid"]["seqlen"])
    calibration = CalibrationSet.load(calibration_path)
    return _produce(profile, point.name(profile, calibration.source_used), point.settings(profile), calibration_path,
                    calibration, GRID_EXPORT_FORMATS)


def _produce(profile: dict[str, Any], name: str, settings: QuantizationSettings, calibration_path: Path,
             calibration: CalibrationSet, export_formats: tuple[str, ...]) -> dict[str, Any]:
    out = workspace.variants_dir(profile) / name
    base = workspace.base_model(profile)
    inputs = variant_inputs_fingerprint(profile, settings, base, None if settings.method == "rtn" else calibration_path,
                                        export_formats)
    if (out / METADATA_FILE).exists():
        existing = read_variant_metadata(out)
        if existing.get("inputs_fingerprint") == inputs:
            return {**existing, "reused": True}
    with scratch_dir(workspace.output_dir(profile) / SCRATCH_DIR):
        layer_bits, selection = _autoscheme_choice(profile, base, calibration, settings)
        model, processor = workspace.load_variant(profile, base, accelerate=False)  # auto-round replays transformers' blocks
        autoround, cost = quantize_language_model(model, processor, calibration, settings, layer_bits)
        metadata = quantization_metadata(
            name,
            settings,
            calibration,
            _combined(selection, cost),
            base_model=str(profile["model"]["id"]),
            base_model_revision=workspace.base_model_revision(profile),
            random_weights=profile["random_weights"],
            quantized_layers=decoder_linear_names(model.language_model),
        )
        metadata |= describe_weights(asdict(settings), model.language_model, layer_bits, selection)
        save_quantized_model(model, processor, autoround, out, metadata={**metadata, "inputs_fingerprint": inputs},
                             export_formats=export_formats)
    return {**read_variant_metadata(out), "reused": False}


def _with_w4a8_run(profile: dict[str, Any], seqlen: int, method: str, produced: dict[str, Any]) -> dict[str, Any]:
    """`produced` (the variant's metadata), once its W4A8 run exists where the profile asks for one."""
    if method == "autoround" and seqlen == workspace.w4a8_seqlen(profile):
        produce_w4a8_variant(profile, seqlen, produced["calibration"]["source_used"])
    return produced


def produce_w4a8_variant(profile: dict[str, Any], seqlen: int, calibration_source: str) -> dict[str, Any]:
    """The W4A8 run of the auto-round variant at `seqlen` (calibrated on `calibration_source`, which both
    names carry) in `variants/<w4a8 name>`, unless one made for that checkpoint's current weights exists:
    its metadata (the checkpoint's, with `loads`: the checkpoint beside it, its weights' fingerprint, the
    activations) and card. Returns its metadata (`reused`)."""
    from colquant.kernels.w4a8 import KERNEL, REFERENCE

    settings, directory = quantization_section(profile), workspace.variants_dir(profile)
    name = settings.w4a8_variant_name(seqlen, calibration_source=calibration_source)
    checkpoint = settings.variant_name(seqlen, calibration_source=calibration_source)
    out = directory / name
    weights = checkpoint_fingerprint(directory / checkpoint)
    if (out / METADATA_FILE).exists():
        existing = read_variant_metadata(out)
        if (existing.get("loads") or {}).get("weights") == weights:
            return {**existing, "reused": True}
    source = read_variant_metadata(directory / checkpoint)
    metadata = {**{key: value for key, value in source.items() if key != "inputs_fingerprint"}, "variant": name,
                "settings": {**source["settings"], "activations": "fp8 (e4m3, dynamic per token)"},
                "loads": {"checkpoint": checkpoint, "weights": weights, "activations": "fp8"},
                "runs": {"cuda": KERNEL, "cpu": REFERENCE},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with atomic_directory(out) as staging:
        write_json(staging / METADATA_FILE, metadata)
        write_text(staging / "README.md", w4a8_card(metadata))
    return {**read_variant_metadata(out), "reused": False}


def _autoscheme_choice(profile: dict[str, Any], base: Path, calibration: CalibrationSet, settings: QuantizationSettings
                       ) -> tuple[dict[str, int] | None, Measurement | None]:
    """AutoScheme's per-layer widths and what choosing them cost, on a model of its own (the selection
    leaves auto-round's patches on it); (None, None) for a variant of one width."""
    if not isinstance(settings, AutoSchemeSettings):
        return None, None
    model, processor = workspace.load_variant(profile, base, accelerate=False)
    with measure(model.device) as cost:
        layer_bits = choose_layer_bits(model, processor, calibration, settings)
    del model, processor
    return layer_bits, cost


def _combined(selection: Measurement | None, tuning: Measurement) -> Measurement:
    """The variant's whole cost: AutoScheme's selection (when there is one) and the tuning after it."""
    if selection is None:
        return tuning
    return Measurement(wall_time_s=selection.wall_time_s + tuning.wall_time_s,
                       peak_memory_bytes=max(selection.peak_memory_bytes, tuning.peak_memory_bytes),
                       memory_kind=tuning.memory_kind)


def describe_weights(settings: dict[str, Any], language_model: Any, layer_bits: dict[str, int] | None,
                     selection: Measurement | None) -> dict[str, Any]:
    """Metadata that says what the weights are and what runs them; for AutoScheme, every layer's width."""
    fast, path = kernel_path(settings)
    described: dict[str, Any] = {"weights": weight_format(settings), "kernel": {"fast": fast, "path": path}}
    if layer_bits is not None and selection is not None:
        described["autoscheme"] = {
            "selection": SELECTION,
            "avg_bits_budget": settings["avg_bits"],
            "options": list(settings["options"]),
            "achieved_avg_bits": round(achieved_average_bits(language_model, layer_bits, settings["group_size"]), 4),
            "selection_wall_time_s": round(selection.wall_time_s, 2),
            "layer_bits": layer_bits,
        }
    return described


def variant_inputs_fingerprint(
    profile: dict[str, Any], settings: QuantizationSettings, base: Path, calibration_path: Path | None,
    export_formats: tuple[str, ...],
) -> str:
    """Everything a quantized checkpoint is made from: settings, base weights, dtype, calibration
    file (by name, size and time; RTN reads none), and the export formats written beside it."""
    calibration = None
    if calibration_path is not None:
        stat = calibration_path.stat()
        calibration = [calibration_path.name, stat.st_size, stat.st_mtime_ns]
    return fingerprint(
        asdict(settings), checkpoint_fingerprint(base), profile["model"]["dtype"], calibration,
        sorted(export_formats),
    )


def produce_fp8_variant(profile: dict[str, Any], kind: str) -> dict[str, Any]:
    """Quantize the profile's base model to the FP8 variant `kind` ("lm" or "all") in
    `variants/<name>`, unless one made from the same base weights and dtype exists. Returns its
    metadata (`reused: True` when nothing had to be done)."""
    if kind not in FP8_VARIANTS:
        raise ValueError(f"FP8 variant kind {kind!r}: use one of {', '.join(FP8_VARIANTS)}")
    name, scope = FP8_VARIANTS[kind]
    out = workspace.variants_dir(profile) / name
    base = workspace.base_model(profile)
    inputs = fingerprint(FP8_METHOD, scope, checkpoint_fingerprint(base), profile["model"]["dtype"])
    if (out / METADATA_FILE).exists():
        existing = read_variant_metadata(out)
        if existing.get("inputs_fingerprint") == inputs:
            return {**existing, "reused": True}
    model, processor = workspace.load_variant(profile, base, accelerate=False)  # quantize transformers' layers
    with measure(model.device) as cost:
        layers = quantize_fp8(model, scope)
    metadata = fp8_metadata(name, scope, layers, cost, base_model=str(profile["model"]["id"]),
                            base_model_revision=workspace.base_model_revision(profile),
                            random_weights=profile["random_weights"])
    save_fp8_model(model, processor, out, scope, {**metadata, "inputs_fingerprint": inputs})
    return {**read_variant_metadata(out), "reused": False}
