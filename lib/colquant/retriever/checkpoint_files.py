"""The files a ColQuant checkpoint folder holds beside its weights, and the fingerprint of those weights.

A quantized variant's folder carries its metadata (written once, with the checkpoint) and the results
later notebooks measure on it (fidelity, NDCG@5), kept apart so the metadata is never rewritten and
bound to the weights' content (`checkpoint_fingerprint`) so the numbers cannot outlive the weights.
Whoever writes a checkpoint (quantization, FP8 variants), caches a result of one (sweeps, indexes,
evaluation) or publishes one (the hub) reads these names here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from colquant.basics.files import FINGERPRINT_LENGTH, OutputError, file_sha256, read_json, write_json

METADATA_FILE = "quantization_metadata.json"
REPORTED_RESULTS_FILE = "reported_results.json"
# Files a finished checkpoint may get later without its weights changing (the report rewrites them).
NOT_CHECKPOINT_CONTENT = ("README.md", REPORTED_RESULTS_FILE)
# Where a variant keeps its GPTQ/AWQ exports: whole checkpoints of their own, not part of its size.
EXPORTS_DIR = "exports"


def checkpoint_fingerprint(path: str | Path) -> str:
    """The content identity of a checkpoint directory: every file's name and sha256.

    By content, so that the same model copied, touched or downloaded again is the same model, and a
    re-quantized or rebuilt one with other bytes is another. The model card and the results the report
    records are left out: they change after the checkpoint is finished. Each file is read once per
    process (`files.file_sha256` caches it), at sha256's rate: 0.65-0.72 GB/s measured on the shared
    2-core development machine (a 2.1 GB file), so the 4B model's 8.9 GB of bf16 weights cost ~13 s
    once per process, a 4-bit variant a third of that.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {root}")
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if relative.name in NOT_CHECKPOINT_CONTENT or relative.parts[0].startswith("."):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def read_variant_metadata(checkpoint: str | Path) -> dict[str, Any]:
    """A quantized variant's metadata; an empty or corrupt file is reported by path with the fix."""
    path = Path(checkpoint) / METADATA_FILE
    return read_json(path, f"delete the folder {path.parent} and re-run notebooks/03_quantization.ipynb "
                           "(or `python -m colquant run <profile>`) to quantize it again")


def write_reported_results(checkpoint: str | Path, results: dict[str, Any]) -> Path:
    """Record what later notebooks measured on a variant (fidelity, NDCG@5) beside it, bound to the
    weights they were measured on (`checkpoint_fingerprint`), so the numbers cannot outlive them."""
    checkpoint = Path(checkpoint)
    return write_json(checkpoint / REPORTED_RESULTS_FILE, {"weights": checkpoint_fingerprint(checkpoint), "results": results})


def read_reported_results(checkpoint: str | Path) -> dict[str, Any]:
    """The results recorded beside a variant ({} when none are), refused when they were measured
    on other weights than it holds now, or do not say which."""
    checkpoint = Path(checkpoint)
    path = checkpoint / REPORTED_RESULTS_FILE
    if not path.exists():
        return {}
    fix = (f"recompute them with `colquant run <profile>` (the report rewrites {path.name}), or delete {path} "
           "to go on without them")
    recorded = read_json(path, fix)
    if not isinstance(recorded, dict) or not {"weights", "results"} <= recorded.keys():
        raise OutputError(f"{path} does not say which weights its results were measured on (an older ColQuant "
                          f"wrote it, or it was edited); {fix}")
    current = checkpoint_fingerprint(checkpoint)
    if recorded["weights"] != current:
        raise OutputError(f"{path} holds results of other weights (fingerprint {recorded['weights']}) than "
                          f"{checkpoint.name} holds now ({current}): they are stale; {fix}")
    return recorded["results"]


def size_on_disk(checkpoint: Path) -> int:
    """Bytes of the checkpoint's weights (its safetensors files), the exports under `EXPORTS_DIR` left out."""
    weights = [f for f in checkpoint.rglob("*.safetensors") if EXPORTS_DIR not in f.relative_to(checkpoint).parts]
    return sum(f.stat().st_size for f in weights)


def variant_checkpoint(path: str | Path) -> tuple[Path, dict[str, str]]:
    """(the checkpoint a variant folder loads, the `colquant.load` options it loads it with): the folder
    itself as saved, or, for a W4A8 run (its metadata's `loads`), the 4-bit checkpoint beside it with
    FP8 activations, refused once that checkpoint holds other weights than the run was made for (its
    cached results would then be another model's)."""
    path = Path(path)
    loads = read_variant_metadata(path).get("loads") if (path / METADATA_FILE).exists() else None
    if loads is None:
        return path, {}
    checkpoint = path.parent / loads["checkpoint"]
    if not (checkpoint / METADATA_FILE).exists() or checkpoint_fingerprint(checkpoint) != loads["weights"]:
        raise OutputError(f"{path.name} runs {checkpoint} with {loads['activations']} activations, and that checkpoint "
                          "is missing or holds other weights than it was made for: re-run notebooks/03_quantization.ipynb "
                          "(or `colquant run <profile> --notebooks 03`) to make both again")
    return checkpoint, {"activations": loads["activations"]}
