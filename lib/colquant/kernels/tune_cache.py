"""The on-disk cache of tuned kernel tables: one JSON file per GPU name and package versions.

Why a key, not just a file: the fastest W4A16 kernel depends on the GPU, the installed torch /
Triton / humming and the kernel sources themselves, so a table is reused only where all of them
match (the way Triton caches its autotuning); anything else is ignored with a logged message naming
what differs, and re-tuned. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

import torch

from colquant.basics.files import OutputError, write_text
from colquant.kernels import gemlite_ops, humming_ops, vllm_ops
from colquant.kernels.backend import default_cache_dir, slug, triton_import_error

logger = logging.getLogger("colquant.kernels")

SCHEMA = 2  # 2: tinygemm entries and nested copy fallbacks
# backend.py: the tuner times candidates with its `graph_time_us`
KERNEL_SOURCES = ("triton_gemm.py", "tinygemm.py", "autotune.py", "backend.py", "humming_ops.py", "gemlite_ops.py",
                  "vllm_ops.py")


def _package_version(name: str) -> str:
    """Installed version, or ``src`` for a source checkout on PYTHONPATH (no distribution metadata)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "src"


def kernel_sources_digest() -> str:
    """Short hash of the kernel sources: a table tuned for other kernels is stale even if the
    package versions match (a source checkout changes without a version bump)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in KERNEL_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def cache_key(device: torch.device | str) -> dict:
    """What a tuned table depends on: GPU name, colquant/torch/triton/humming/gemlite/vLLM-kernel versions,
    kernel sources."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    triton_version = None
    if triton_import_error() is None:
        import triton

        triton_version = triton.__version__
    return dict(schema=SCHEMA, gpu=gpu, colquant=_package_version("colquant"), torch=torch.__version__,
                triton=triton_version or "none", humming=humming_ops.version() or "none",
                gemlite=gemlite_ops.version() or "none", vllm=vllm_ops.version() or "none",
                kernels=kernel_sources_digest())


def cache_path(key: dict, cache_dir: Path | str | None = None) -> Path:
    """``<dir>/<gpu>-<colquant>-<torch>-<triton>-<humming|none>.json``."""
    name = "-".join(slug(str(key[k])) for k in ("gpu", "colquant", "torch", "triton", "humming"))
    return Path(cache_dir or default_cache_dir()) / f"{name}.json"


def write_table(path: Path, key: dict, entries: list[dict]) -> None:
    """Write atomically (`files.write_text`): a concurrent reader never sees half a table."""
    payload = json.dumps(dict(key=key, entries=sorted(entries, key=lambda e: (e["K"], e["N"], e["M_bucket"]))),
                         indent=1)
    write_text(path, payload + "\n")


def save_table(path: Path, key: dict, entries: list[dict]) -> bool:
    """:func:`write_table`, except that an unwritable cache is not fatal: the table just tuned is
    used for this process, and the warning says how to make it persist."""
    try:
        write_table(path, key, entries)
    except (OSError, OutputError) as exc:  # files.write_text reports failures as OutputError
        logger.warning("colquant.kernels: could not write the kernel tuning cache %s (%s); this process uses "
                       "the table it just tuned, the next one tunes again. Set COLQUANT_CACHE_DIR to a "
                       "writable directory to keep it", path, exc)
        return False
    return True


def read_table(path: Path, key: dict) -> list[dict] | None:
    """The cached entries, or None (with a logged reason) when the file is missing, unreadable, or
    was tuned for another GPU / other versions / other kernel sources."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        found, entries = data["key"], data["entries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("colquant.kernels: ignoring the kernel tuning cache %s (unreadable: %s); re-tuning",
                       path, exc)
        return None
    diff = {k: (found.get(k), v) for k, v in key.items() if found.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {old!r} (here {new!r})" for k, (old, new) in diff.items())
        logger.warning("colquant.kernels: ignoring the kernel tuning cache %s: it was tuned for %s; re-tuning",
                       path, what)
        return None
    return entries
