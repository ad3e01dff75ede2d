"""Page and query embeddings of the ViDoRe evaluation on disk, so that each (variant, task) is encoded once.

Notebook 05 evaluates every variant through mteb, notebook 07 evaluates them again with compressed
page indexes, and a run killed part way evaluates again what it had not finished: each encodes the
same pages and queries with the same model. This cache keeps what one `encode` call of
`ColQuantEncoder` returned, so the next identical call reads it instead of encoding.

A call is identified by everything its embeddings depend on:
- the encoder (`encoder_identity`): the checkpoint's content (`checkpoint_files.checkpoint_fingerprint`),
  the processor's settings (visual-token budget and pixel bounds, transparency), the dtype, and the
  compute path that decides the arithmetic besides them (`compute_path`: device kind, attention,
  fused or transformers text tower, fast or eager vision tower, the 4-bit layers' dispatch table
  and weight copies, FP8 accumulation);
- the request (`Request`): task, dataset revision, subset, split, queries or pages, mteb's batch
  size (a page's embedding depends on the batch it is padded in) and the content of the items in
  order (`mteb_rows.items_digest`: texts, or each page's stored bytes).

Layout, under `<output dir>/embeddings/`:

    <encoder key>/manifest.json              the encoder's identity; one record per finished entry
                                             (its request, tokens, bytes, tensors' sha256)
    <encoder key>/<request key>.safetensors  one call's embeddings in encode-corpus's shard format
                                             (`index.pack_items`): `embeddings` flat in the model's
                                             dtype (what the encoder returns: lossless), `offsets`;
                                             the header names both keys and the tensors' sha256

An entry is written under a temporary name and renamed when complete (`files.atomic_write`), then
recorded in the manifest (written the same way). Only recorded entries are read, each checked
against its record and header (keys, item count, tensors' sha256), so what a killed run left is
never read; `remove_unfinished` deletes it (run under the output lock).

Bounded: `retain` drops the entries of checkpoints the profile no longer evaluates, and an entry is
not written where it would take the cache past `COLQUANT_EMBEDDING_CACHE_GB` (when set) or leave
less than `DISK_RESERVE` of the disk free: a warning says so and the evaluation goes on (that call
is encoded again next time).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from colquant.basics.files import OutputError, atomic_write, discard, fingerprint, read_json, write_json
from colquant.inference.index import (
    offsets_problem,
    pack_items,
    processor_settings,
    shard_header,
    tensors_sha256,
    unpack_items,
)
from colquant.retriever.checkpoint_files import checkpoint_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
ENTRY_SUFFIX = ".safetensors"
SIZE_ENV = "COLQUANT_EMBEDDING_CACHE_GB"
DISK_RESERVE = 0.05  # an entry is not written where it would leave less than this fraction of the disk free


@dataclass(frozen=True)
class Request:
    """One `encode` call: which items of which task, batched how. `content` is the digest of the
    items in order (`mteb_rows.items_digest`)."""

    task: str
    revision: str | None
    subset: str
    split: str
    kind: str  # "queries" or "pages"
    batch_size: int
    items: int
    content: str

    @property
    def key(self) -> str:
        return fingerprint(CACHE_FORMAT, asdict(self))


class EmbeddingCache:
    """The entries of one encoder (`identity`, see `encoder_identity`) under `root`.

    `get(request)` returns the items' embeddings (each (tokens, dim), the model's dtype) or None;
    `put(request, items)` stores them unless the cache is at its bound. `max_bytes` bounds the whole
    cache under `root` (default: `COLQUANT_EMBEDDING_CACHE_GB`, else only the disk reserve).
    """

    def __init__(self, root: str | Path, identity: dict[str, Any], *, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.identity = identity
        self.key = fingerprint(CACHE_FORMAT, identity)
        self.folder = self.root / self.key
        self.max_bytes = size_limit() if max_bytes is None else max_bytes
        self._refused: str | None = None  # why the last entry was not stored (warned once per reason)

    @classmethod
    def for_model(cls, root: str | Path, checkpoint: str | Path, model: torch.nn.Module, processor: Any,
                  **options: Any) -> EmbeddingCache:
        """The cache of a loaded model, read from the checkpoint directory it was loaded from."""
        return cls(root, encoder_identity(checkpoint, model, processor), **options)

    def get(self, request: Request) -> list[torch.Tensor] | None:
        """The embeddings of a finished entry for `request`, checked; None when there is none (or
        the one on disk is not what its record says, with a warning: it is encoded again)."""
        record = self._manifest()["entries"].get(request.key)
        if record is None:
            return None
        path = self.entry_path(request)
        try:
            header, tensors = shard_header(path), load_file(str(path))
        except Exception as error:  # noqa: BLE001  # safetensors raises its own error type for a damaged file
            log.warning("%s is not a whole cache entry (%s); encoding %s again", path, error, request.task)
            return None
        problem = _entry_problem(header, tensors, record, self.key, request)
        if problem:
            log.warning("%s: %s; encoding %s again", path, problem, request.task)
            return None
        return unpack_items(tensors)

    def has(self, request: Request) -> bool:
        """Whether a finished entry for `request` is recorded (`get` still checks it when read)."""
        return request.key in self._manifest()["entries"]

    def put(self, request: Request, items: list[torch.Tensor]) -> bool:
        """Store a call's embeddings (one entry, then its record); False when the cache is at its bound."""
        if not items:
            return False
        tensors = pack_items(items, items[0].dtype)
        nbytes = sum(tensor.nbytes for tensor in tensors.values())
        refusal = self._refusal(nbytes)
        if refusal:
            if refusal != self._refused:
                log.warning("embedding cache %s: %s; this evaluation goes on, and what it does not store is "
                            "encoded again next time", self.root, refusal)
            self._refused = refusal
            return False
        digest = tensors_sha256(tensors["embeddings"], tensors["offsets"])
        header = {"encoder": self.key, "request": request.key, "content_sha256": digest}
        path = atomic_write(self.entry_path(request), lambda staging: save_file(tensors, str(staging), metadata=header))
        manifest = self._manifest()
        manifest["entries"][request.key] = {**asdict(request), "tokens": int(tensors["offsets"][-1]),
                                            "dtype": str(items[0].dtype).removeprefix("torch."),
                                            "bytes": path.stat().st_size, "sha256": digest}
        write_json(self.folder / MANIFEST, manifest)
        return True

    def entry_path(self, request: Request) -> Path:
        return self.folder / f"{request.key}{ENTRY_SUFFIX}"

    def _manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        if not path.exists():
            return {"format": CACHE_FORMAT, "key": self.key, "identity": self.identity, "entries": {}}
        manifest = read_json(path, f"delete the folder {self.folder} (its entries are encoded again)")
        if not isinstance(manifest, dict) or manifest.get("key") != self.key or not isinstance(manifest.get("entries"), dict):
            raise OutputError(f"{path} is not the manifest of this encoder's cache (key {self.key}): it was edited "
                              f"or copied in; delete the folder {self.folder} (its entries are encoded again)")
        return manifest

    def _refusal(self, nbytes: int) -> str | None:
        """Why an entry of `nbytes` may not be written now (None: it may)."""
        if self.max_bytes is not None:
            used = cache_size(self.root)[1]
            if used + nbytes > self.max_bytes:
                return (f"it holds {used / 2**30:.2f} GiB and an entry of {nbytes / 2**30:.2f} GiB would pass "
                        f"{SIZE_ENV}={self.max_bytes / 2**30:.2f}")
        disk = shutil.disk_usage(_existing_parent(self.root))
        if disk.free - nbytes < DISK_RESERVE * disk.total:
            return (f"an entry of {nbytes / 2**30:.2f} GiB would leave less than {DISK_RESERVE:.0%} of the disk free "
                    f"({disk.free / 2**30:.1f} of {disk.total / 2**30:.1f} GiB free)")
        return None


def _entry_problem(header: dict[str, str], tensors: dict[str, torch.Tensor], record: dict[str, Any], key: str,
                   request: Request) -> str | None:
    """Why an entry file is not the one its record describes, or None."""
    if header.get("encoder") != key or header.get("request") != request.key:
        return "its header names another encoder or request (it was copied or renamed)"
    if {"embeddings", "offsets"} - tensors.keys():
        return "it lacks the embeddings or offsets tensor"
    if tensors_sha256(tensors["embeddings"], tensors["offsets"]) != header.get("content_sha256") \
            or header.get("content_sha256") != record["sha256"]:
        return "its tensors are not those recorded in the manifest (their sha256 differs)"
    if str(tensors["embeddings"].dtype).removeprefix("torch.") != record["dtype"]:
        return f"it holds {tensors['embeddings'].dtype} embeddings where {record['dtype']} were stored"
    return offsets_problem(tensors["offsets"], request.items, tensors["embeddings"].shape[0])


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


# --------------------------------------------------------------------------------------------
# What embeddings depend on besides their inputs


def encoder_identity(checkpoint: str | Path, model: torch.nn.Module, processor: Any) -> dict[str, Any]:
    """The checkpoint's content, the processor's settings, the dtype and the compute path of a
    loaded model: together, what its embeddings of given inputs depend on."""
    return {"checkpoint": checkpoint_fingerprint(checkpoint), "processor": processor_settings(processor),
            "dtype": str(model.dtype).removeprefix("torch."), "compute": compute_path(model)}


def compute_path(model: torch.nn.Module) -> dict[str, Any]:
    """What decides a forward's rounding besides the weights and dtype: the device kind (the CPU's
    reference ops and a GPU's kernels round differently; GPUs of one name are taken to compute
    alike), the attention implementation, the text tower's path (fused, with CUDA-graphed queries,
    or transformers'), the vision tower's (fast or eager), for 4-bit layers the kernel table entries
    of their shapes and the weight copies they hold (a BF16 copy multiplies other numbers than a
    4-bit kernel), and the FP8 layers' accumulation."""
    from colquant.kernels.linear import DISPATCH, W4A16Linear
    from colquant.retriever.encode import model_device
    from colquant.retriever.fp8 import FP8Linear

    device = model_device(model)
    text = model.language_model
    accel = getattr(text, "_colquant_accel", None)
    path: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "attention": model.config._attn_implementation,
        "text": "transformers" if accel is None else "fused+graphs" if accel.graphs else "fused",
        "vision": "fast" if getattr(type(model.visual), "_colquant_fast", False) else "eager",
    }
    four_bit = [module for module in model.modules() if isinstance(module, W4A16Linear)]
    if four_bit:
        shapes = {(layer.in_features, layer.out_features) for layer in four_bit}
        path["4-bit dispatch"] = fingerprint([e for e in DISPATCH.to_json() if (e["K"], e["N"]) in shapes])
        path["4-bit copies"] = dict(sorted(collections.Counter(kind for layer in four_bit
                                                               for kind in _held_copies(layer)).items()))
    accumulations = sorted({module.accumulation for module in model.modules() if isinstance(module, FP8Linear)})
    if accumulations:
        path["fp8 accumulation"] = accumulations
    return path


def _held_copies(layer: Any) -> list[str]:
    """The weight copies a W4A16Linear holds besides its own 4-bit tensors."""
    held = [kind for kind, copy in (("bf16", layer.bf16_weight), ("tinygemm", layer.tinygemm_weight),
                                    ("gemlite", layer._gemlite), ("humming", layer._humming)) if copy is not None]
    return held + ([layer._vllm.kind] if layer._vllm is not None else [])


# --------------------------------------------------------------------------------------------
# The cache as a whole


def size_limit() -> int | None:
    """`COLQUANT_EMBEDDING_CACHE_GB` in bytes, None when unset; anything but a number > 0 is refused."""
    text = os.environ.get(SIZE_ENV)
    if text is None or not text.strip():
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = float("nan")
    if not gib > 0:
        raise ValueError(f"{SIZE_ENV}={text!r} is not a size in GiB > 0: set it to e.g. 100, or unset it "
                         f"(then only the disk's free space, less {DISK_RESERVE:.0%}, bounds the cache)")
    return int(gib * 2**30)


def manifests(root: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """(encoder folder, manifest) of every encoder with a manifest under `root`."""
    root = Path(root)
    found = []
    for path in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        found.append((path.parent, read_json(path, f"delete the folder {path.parent} (its entries are encoded again)")))
    return found


def cache_size(root: str | Path) -> tuple[int, int]:
    """(entries, bytes) recorded under `root`."""
    records = [record for _, manifest in manifests(root) for record in manifest["entries"].values()]
    return len(records), sum(record["bytes"] for record in records)


def retain(root: str | Path, checkpoints: Iterable[str]) -> list[Path]:
    """Delete the entries of encoders whose checkpoint fingerprint is not in `checkpoints` (variants
    re-quantized or no longer evaluated); returns the folders removed."""
    keep = set(checkpoints)
    removed = [folder for folder, manifest in manifests(root) if manifest["identity"]["checkpoint"] not in keep]
    for folder in removed:
        log.info("removing %s: embeddings of a checkpoint this profile no longer evaluates", folder)
        discard(folder)
    return removed


def remove_unfinished(root: str | Path) -> list[Path]:
    """Delete what killed writes left under `root`: temporary files, and entry files or folders no
    manifest records. Only while no evaluation writes there (under the output lock)."""
    root = Path(root)
    removed = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []:
        manifest = folder / MANIFEST
        recorded = set(read_json(manifest, f"delete the folder {folder}")["entries"]) if manifest.is_file() else set()
        for path in sorted(folder.iterdir()):
            stem = path.name.removesuffix(ENTRY_SUFFIX)
            if path.name.endswith(".partial") or (path.name.endswith(ENTRY_SUFFIX) and stem not in recorded):
                path.unlink()
                removed.append(path)
        if not any(folder.iterdir()):
            folder.rmdir()
            removed.append(folder)
    if removed:
        log.info("removed %d unfinished embedding-cache files under %s, left by an interrupted run", len(removed), root)
    return removed
