"""The weight settings of the quality-memory frontier: what each grid point is, its name and its cost.

A profile's `quantization.grid` asks for auto-round W{bits}A16 at every (bits, group size), an RTN
baseline for each, and auto-round's AutoScheme (per-layer bit widths under an average-bits budget),
all tuned on the calibration set of one seqlen. Notebook 03 makes them (`colquant.research.variants`), 04-07
measure them as they measure every variant, and notebook 08 puts them on the frontier
(`colquant.research.frontier`). This module says what a point is: `WeightSetting`, its variant name, its
`QuantizationSettings` and the packed bytes it stores; `colquant.quantize.weight_formats` says what its weights are
and whether a fast kernel runs them.

Packed sizes follow auto-round's `auto_round:auto_gptq` packing, which `colquant.retriever.weight_checks`
checks tensor by tensor: int32 words of 32/bits weights, one fp16 scale and one packed zero point per
group of inputs and output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from colquant.quantize.autoround import QuantizationSettings
from colquant.quantize.autoscheme import AutoSchemeSettings
from colquant.quantize.weight_formats import variant_name


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
