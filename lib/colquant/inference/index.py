"""A corpus's page embeddings on disk: the shard files `encode-corpus` writes, the manifest that
says what they depend on, and `load_index` / `iter_shards`, the readers that verify them
(`colquant.inference.page_sources` reads the pages).

An index directory holds

    manifest.json                     model (id, checkpoint fingerprint), processor settings, dtype,
                                      source, page count and a hash of the page ids, shard size;
                                      once every shard is written `complete: true`, the token count,
                                      and one digest per shard (`shard_sha256`)
    shards/shard-000000.safetensors   one shard of `shard_size` consecutive pages: `embeddings`
                                      (tokens, dim) flat in the model's dtype, `offsets` (pages + 1,
                                      int64); in the header metadata the index key, the shard number,
                                      its page ids, the sha256 of each page's source bytes, and the
                                      sha256 of its tensors

A shard is one file written atomically (`files.atomic_write`): it is whole or absent. A rerun keeps
a shard only if its header has the index key, the pages of the source at that place with the same
content (page sha256), and tensors that still hash to what was written; any other shard of this
index is encoded again, and one of another key (another model's) is refused. The key is a
fingerprint of what the embeddings depend on (checkpoint content, processor settings, dtype), so
embeddings of two models never mix in one directory. The readers check every shard against the
manifest (key, number, page count, the shard's digest over its tensors, page ids and page hashes),
and the whole against the manifest's page ids, page count and token count, so an index that was
edited, cut or mixed after it was finished is refused with the shard named. Embeddings are stored in
the model's dtype, which is lossless: the model computes in that dtype and `encode_pages` only widens
to float32; a page whose embedding is not finite is refused when written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from colquant.basics.files import atomic_write, fingerprint, write_text

log = logging.getLogger(__name__)

INDEX_FORMAT = 2  # 2: page and tensor hashes in each shard, shard digests in the manifest
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"


class CorpusIndexError(RuntimeError):
    """Base of the errors of the on-disk index: each message names the file at fault and the fix."""


class IndexMismatchError(CorpusIndexError):
    """The output directory holds an index of another model, settings or corpus."""


class IncompleteIndexError(CorpusIndexError):
    """The index is still being written, or a shard is missing, corrupt or changed."""


class EmbeddingError(CorpusIndexError):
    """The model gave embeddings that cannot be stored (NaN or infinite values)."""


# --------------------------------------------------------------------------------------------
# Manifest and shards


def page_ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def shard_count(n_pages: int, shard_size: int) -> int:
    return -(-n_pages // shard_size)


def shard_pages(shard: int, n_pages: int, shard_size: int) -> range:
    """The page numbers of one shard: `shard_size` consecutive pages (fewer in the last)."""
    return range(shard * shard_size, min((shard + 1) * shard_size, n_pages))


def shard_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / SHARDS_DIR / f"shard-{shard:06d}.safetensors"


def new_manifest(*, model: dict[str, Any], processor: dict[str, Any], dtype: str, source: dict[str, Any],
                 page_ids: Sequence[str], shard_size: int) -> dict[str, Any]:
    """What the embeddings depend on (`key`) and the corpus layout they are stored in: `source` describes
    where the pages come from (`PageSource.description`), `page_ids` names them in order."""
    key = fingerprint(INDEX_FORMAT, model["fingerprint"], processor, dtype)
    return {"format": INDEX_FORMAT, "key": key, "model": model, "processor": processor, "dtype": dtype,
            "source": source, "pages": len(page_ids), "page_ids_sha256": page_ids_digest(page_ids),
            "shard_size": shard_size, "shards": shard_count(len(page_ids), shard_size), "complete": False}


def prepare_index_dir(out_dir: Path) -> None:
    """Create OUT, or refuse one that is a file or cannot be written, before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CorpusIndexError(f"{out_dir} is a file, not a directory: pass a directory for the index (OUT), "
                               "a new one or one encode-corpus wrote")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise CorpusIndexError(f"cannot write the index into {out_dir} ({error.strerror or error}): pass a "
                               "directory you can write to, or fix its permissions") from error


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IncompleteIndexError(f"{path} is not valid JSON ({error}); delete it and rerun encode-corpus "
                                   "(finished shards are checked against their own headers)") from error
    if not isinstance(manifest, dict):
        raise IncompleteIndexError(f"{path} is not a JSON object (it holds a {type(manifest).__name__}); delete it and "
                                   "rerun encode-corpus (finished shards are checked against their own headers)")
    if manifest.get("format") != INDEX_FORMAT:
        raise IndexMismatchError(f"{out_dir} holds an index of format {manifest.get('format')} (written by another "
                                 f"version of colquant); this one reads and writes format {INDEX_FORMAT}: "
                                 "encode the corpus again into a new directory, or delete this one")
    return manifest


def check_manifest(out_dir: Path, wanted: dict[str, Any]) -> None:
    """Refuse a directory that indexes another model or settings, another source or shard size.
    The same source with pages added, removed or changed is an update: shards whose pages are
    unchanged are kept."""
    existing = read_manifest(out_dir)
    if existing is None:
        return
    if existing["key"] != wanted["key"]:
        raise IndexMismatchError(
            f"{out_dir} holds embeddings of {existing['model']['id']} (fingerprint {existing['model']['fingerprint']}, "
            f"dtype {existing['dtype']}, processor {existing['processor']}), not of {wanted['model']['id']} "
            f"(fingerprint {wanted['model']['fingerprint']}, dtype {wanted['dtype']}, processor {wanted['processor']}); "
            "write to another directory, or delete this one to re-encode")
    if existing["source"] != wanted["source"] or existing["shard_size"] != wanted["shard_size"]:
        raise IndexMismatchError(
            f"{out_dir} indexes another source or shard layout ({existing['pages']} pages from {existing['source']}, "
            f"shard size {existing['shard_size']}) than this run ({wanted['pages']} pages from {wanted['source']}, "
            f"shard size {wanted['shard_size']}); write to another directory, or rerun with the same source and "
            "--shard-size")
    if existing["page_ids_sha256"] != wanted["page_ids_sha256"]:
        log.info("%s: the source's pages changed since the index was written (%d pages then, %d now): shards whose "
                 "pages are unchanged are kept, the others are encoded again", out_dir, existing["pages"], wanted["pages"])


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    return write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Shards


def processor_settings(processor: Any) -> dict[str, Any]:
    """The processor's settings page embeddings depend on beyond the checkpoint's files: the
    visual-token budget and the pixel bounds it sets, and how transparency is flattened."""
    return {"max_num_visual_tokens": processor.max_num_visual_tokens, "min_pixels": processor.min_pixels,
            "max_pixels": processor.max_pixels, "transparency": processor.transparency}


def pack_items(embeddings: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Items' (tokens, dim) embeddings as a shard's tensors: `embeddings` flat in `dtype`, `offsets`
    (items + 1, int64) where each item starts and ends."""
    lengths = torch.tensor([0] + [item.shape[0] for item in embeddings], dtype=torch.int64)
    return {"embeddings": torch.cat(list(embeddings)).to(dtype).contiguous(), "offsets": lengths.cumsum(0)}


def unpack_items(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """`pack_items` undone: each item's rows (views into the flat tensor)."""
    offsets = tensors["offsets"].tolist()
    return [tensors["embeddings"][start:end] for start, end in itertools.pairwise(offsets)]


def tensors_sha256(embeddings: torch.Tensor, offsets: torch.Tensor) -> str:
    """sha256 of a shard's tensors: dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for tensor in (embeddings, offsets):
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def shard_digest(header: dict[str, str]) -> str:
    """What the manifest records of a shard: a hash of its tensors' hash, page ids and page hashes."""
    parts = (header["content_sha256"], header["page_ids"], header["page_sha256"])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def write_shard(out_dir: Path, shard: int, ids: Sequence[str], page_digests: Sequence[str],
                embeddings: Sequence[torch.Tensor], dtype: torch.dtype, key: str) -> int:
    """Write one shard atomically; returns its token count. Pages whose embeddings are not finite
    are refused by id: an index never stores NaN or infinite values."""
    broken = [page for page, item in zip(ids, embeddings) if not torch.isfinite(item.to(dtype)).all()]
    if broken:
        raise EmbeddingError(
            f"the model gave NaN or infinite embeddings for {len(broken)} pages of shard {shard}: {broken[:10]}; "
            "nothing was stored for them. Check the model on these pages (notebook 04 counts NaN/Inf per variant), "
            "or encode with another --dtype")
    tensors = pack_items(embeddings, dtype)
    metadata = {"key": key, "shard": str(shard), "page_ids": json.dumps(list(ids)),
                "page_sha256": json.dumps(list(page_digests)),
                "content_sha256": tensors_sha256(tensors["embeddings"], tensors["offsets"])}
    atomic_write(shard_path(out_dir, shard), lambda staging: save_file(tensors, str(staging), metadata=metadata))
    return int(tensors["offsets"][-1])


def shard_header(path: Path) -> dict[str, str]:
    """The header metadata of a shard file (raises when the file is not a whole safetensors file)."""
    with safe_open(str(path), framework="pt") as reader:
        return reader.metadata() or {}


def offsets_problem(offsets: torch.Tensor, pages: int, rows: int) -> str | None:
    """Why `offsets` cannot cut `rows` token vectors into `pages` pages, or None."""
    if offsets.dtype != torch.int64 or offsets.shape != (pages + 1,):
        return f"offsets of shape {tuple(offsets.shape)} ({offsets.dtype}) for {pages} pages"
    if int(offsets[0]) != 0 or int(offsets[-1]) != rows or not bool((offsets[1:] > offsets[:-1]).all()):
        return f"offsets {offsets.tolist()[:6]}... do not cut {rows} token vectors into {pages} non-empty pages"
    return None


def _shard_problem(header: dict[str, str], tensors: dict[str, torch.Tensor], shard: int) -> str | None:
    """Why a shard's own parts disagree (number, tensors against their hash, offsets), or None."""
    if header.get("shard") != str(shard):
        return f"its header says it is shard {header.get('shard')}"
    if tensors_sha256(tensors["embeddings"], tensors["offsets"]) != header["content_sha256"]:
        return "its tensors changed after it was written (their sha256 differs from its header's)"
    return offsets_problem(tensors["offsets"], len(json.loads(header["page_ids"])), tensors["embeddings"].shape[0])


def finished_shard(out_dir: Path, shard: int, ids: Sequence[str], page_digests: Sequence[str], key: str) -> bool:
    """True when the shard file is whole, intact, and holds exactly these pages, with this content,
    under this key: a rerun keeps it. Any other shard of this index is encoded again (a file cut
    short, tensors changed since written, pages changed in the source), and one of another key is
    refused."""
    path = shard_path(out_dir, shard)
    if not path.exists():
        return False
    try:
        header = shard_header(path)
        tensors = load_file(str(path))
        stored = (json.loads(header["page_ids"]), json.loads(header["page_sha256"]))
        problem = _shard_problem(header, tensors, shard)
    except Exception as error:  # safetensors raises its own error type for a truncated file
        log.warning("%s is not a whole shard (%s): encoding it again", path, error)
        return False
    if header.get("key") != key:
        raise IndexMismatchError(f"{path} holds embeddings of another model or settings (key {header.get('key')}) than "
                                 f"this run's (key {key}): it was copied in from another index; delete it and rerun")
    if problem:
        log.warning("%s: %s; encoding it again", path, problem)
        return False
    if stored != (list(ids), list(page_digests)):
        changed = [page for page, old, new in zip(ids, stored[1], page_digests) if old != new]
        log.info("%s: its pages changed in the source (%s): encoding it again", path,
                 f"content of {changed[:5]}" if stored[0] == list(ids) else "other pages at its place")
        return False
    return True


def shard_record(out_dir: Path, shard: int, ids: Sequence[str], key: str) -> tuple[str, int]:
    """(digest, tokens) of a shard this run wrote or kept, read from its header, for the manifest."""
    path = shard_path(out_dir, shard)
    try:
        header = shard_header(path)
        with safe_open(str(path), framework="pt") as reader:
            rows = reader.get_slice("embeddings").get_shape()[0]
    except Exception as error:
        raise IncompleteIndexError(f"{path} is missing or corrupt after every rank finished ({error}); rerun "
                                   "encode-corpus to encode it") from error
    if header.get("key") != key or json.loads(header["page_ids"]) != list(ids):
        raise IncompleteIndexError(f"{path} changed while the index was written (other key or pages); rerun "
                                   "encode-corpus to encode it again")
    return shard_digest(header), rows


def remove_shards_from(out_dir: Path, first: int) -> None:
    """Delete shard files numbered `first` and up: left by a run over a source that had more pages."""
    for path in sorted((Path(out_dir) / SHARDS_DIR).glob("shard-*.safetensors")):
        number = path.name.removeprefix("shard-").removesuffix(".safetensors")
        if number.isdigit() and int(number) >= first:
            log.info("removing %s: the source has fewer pages now", path)
            path.unlink()


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class CorpusIndex:
    """Page ids and their multi-vector embeddings (views into one tensor per shard), in source
    order: `colquant.score(queries, index.embeddings)` scores them."""

    ids: list[str]
    embeddings: list[torch.Tensor]
    manifest: dict[str, Any]


def complete_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a finished index; an unfinished, foreign or inconsistent one is refused."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise IncompleteIndexError(f"{out_dir} has no {MANIFEST}: it is not an index written by encode-corpus (if "
                                   "its manifest was lost, rerun encode-corpus into it with the same arguments: the "
                                   "shards it finds are checked and kept)")
    if not manifest.get("complete"):
        raise IncompleteIndexError(f"{out_dir} is not finished ({manifest['shards']} shards planned): rerun "
                                   "encode-corpus with the same arguments to complete it")
    planned = shard_count(manifest["pages"], manifest["shard_size"])
    if manifest["shards"] != planned or len(manifest.get("shard_sha256", ())) != planned:
        raise IncompleteIndexError(
            f"{out_dir / MANIFEST} was edited: {manifest['pages']} pages in shards of {manifest['shard_size']} make "
            f"{planned} shards, but it lists {manifest['shards']} shards and {len(manifest.get('shard_sha256', ()))} "
            "shard digests; rerun encode-corpus into it with the same arguments to rewrite it")
    return manifest


def read_shard(out_dir: Path, shard: int, manifest: dict[str, Any]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """One shard's page ids and tensors, checked against the manifest; refused, named, otherwise."""
    path = shard_path(out_dir, shard)
    redo = f"rerun encode-corpus into {out_dir} with the same arguments to encode it again"
    try:
        header = shard_header(path)
        tensors = load_file(str(path))
        ids = json.loads(header["page_ids"])
        problem = _shard_problem(header, tensors, shard)
    except Exception as error:
        raise IncompleteIndexError(f"{path} is missing or corrupt ({error}); {redo}") from error
    if header.get("key") != manifest["key"]:
        raise IndexMismatchError(f"{path} holds embeddings of another model or settings (key {header.get('key')}) than "
                                 f"this index of {manifest['model']['id']} (key {manifest['key']}): it was copied in "
                                 f"from another index; delete it and {redo}")
    if problem is None and len(ids) != len(shard_pages(shard, manifest["pages"], manifest["shard_size"])):
        problem = f"it holds {len(ids)} pages where the manifest places {manifest['shard_size']}"
    if problem is None and shard_digest(header) != manifest["shard_sha256"][shard]:
        problem = "its pages or embeddings are not those the index was finished with (its digest differs)"
    if problem:
        raise IncompleteIndexError(f"{path} does not match the index: {problem}; {redo}")
    if tensors["embeddings"].dtype != getattr(torch, manifest["dtype"]):
        raise IncompleteIndexError(f"{path} holds {tensors['embeddings'].dtype} embeddings in a {manifest['dtype']} "
                                   f"index; {redo}")
    return ids, tensors


def iter_shards(out_dir: str | Path) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """(page ids, embeddings) of one shard at a time, in source order: for corpora larger than
    memory (score each shard, keep the best pages). Every shard is checked before it is yielded,
    the page ids and token count of the whole after the last."""
    out_dir = Path(out_dir)
    manifest = complete_manifest(out_dir)
    seen: list[str] = []
    tokens = 0
    for shard in range(manifest["shards"]):
        ids, tensors = read_shard(out_dir, shard, manifest)
        seen += ids
        tokens += int(tensors["offsets"][-1])
        yield ids, unpack_items(tensors)
    if len(seen) != manifest["pages"] or page_ids_digest(seen) != manifest["page_ids_sha256"] \
            or tokens != manifest["tokens"]:
        raise IncompleteIndexError(
            f"{out_dir}: its shards hold {len(seen)} pages and {tokens} token vectors, the manifest "
            f"{manifest['pages']} pages (ids hash {manifest['page_ids_sha256'][:12]}) and {manifest['tokens']}; rerun "
            "encode-corpus into it with the same arguments to repair it")


def load_index(out_dir: str | Path) -> CorpusIndex:
    """Read a complete index written by `encode_corpus` into memory, every shard verified; refuse
    one still being written or changed after it was finished."""
    manifest = complete_manifest(Path(out_dir))
    ids: list[str] = []
    embeddings: list[torch.Tensor] = []
    for shard_ids, shard_embeddings in iter_shards(out_dir):
        ids += shard_ids
        embeddings += shard_embeddings
    return CorpusIndex(ids, embeddings, manifest)
