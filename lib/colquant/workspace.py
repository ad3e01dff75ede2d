"""Where a profile's inputs and results live, so notebooks, pipeline and report agree on paths.

Relative paths in a profile are relative to the repository root, whatever directory a notebook
runs in (JupyterLab starts in notebooks/, papermill in the root). `COLQUANT_OUTPUT_ROOT` moves all
outputs elsewhere: `make test-notebooks` uses it to run nbval against a fresh directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT_ROOT_ENV = "COLQUANT_OUTPUT_ROOT"
BASELINE = "bf16"


def resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def output_dir(profile: dict[str, Any]) -> Path:
    root = Path(os.environ.get(OUTPUT_ROOT_ENV) or REPO_ROOT / "outputs")
    directory = root / profile["profile"]
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def corpus_dir(profile: dict[str, Any]) -> Path:
    return output_dir(profile) / "corpus"


def calibration_file(profile: dict[str, Any], seqlen: int) -> Path:
    c = profile["calibration"]
    return output_dir(profile) / "calibration" / f"{c['source']}-seqlen{seqlen}-n{c['nsamples']}.pt"


def variants_dir(profile: dict[str, Any]) -> Path:
    return output_dir(profile) / "variants"


def plots_dir(profile: dict[str, Any]) -> Path:
    directory = output_dir(profile) / "plots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def base_model(profile: dict[str, Any]) -> Path:
    """The BF16 checkpoint directory: built locally for the embedded/synthetic profiles, otherwise
    the hub model (downloaded, or from the local cache; a clear CheckpointError when neither works)."""
    from colquant import tiny
    from colquant.checkpoint import resolve_checkpoint

    model = profile["model"]
    if model["id"] == "embedded-tiny":
        return tiny.build(output_dir(profile) / "base-model", size="tiny")
    if model["id"] == "synthetic-4b":
        return tiny.build(output_dir(profile) / "base-model", size="4b", device=model["device"])
    return resolve_checkpoint(model["id"], model.get("revision"))


def base_model_revision(profile: dict[str, Any]) -> str:
    """The hub commit the base model was read from (recorded with every result), or "local build"
    for the models this project builds itself; a hub id without a pinned `model.revision` reports
    the commit its cached snapshot holds."""
    from colquant.checkpoint import snapshot_revision

    if profile["model"]["id"] in ("embedded-tiny", "synthetic-4b"):
        return "local build"
    return snapshot_revision(base_model(profile)) or profile["model"].get("revision") or "unknown"


def quantized_variants(profile: dict[str, Any]) -> dict[str, Path]:
    """Finished quantized checkpoints (those with their metadata written), by variant name."""
    from colquant.quantization import METADATA_FILE

    directory = variants_dir(profile)
    finished = {
        path: json.loads((path / METADATA_FILE).read_text())
        for path in (directory.iterdir() if directory.exists() else [])
        if (path / METADATA_FILE).exists()
    }

    def order(path: Path) -> tuple[bool, int, str]:  # auto-round by seqlen, then the RTN baseline
        metadata = finished[path]
        return metadata["settings"]["method"] == "rtn", metadata["calibration"]["seqlen"], path.name

    return {path.name: path for path in sorted(finished, key=order)}


def all_variants(profile: dict[str, Any]) -> dict[str, Path]:
    """BF16 first, then every quantized variant: what notebooks 04-06 compare."""
    return {BASELINE: base_model(profile), **quantized_variants(profile)}


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    partial.replace(path)
    return path


def results_dir(profile: dict[str, Any]) -> Path:
    directory = output_dir(profile) / "results"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def load_variant(profile: dict[str, Any], path: str | Path, *, accelerate: bool | None = None) -> tuple[Any, Any]:
    """Load a variant (BF16 or 4-bit) with the profile's dtype, device and visual-token budget.

    `accelerate` as in `colquant.load` (default: the fused fast path on CUDA); pass False where
    code needs transformers' own decoder layers (per-layer hooks, auto-round's block replay).
    """
    from colquant.checkpoint import load

    model = profile["model"]
    return load(
        path,
        dtype=model["dtype"],
        device=model["device"],
        max_num_visual_tokens=model["max_num_visual_tokens"],
        accelerate=accelerate,
    )


def corpus(profile: dict[str, Any]) -> Any:
    """The embedded page corpus of the profile (built on first use; cached on disk)."""
    from colquant.corpus import build_corpus

    c = profile["corpus"]
    return build_corpus(corpus_dir(profile), n_pages=c.get("n_pages", 60), n_queries=c.get("n_queries", 120), seed=c.get("seed", 0), progress=False)


def write_csv(path: Path, frame: Any) -> Path:
    """Write a DataFrame as CSV atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    frame.to_csv(partial, index=False)
    partial.replace(path)
    return path


def random_weights_notice(profile: dict[str, Any]) -> str:
    """The line every notebook and the report open with, so nobody mistakes the numbers' meaning."""
    if profile["random_weights"]:
        return (
            f"**Profile `{profile['profile']}`: random weights.** The model is randomly initialised, so "
            "every number here checks the machinery (shapes, formats, plumbing, costs), not retrieval quality."
        )
    return f"Profile `{profile['profile']}`: model `{profile['model']['id']}`."
