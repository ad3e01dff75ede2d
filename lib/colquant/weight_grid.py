"""The weight settings of the quality-memory frontier: what each grid point is, its name and its cost.

A profile's `quantization.grid` asks for auto-round W{bits}A16 at every (bits, group size), an RTN
baseline for each, and auto-round's AutoScheme (per-layer bit widths under an average-bits budget),
all tuned on the calibration set of one seqlen. Notebook 03 makes them (`colquant.variants`), 04-07
measure them as they measure every variant, and notebook 08 puts them on the frontier
(`colquant.frontier`). This module says what a point is: `WeightSetting`, its variant name, its
`QuantizationSettings`, the bits it stores, whether a fast kernel runs it, and the runs the grid costs.

Packed sizes follow auto-round's `auto_round:auto_gptq` packing, which `colquant.weight_checks`
checks tensor by tensor: int32 words of 32/bits weights, one fp16 scale and one packed zero point per
group of inputs and output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from colquant.params import variant_name
from colquant.quantization import QuantizationSettings

SCALE_BITS = 16  # one fp16 scale per group, as auto-round stores and AutoScheme counts it
FAST_W4 = "fused Triton W4A16 GEMMs on CUDA (colquant.kernels); a dequantized reference on CPU"
FAST_FP8 = "FP8 tensor cores on CUDA compute capability 8.9+ (colquant.fp8); a dequantized reference elsewhere"
DEQUANTIZED = ("dequantized: no fused kernel in colquant runs {what}, so its layers run auto-round's torch QuantLinear "
               "(quality and memory are real, speed is not what a kernel would give)")


def average_bits(bits: int, group_size: int) -> float:
    """Bits stored per weight of a W{bits} layer with groups of `group_size` inputs: the weight, plus a
    16-bit scale and a `bits`-bit zero point per group (AutoScheme's count; exact when the group size
    divides the layer's input width, which the profile checks)."""
    return bits + (SCALE_BITS + bits) / group_size


def packed_layer_bytes(in_features: int, out_features: int, bits: int, group_size: int) -> int:
    """Bytes of one packed Linear as auto-round saves it: qweight and qzeros (int32), scales (fp16); no
    g_idx (groups in input order)."""
    groups = -(-in_features // group_size)
    qweight = in_features * bits // 32 * out_features * 4
    qzeros = groups * (out_features * bits // 32) * 4
    return qweight + qzeros + groups * out_features * 2


@dataclass(frozen=True)
class WeightSetting:
    """One grid point. `bits` is the width of every layer, except for AutoScheme (`avg_bits` set), where
    each layer gets one of `options` and `bits` is the lowest, auto-round's default scheme."""

    method: str  # "autoround", "rtn" or "autoscheme"
    bits: int
    group_size: int
    avg_bits: float | None = None
    options: tuple[int, ...] = ()

    def name(self, profile: dict[str, Any], calibration_source: str) -> str:
        """The variant's name: `w3a16-g128-sym-<source>-seqlen512-iters200`, `w3a16-g128-sym-rtn` or
        `autoscheme-w3w4a16-avg3.5-g128-sym-<source>-seqlen512-iters200`."""
        q = profile["quantization"]
        seqlen = q["grid"]["seqlen"]
        if self.method != "autoscheme":
            return variant_name(self.bits, self.group_size, q["sym"], self.method, seqlen=seqlen, iters=q["iters"],
                                calibration_source=calibration_source)
        tuned = variant_name(self.bits, self.group_size, q["sym"], seqlen=seqlen, iters=q["iters"],
                             calibration_source=calibration_source).split("-", 1)[1]
        return f"autoscheme-w{'w'.join(map(str, self.options))}a16-avg{self.avg_bits:g}-{tuned}"

    def settings(self, profile: dict[str, Any]) -> QuantizationSettings:
        """What `quantization.quantize_language_model` runs (iters 0 for RTN, as the seeds' baseline)."""
        base = QuantizationSettings.from_profile(profile, "rtn" if self.method == "rtn" else "autoround")
        tuned = replace(base, bits=self.bits, group_size=self.group_size)
        if self.method != "autoscheme":
            return tuned
        from colquant.autoscheme import AutoSchemeSettings

        return AutoSchemeSettings(**{**vars(tuned), "method": "autoscheme"}, avg_bits=self.avg_bits, options=self.options,
                                  selection_samples=profile["quantization"]["grid"]["autoscheme"]["nsamples"])


def grid_settings(profile: dict[str, Any]) -> list[WeightSetting]:
    """The profile's grid points in order: auto-round by group size then bits, RTN likewise, AutoScheme by budget."""
    grid = profile["quantization"]["grid"]
    if grid is None:
        return []
    pairs = [(bits, group_size) for group_size in grid["group_sizes"] for bits in sorted(grid["bits"])]
    points = [WeightSetting("autoround", bits, group_size) for bits, group_size in pairs]
    points += [WeightSetting("rtn", bits, group_size) for bits, group_size in pairs] if grid["rtn"] else []
    autoscheme = grid["autoscheme"]
    if autoscheme is not None:
        options = tuple(sorted(autoscheme["options"]))
        points += [WeightSetting("autoscheme", options[0], autoscheme["group_size"], budget, options)
                   for budget in autoscheme["avg_bits"]]
    return points


def grid_variants(profile: dict[str, Any], calibration_source: str) -> dict[str, WeightSetting]:
    """The grid's variants by name; a point that is also a variant the profile makes anyway (W4 g128 at
    the grid's seqlen, its RTN) is listed under that one name, once."""
    return {point.name(profile, calibration_source): point for point in grid_settings(profile)}


def weight_format(settings: dict[str, Any]) -> str:
    """What a variant's weights are, in a few words, from its metadata's settings (e.g. `W3A16 g128`,
    `AutoScheme W3/W4A16 g128, 3.5 bits on average`, `FP8 W8A8 per channel`)."""
    if settings["method"] == "fp8-dynamic":
        return "FP8 W8A8 per channel"
    if settings["method"] == "autoscheme":
        options = "/".join(f"W{bits}" for bits in settings["options"])
        return f"AutoScheme {options}A16 g{settings['group_size']}, {settings['avg_bits']:g} bits on average"
    return f"W{settings['bits']}A16 g{settings['group_size']}"


def kernel_path(settings: dict[str, Any]) -> tuple[bool, str]:
    """(whether a fast kernel runs these weights on a GPU, which path runs them). Only uniform 4-bit
    layers and FP8 have kernels here; W2/W3/W8 and mixed widths are evaluated dequantized."""
    if settings["method"] == "fp8-dynamic":
        return True, FAST_FP8
    if settings["method"] == "autoscheme":
        return False, DEQUANTIZED.format(what="mixed widths (q/k/v and gate/up must share one 4-bit width to fuse)")
    if settings["bits"] == 4:
        return True, FAST_W4
    return False, DEQUANTIZED.format(what=f"W{settings['bits']}A16")
