"""Producing a profile's quantized variants: notebook 03's one call per variant.

`colquant.quantize.autoround` (auto-round W4A16) and `colquant.quantize.fp8_variants` (FP8) know how to quantize a
model and save it; `colquant.research.workspace` knows where a profile's inputs and outputs live. This module
joins them for a profile: it names the variant from its settings, decides whether an identical
checkpoint already exists, and otherwise loads the base model (through `workspace.load_variant`),
quantizes it and saves it under `variants/<name>`.

With `quantization.w4a8`, the auto-round variant of the largest calibration seqlen also gets a W4A8 run:
`variants/<w4a8 name>` holds no weights, only metadata naming that checkpoint, the weights it was made
for and the load option (`activations="fp8"`, `colquant.kernels.w4a8`), and a card; notebooks 04-07
load it through `workspace.load_variant` and compare it like any variant.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from colquant.basics.files import atomic_directory, fingerprint, write_json, write_text
from colquant.basics.measure import measure
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
    out = workspace.variants_dir(profile) / name
    base = workspace.base_model(profile)
    inputs = variant_inputs_fingerprint(profile, settings, base, None if method == "rtn" else calibration_path)
    if (out / METADATA_FILE).exists():
        existing = read_variant_metadata(out)
        if existing.get("inputs_fingerprint") == inputs:
            return _with_w4a8_run(profile, seqlen, method, {**existing, "reused": True})
    model, processor = workspace.load_variant(profile, base, accelerate=False)  # auto-round replays transformers' blocks
    with scratch_dir(workspace.output_dir(profile) / SCRATCH_DIR):
        autoround, cost = quantize_language_model(model, processor, calibration, settings)
        metadata = quantization_metadata(
            name,
            settings,
            calibration,
            cost,
            base_model=str(profile["model"]["id"]),
            base_model_revision=workspace.base_model_revision(profile),
            random_weights=profile["random_weights"],
            quantized_layers=decoder_linear_names(model.language_model),
        )
        save_quantized_model(
            model, processor, autoround, out, metadata={**metadata, "inputs_fingerprint": inputs},
            export_formats=tuple(profile["quantization"]["export_formats"]),
        )
    return _with_w4a8_run(profile, seqlen, method, {**read_variant_metadata(out), "reused": False})


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


def variant_inputs_fingerprint(
    profile: dict[str, Any], settings: QuantizationSettings, base: Path, calibration_path: Path | None
) -> str:
    """Everything a quantized checkpoint is made from: settings, base weights, dtype, calibration
    file (by name, size and time; RTN reads none), and the export formats written beside it."""
    calibration = None
    if calibration_path is not None:
        stat = calibration_path.stat()
        calibration = [calibration_path.name, stat.st_size, stat.st_mtime_ns]
    return fingerprint(
        asdict(settings), checkpoint_fingerprint(base), profile["model"]["dtype"], calibration,
        sorted(profile["quantization"]["export_formats"]),
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
