"""The checks of a profile that need more than its own values: the model's architecture (every group
size must divide every quantized layer's input width), the calibration seqlens the grid is tuned at,
and the bits AutoScheme's options can average. `params.validate_profile` runs them after the schema,
so they report with the same file and key paths; kept apart because they read the model's config.
They read the validated profile as the dict `validate_profile` returns (defaults filled in), as every
other reader of a profile does, so this module needs nothing of the schema's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from colquant.quantize.weight_formats import average_bits


def architecture_problems(profile: dict[str, Any]) -> list[str]:
    """Every cross-section problem of a schema-valid profile, as sentences with key paths and fixes."""
    return _group_size_problems(profile) + _grid_problems(profile) + _w4a8_problems(profile)


def quantized_input_widths(model_id: str) -> dict[str, int] | None:
    """Input widths of the decoder Linears auto-round quantizes, by layer, for models whose
    architecture is known before loading: the embedded tiny model, the synthetic and real 4B, and a
    local checkpoint directory (from its config.json). None when unknown (checked at quantization)."""
    from colquant.retriever.checkpoint import DEFAULT_MODEL_ID
    from colquant.retriever.model import ColQwen3Config

    known = {"embedded-tiny": ColQwen3Config.tiny, "synthetic-4b": ColQwen3Config.colqwen3_4b,
             DEFAULT_MODEL_ID: ColQwen3Config.colqwen3_4b}
    config_file = Path(model_id) / "config.json"
    if model_id in known:
        text = known[model_id]().text_config
    elif config_file.is_file():
        try:
            text = ColQwen3Config.from_pretrained(str(config_file.parent)).text_config
        except (OSError, ValueError, TypeError, AttributeError):  # colquant.load reports it, naming the file
            return None
    else:
        return None
    return {
        "q/k/v_proj, gate/up_proj": text.hidden_size,
        "o_proj": text.num_attention_heads * text.head_dim,
        "down_proj": text.intermediate_size,
    }


def _group_size_problems(profile: dict[str, Any]) -> list[str]:
    """Every group size the profile quantizes with (the seeds' variant, the grid's, AutoScheme's) must
    divide the input width of every quantized layer: auto-round would stop on it an hour in."""
    model_id = profile["model"]["id"]
    widths = quantized_input_widths(model_id)
    if not widths:
        return []
    quantization, grid = profile["quantization"], profile["quantization"]["grid"]
    group_sizes = {"quantization.group_size": quantization["group_size"]}
    if grid is not None:
        group_sizes |= {f"quantization.grid.group_sizes[{index}]": size for index, size in enumerate(grid["group_sizes"])}
        if grid["autoscheme"] is not None:
            group_sizes["quantization.grid.autoscheme.group_size"] = grid["autoscheme"]["group_size"]
    problems = []
    for key, group_size in group_sizes.items():
        narrow = {name: width for name, width in widths.items() if width % group_size}
        if narrow:
            shown = ", ".join(f"{name} ({width})" for name, width in narrow.items())
            problems.append(f"{key}={group_size} does not divide the input width of {shown} in {model_id}; "
                            f"use a divisor of {math.gcd(*widths.values())} (every quantized layer's input width is a "
                            "multiple of it)")
    return problems


def _grid_problems(profile: dict[str, Any]) -> list[str]:
    """What the grid asks that no run can make: a seqlen without a calibration set, nothing to make, an
    AutoScheme budget outside what its options can average, AutoScheme on page calibration."""
    grid = profile["quantization"]["grid"]
    if grid is None:
        return []
    problems = []
    seqlens = profile["calibration"]["seqlens"]
    if grid["seqlen"] not in seqlens:
        problems.append(f"quantization.grid.seqlen={grid['seqlen']} has no calibration set: it is not one of "
                        f"calibration.seqlens {seqlens}; use one of them, or add {grid['seqlen']} to calibration.seqlens")
    if not grid["bits"] and grid["autoscheme"] is None:
        problems.append("quantization.grid makes no variant: list bit widths in quantization.grid.bits (2, 3, 4, 8) "
                        "or add quantization.grid.autoscheme, or remove quantization.grid")
    if grid["autoscheme"] is not None:
        problems += _autoscheme_problems(grid["autoscheme"], profile["calibration"]["source"])
    return problems


def _autoscheme_problems(autoscheme: dict[str, Any], calibration_source: str) -> list[str]:
    problems = []
    if calibration_source == "pages":
        problems.append("quantization.grid.autoscheme needs text calibration (AutoScheme scores layers by the language "
                        "model's next-token loss on text), but calibration.source is pages; use pile-10k or "
                        "colpali-train, or remove quantization.grid.autoscheme")
    group_size = autoscheme["group_size"]
    low, high = min(autoscheme["options"]), max(autoscheme["options"])
    floor, ceiling = average_bits(low, group_size), average_bits(high, group_size)
    for index, budget in enumerate(autoscheme["avg_bits"]):
        if not floor - 1e-3 <= budget <= ceiling + 1e-3:  # auto-round's own tolerance at the ends
            problems.append(
                f"quantization.grid.autoscheme.avg_bits[{index}]={budget} is outside what its options can average: "
                f"W{low}A16 to W{high}A16 at group size {group_size} store {floor:.3f} to {ceiling:.3f} bits per "
                "weight (scales and zero points included, as AutoScheme counts them); use a budget in that range "
                "or widen quantization.grid.autoscheme.options")
    return problems


def _w4a8_problems(profile: dict[str, Any]) -> list[str]:
    """`quantization.w4a8` asks for a W4A8 run of an auto-round variant CUTLASS W4A8 can run."""
    from colquant.kernels.w4a8 import GROUP_SIZE

    quantization, seqlens = profile["quantization"], profile["calibration"]["seqlens"]
    sym, group_size, w4a8 = quantization["sym"], quantization["group_size"], quantization["w4a8"]
    problems = []
    if w4a8 is not True and w4a8 is not False and w4a8 not in seqlens:
        problems.append(f"quantization.w4a8={w4a8} names no auto-round variant: it is not one of calibration.seqlens "
                        f"{seqlens}; use one of them, true for the largest, or false for no W4A8 run")
    if w4a8 is False or (sym and group_size == GROUP_SIZE):
        return problems
    return problems + [f"quantization.w4a8 runs a symmetric group-{GROUP_SIZE} checkpoint as W4A8 (what CUTLASS W4A8 takes), and "
            f"this profile quantizes sym={sym}, group_size={group_size}: set "
            f"quantization.w4a8: false, or quantize with sym: true and group_size: {GROUP_SIZE}"]
