"""Run profiles: the YAML files in `params/` that parameterise every notebook and the pipeline.

A profile is read once, checked, and passed around as a plain dict so notebooks can show it. The
checks catch the mistakes that would otherwise surface an hour into a GPU run (a misspelt
calibration source, a seqlen that is not a positive integer, a group size that does not divide
the layers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REQUIRED_SECTIONS = ("model", "corpus", "calibration", "quantization", "evaluation", "fidelity", "sweep")
CALIBRATION_SOURCES = ("pile-10k", "colpali-train", "pages")
OFFLINE_FALLBACKS = ("embedded", "none")
EXPORT_FORMATS = ("auto_round", "auto_gptq", "auto_awq")


class ProfileError(ValueError):
    """A profile file is missing, malformed, or names an impossible setting."""


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read and validate `params/<name>.yaml`; relative paths inside stay relative to the repo root."""
    path = Path(path)
    if not path.exists():
        available = ", ".join(sorted(p.name for p in path.parent.glob("*.yaml"))) or "none"
        raise ProfileError(f"no profile at {path} (profiles in {path.parent}: {available})")
    profile = yaml.safe_load(path.read_text())
    if not isinstance(profile, dict):
        raise ProfileError(f"{path} must be a YAML mapping of sections")
    validate_profile(profile, source=str(path))
    return profile


def validate_profile(profile: dict[str, Any], source: str = "profile") -> None:
    missing = [s for s in ("profile", "random_weights", *REQUIRED_SECTIONS) if s not in profile]
    if missing:
        raise ProfileError(f"{source} lacks {', '.join(missing)}; see params/tiny.yaml for a complete profile")
    calibration, quantization = profile["calibration"], profile["quantization"]
    _one_of(source, "calibration.source", calibration["source"], CALIBRATION_SOURCES)
    _one_of(source, "calibration.offline_fallback", calibration["offline_fallback"], OFFLINE_FALLBACKS)
    for key in ("nsamples",):
        _positive_int(source, f"calibration.{key}", calibration[key])
    if not calibration["seqlens"]:
        raise ProfileError(f"{source}: calibration.seqlens is empty; give at least one, e.g. [512]")
    for seqlen in calibration["seqlens"]:
        _positive_int(source, "calibration.seqlens[]", seqlen)
    if quantization["bits"] != 4:
        raise ProfileError(f"{source}: quantization.bits={quantization['bits']}; only W4A16 (bits: 4) is supported")
    _positive_int(source, "quantization.group_size", quantization["group_size"])
    if quantization["iters"] < 0 or not isinstance(quantization["iters"], int):
        raise ProfileError(f"{source}: quantization.iters must be an integer >= 0 (0 = RTN), got {quantization['iters']!r}")
    _positive_int(source, "quantization.batch_size", quantization["batch_size"])
    for fmt in quantization["export_formats"]:
        _one_of(source, "quantization.export_formats[]", fmt, EXPORT_FORMATS)


def _one_of(source: str, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ProfileError(f"{source}: {key}={value!r} is not one of {', '.join(allowed)}")


def _positive_int(source: str, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ProfileError(f"{source}: {key} must be a positive integer, got {value!r}")


def variant_name(profile: dict[str, Any], seqlen: int, method: str = "autoround", *,
                 calibration_source: str | None = None) -> str:
    """A quantized variant's name, made of its settings, so notebooks and mteb tell variants apart.

    e.g. `w4a16-g128-sym-pile10k-seqlen512-iters200` (auto-round) or `...-rtn` for the baseline.
    `calibration_source` is the source the calibration set actually came from
    (`CalibrationSet.source_used`), not the one the profile requested: a variant calibrated on the
    embedded fallback is `...-embedded-...`, never `...-pile10k-...`.
    """
    q = profile["quantization"]
    symmetry = "sym" if q["sym"] else "asym"
    base = f"w{q['bits']}a16-g{q['group_size']}-{symmetry}"
    if method == "rtn":
        return f"{base}-rtn"
    if not calibration_source:
        raise ValueError("an auto-round variant's name needs calibration_source: the source its calibration "
                         "set actually used (CalibrationSet.source_used)")
    source = "".join(character for character in calibration_source if character.isalnum())
    return f"{base}-{source}-seqlen{seqlen}-iters{q['iters']}"
