"""Producing a profile's quantized variants: notebook 03's one call per kind.

`colquant.quantization` knows how to quantize a model and save it; `colquant.workspace` knows where
a profile's inputs and outputs live. This module joins the two for a profile: it names the variant
from its settings, decides whether an identical checkpoint already exists, and otherwise loads the
base model (through `workspace.load_variant`), quantizes it and saves it under `variants/<name>`.
The seeds' variant and its RTN baseline come from `quantization` (`produce_variant`); the frontier's
grid (`quantization.grid`, `colquant.weight_grid`) from `produce_grid_variants`, AutoScheme's with
the per-layer widths the library chose (`colquant.autoscheme`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

from colquant import workspace
from colquant.autoscheme import AutoSchemeSettings, achieved_average_bits, choose_layer_bits
from colquant.calibration import CalibrationSet
from colquant.measure import Measurement, measure
from colquant.params import quantization_section
from colquant.quantization import (
    SCRATCH_DIR,
    QuantizationSettings,
    decoder_linear_names,
    quantization_metadata,
    quantize_language_model,
    save_quantized_model,
    scratch_dir,
)
from colquant.weight_grid import WeightSetting, grid_variants, kernel_path, weight_format

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
    return _produce(profile, name, settings, calibration_path, calibration,
                    tuple(profile["quantization"]["export_formats"]))


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
    if (out / workspace.METADATA_FILE).exists():
        existing = workspace.read_variant_metadata(out)
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
    return {**workspace.read_variant_metadata(out), "reused": False}


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
    return workspace.fingerprint(
        asdict(settings), workspace.checkpoint_fingerprint(base), profile["model"]["dtype"], calibration,
        sorted(export_formats),
    )
