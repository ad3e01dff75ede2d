"""What a quantized variant's weights are, in words a name, a card and a report share: the variant's name
from its settings, its format (`W3A16 g128`, `AutoScheme W3/W4A16 g128, 3.5 bits on average`), whether a
fast kernel runs it, and the bits per weight a width stores.

Kept apart from `colquant.quantize.weight_grid` (the frontier's grid points) and free of torch, because the
profile schema (`colquant.research.params`), the model cards (`colquant.quantize.cards`) and the report all name variants.
"""

from __future__ import annotations

from typing import Any

SCALE_BITS = 16  # one fp16 scale per group, as auto-round stores and AutoScheme counts it
FAST_W4 = "fused Triton W4A16 GEMMs on CUDA (colquant.kernels); a dequantized reference on CPU"
FAST_FP8 = "FP8 tensor cores on CUDA compute capability 8.9+ (colquant.retriever.fp8); a dequantized reference elsewhere"
FAST_W4A8 = ("vLLM's CUTLASS W4A8 GEMMs on Hopper (colquant.kernels.w4a8); a dequantized reference with FP8-rounded "
             "activations elsewhere")
DEQUANTIZED = ("dequantized: no fused kernel in colquant runs {what}, so its layers run auto-round's torch QuantLinear "
               "(quality and memory are real, speed is not what a kernel would give)")


def variant_name(bits: int, group_size: int, sym: bool, method: str = "autoround", *, seqlen: int = 0,
                 iters: int = 0, calibration_source: str | None = None) -> str:
    """A quantized variant's name, made of its settings, so notebooks and mteb tell variants apart.

    e.g. `w4a16-g128-sym-pile10k-seqlen512-iters200` (auto-round) or `...-rtn` for the baseline.
    `calibration_source` is the source the calibration set actually came from
    (`CalibrationSet.source_used`), not the one the profile requested: a variant calibrated on the
    embedded fallback is `...-embedded-...`, never `...-pile10k-...`.
    """
    base = f"w{bits}a16-g{group_size}-{'sym' if sym else 'asym'}"
    if method == "rtn":
        return f"{base}-rtn"
    if not calibration_source:
        raise ValueError("an auto-round variant's name needs calibration_source: the source its calibration "
                         "set actually used (CalibrationSet.source_used)")
    source = "".join(character for character in calibration_source if character.isalnum())
    return f"{base}-{source}-seqlen{seqlen}-iters{iters}"


def average_bits(bits: int, group_size: int) -> float:
    """Bits stored per weight of a W{bits} layer with groups of `group_size` inputs: the weight, plus a
    16-bit scale and a `bits`-bit zero point per group (AutoScheme's count; exact when the group size
    divides the layer's input width, which the profile checks)."""
    return bits + (SCALE_BITS + bits) / group_size


def weight_format(settings: dict[str, Any]) -> str:
    """What a variant's weights are, in a few words, from its metadata's settings (e.g. `W3A16 g128`,
    `AutoScheme W3/W4A16 g128, 3.5 bits on average`, `FP8 W8A8 per channel`)."""
    if settings["method"] == "fp8-dynamic":
        return "FP8 W8A8 per channel"
    if str(settings.get("activations", "")).startswith("fp8"):  # a W4A8 run of a 4-bit checkpoint
        return f"W{settings['bits']}A8 g{settings['group_size']} (FP8 activations)"
    if settings["method"] == "autoscheme":
        options = "/".join(f"W{bits}" for bits in settings["options"])
        return f"AutoScheme {options}A16 g{settings['group_size']}, {settings['avg_bits']:g} bits on average"
    return f"W{settings['bits']}A16 g{settings['group_size']}"


def kernel_path(settings: dict[str, Any]) -> tuple[bool, str]:
    """(whether a fast kernel runs these weights on a GPU, which path runs them). Only uniform 4-bit
    layers and FP8 have kernels here; W2/W3/W8 and mixed widths are evaluated dequantized."""
    if settings["method"] == "fp8-dynamic":
        return True, FAST_FP8
    if str(settings.get("activations", "")).startswith("fp8"):
        return True, FAST_W4A8
    if settings["method"] == "autoscheme":
        return False, DEQUANTIZED.format(what="mixed widths (q/k/v and gate/up must share one 4-bit width to fuse)")
    if settings["bits"] == 4:
        return True, FAST_W4
    return False, DEQUANTIZED.format(what=f"W{settings['bits']}A16")
