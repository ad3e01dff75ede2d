"""A corpus's page embeddings on disk: the page sources `encode-corpus` reads, the shard files it
writes, the manifest that says what they depend on, and `load_index`, the reader.

An index directory holds

    manifest.json                     model (id, checkpoint fingerprint), processor settings, dtype,
                                      source, page count and a hash of the page ids, shard size;
                                      `complete: true` once every shard is written
    shards/shard-000000.safetensors   one shard of `shard_size` consecutive pages: `embeddings`
                                      (tokens, dim) flat in the model's dtype, `offsets` (pages + 1,
                                      int64); its page ids and the index key in the header metadata

A shard is one file written atomically (`files.atomic_write`): it is whole or absent, so a
rerun keeps every shard whose header matches the key and page ids, and redoes the rest. The key is
a fingerprint of what the embeddings depend on (checkpoint content, processor settings, dtype), so
embeddings of two models never mix in one directory. Embeddings are stored in the model's dtype,
which is lossless: the model computes in that dtype and `encode_pages` only widens to float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from colquant.processing import open_page
from colquant.workspace import atomic_write, fingerprint, write_text

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
PDF_SUFFIX = ".pdf"
DEFAULT_DPI = 144  # PDF pages rendered at 2x PDF points: ~1190 x 1684 px for A4, above the 1280-token cap
PDF_EXTRA_HINT = "pip install 'colquant[pdf]' (it installs pypdfium2)"


class CorpusIndexError(RuntimeError):
    """Base of the errors of the on-disk index: each message names the file at fault and the fix."""


class SourceError(CorpusIndexError):
    """The page source is missing, empty, unreadable, or needs an extra that is not installed."""


class IndexMismatchError(CorpusIndexError):
    """The output directory holds an index of another model, settings or corpus."""


class IncompleteIndexError(CorpusIndexError):
    """The index is still being written, or a shard is missing or corrupt."""


# --------------------------------------------------------------------------------------------
# Page sources


@dataclass
class PageSource:
    """An ordered list of pages: `ids[i]` names page i, `open(i)` decodes it. Every rank lists the
    same source the same way, so page i is the same page on every rank."""

    ids: list[str]
    description: dict[str, Any]
    opener: Callable[[int], Image.Image] = field(repr=False)

    def open(self, index: int) -> Image.Image:
        return self.opener(index)

    def __len__(self) -> int:
        return len(self.ids)


def open_source(source: str | Path, *, split: str | None = None, image_column: str | None = None,
                id_column: str | None = None, dpi: int = DEFAULT_DPI) -> PageSource:
    """The pages of `source`: a folder of page images and/or PDFs (each PDF page is one page), a
    `datasets` dataset saved with `save_to_disk`, or, with `split`, anything `datasets.load_dataset`
    reads (a hub id or a local dataset repository)."""
    path = Path(source).expanduser()
    if split is None and path.is_dir() and not _is_saved_dataset(path):
        return folder_source(path, dpi=dpi)
    if split is None and not path.exists():
        raise SourceError(f"no page source at {path}: pass a folder of page images or PDFs, a dataset saved "
                          "with save_to_disk, or a datasets repository with --split")
    return dataset_source(source, split=split, image_column=image_column, id_column=id_column)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def folder_source(root: Path, *, dpi: int = DEFAULT_DPI) -> PageSource:
    """Image files and PDF pages under `root` (recursively, hidden entries skipped), in path order;
    a page id is the relative path, with `#page=N` (1-based) for a PDF page."""
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    pages = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES | {PDF_SUFFIX}]
    if not pages:
        raise SourceError(f"{root} holds no page images ({', '.join(sorted(IMAGE_SUFFIXES))}) or PDFs"
                          f"{f' (only {len(files)} other files)' if files else ''}: point SOURCE at the folder of pages")
    if len(pages) < len(files):
        log.warning("%s: ignoring %d files that are neither images nor PDFs", root, len(files) - len(pages))
    ids: list[str] = []
    locations: list[tuple[Path, int | None]] = []
    for file in pages:
        relative = file.relative_to(root).as_posix()
        if file.suffix.lower() == PDF_SUFFIX:
            count = pdf_page_count(file)
            ids += [f"{relative}#page={n + 1}" for n in range(count)]
            locations += [(file, n) for n in range(count)]
        else:
            ids.append(relative)
            locations.append((file, None))

    def opener(index: int) -> Image.Image:
        file, page = locations[index]
        return render_pdf_page(file, page, dpi) if page is not None else read_image(file, ids[index])

    return PageSource(ids, {"kind": "folder", "path": str(root.resolve()), "dpi": dpi}, opener)


def read_image(file: Path, page_id: str) -> Image.Image:
    """A decoded image file; an unreadable one stops the run naming the file and the fix."""
    try:
        return open_page(file)
    except (ValueError, OSError) as error:
        raise SourceError(f"page {page_id!r} ({file}) cannot be read as an image ({error}); replace or remove "
                          "the file and rerun: finished shards are kept") from error


def _pdfium() -> Any:
    try:
        import pypdfium2
    except ModuleNotFoundError as error:
        raise SourceError(f"the source holds PDFs, and rendering them needs pypdfium2: {PDF_EXTRA_HINT}") from error
    return pypdfium2


@contextmanager
def _pdf_document(file: Path) -> Iterator[Any]:
    """An open PDF, closed after use (opening costs far less than rendering a page)."""
    pdfium = _pdfium()
    try:
        document = pdfium.PdfDocument(str(file))
    except pdfium.PdfiumError as error:
        raise SourceError(f"{file} cannot be opened as a PDF ({error}); replace or remove it and rerun") from error
    try:
        yield document
    finally:
        document.close()


def pdf_page_count(file: Path) -> int:
    with _pdf_document(file) as document:
        count = len(document)
    if count == 0:
        raise SourceError(f"{file} is a PDF with no pages; remove it and rerun")
    return count


def render_pdf_page(file: Path, page: int, dpi: int) -> Image.Image:
    """PDF page `page` (0-based) as an RGB image at `dpi` (PDF points are 1/72 inch)."""
    with _pdf_document(file) as document:
        return document[page].render(scale=dpi / 72).to_pil().convert("RGB")


def dataset_source(source: str | Path, *, split: str | None, image_column: str | None,
                   id_column: str | None) -> PageSource:
    """Rows of a `datasets` split; ids from `id_column`, else the row number."""
    import datasets

    path = Path(source).expanduser()
    if split is None:
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            raise SourceError(f"{path} holds the splits {sorted(dataset)}: pass --split with one of them")
    else:
        dataset = datasets.load_dataset(str(source), split=split)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    column = image_column or _the_image_column(dataset, source)
    if column not in dataset.column_names:
        raise SourceError(f"{source} has no column {column!r} (it has {dataset.column_names}); pass --image-column")
    if len(dataset) == 0:
        raise SourceError(f"{source} (split {split}) has no rows: there are no pages to encode")
    if id_column is not None and id_column not in dataset.column_names:
        raise SourceError(f"{source} has no column {id_column!r} (it has {dataset.column_names}); pass --id-column")
    ids = [str(value) for value in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
    if len(set(ids)) != len(ids):
        raise SourceError(f"{source}: column {id_column!r} repeats ids; pass an --id-column whose values are unique")
    description = {"kind": "dataset", "source": str(source), "split": split, "image_column": column,
                   "id_column": id_column}
    return PageSource(ids, description, lambda index: _dataset_image(dataset, column, index, ids[index]))


def _the_image_column(dataset: Any, source: str | Path) -> str:
    import datasets

    columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(columns) != 1:
        raise SourceError(f"{source} has {len(columns)} image columns {columns}: pass --image-column")
    return columns[0]


def _dataset_image(dataset: Any, column: str, index: int, page_id: str) -> Image.Image:
    value = dataset[index][column]
    try:
        return value if isinstance(value, Image.Image) else open_page(value["bytes"] or value["path"])
    except (ValueError, OSError, TypeError, KeyError) as error:
        raise SourceError(f"row {index} (page {page_id!r}) of column {column!r} is not a readable image ({error})") from error


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


def new_manifest(*, model: dict[str, Any], processor: dict[str, Any], dtype: str, source: PageSource,
                 shard_size: int) -> dict[str, Any]:
    """What the embeddings depend on (`key`) and the corpus layout they are stored in."""
    key = fingerprint(INDEX_FORMAT, model["fingerprint"], processor, dtype)
    return {"format": INDEX_FORMAT, "key": key, "model": model, "processor": processor, "dtype": dtype,
            "source": source.description, "pages": len(source), "page_ids_sha256": page_ids_digest(source.ids),
            "shard_size": shard_size, "shards": shard_count(len(source), shard_size), "complete": False}


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IncompleteIndexError(f"{path} is not valid JSON ({error}); delete it and rerun encode-corpus "
                                   "(finished shards are checked against their own headers)") from error


def check_manifest(out_dir: Path, wanted: dict[str, Any]) -> None:
    """Refuse a directory that indexes another model or settings, or another corpus layout."""
    existing = read_manifest(out_dir)
    if existing is None:
        return
    if existing.get("key") != wanted["key"]:
        raise IndexMismatchError(
            f"{out_dir} holds embeddings of {existing['model']['id']} (fingerprint {existing['model']['fingerprint']}, "
            f"dtype {existing['dtype']}, processor {existing['processor']}), not of {wanted['model']['id']} "
            f"(fingerprint {wanted['model']['fingerprint']}, dtype {wanted['dtype']}, processor {wanted['processor']}); "
            "write to another directory, or delete this one to re-encode")
    layout = ("pages", "page_ids_sha256", "shard_size")
    if any(existing.get(name) != wanted[name] for name in layout):
        raise IndexMismatchError(
            f"{out_dir} indexes another corpus or shard layout ({existing['pages']} pages from {existing['source']}, "
            f"shard size {existing['shard_size']}) than this run ({wanted['pages']} pages from {wanted['source']}, "
            f"shard size {wanted['shard_size']}); write to another directory, or rerun with the same source and "
            "--shard-size")


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    return write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def write_shard(out_dir: Path, shard: int, ids: Sequence[str], embeddings: Sequence[torch.Tensor],
                dtype: torch.dtype, key: str) -> int:
    """Write one shard atomically; returns its token count."""
    lengths = torch.tensor([0] + [item.shape[0] for item in embeddings], dtype=torch.int64)
    tensors = {"embeddings": torch.cat(list(embeddings)).to(dtype).contiguous(), "offsets": lengths.cumsum(0)}
    metadata = {"key": key, "shard": str(shard), "page_ids": json.dumps(list(ids))}
    atomic_write(shard_path(out_dir, shard), lambda staging: save_file(tensors, str(staging), metadata=metadata))
    return int(tensors["offsets"][-1])


def finished_shard(out_dir: Path, shard: int, ids: Sequence[str], key: str) -> bool:
    """True when the shard file is whole and holds exactly these pages under this key. A file that
    safetensors cannot open (cut short) is redone; one of another key or pages is refused."""
    path = shard_path(out_dir, shard)
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            offsets = reader.get_tensor("offsets")
            rows = reader.get_slice("embeddings").get_shape()[0]
        stored_ids = json.loads(metadata["page_ids"])
    except Exception as error:  # safetensors raises its own error type for a truncated file
        log.warning("%s is not a whole shard (%s): encoding it again", path, error)
        return False
    if metadata.get("key") != key or stored_ids != list(ids):
        raise IndexMismatchError(f"{path} holds other embeddings (key {metadata.get('key')}, {len(stored_ids)} pages) "
                                 f"than this run's (key {key}, {len(ids)} pages): delete it, or write to another directory")
    if len(offsets) != len(ids) + 1 or int(offsets[-1]) != rows:
        log.warning("%s has inconsistent offsets: encoding it again", path)
        return False
    return True


def shard_tokens(out_dir: Path, shard: int) -> int:
    """Token vectors in a written shard (read from its header)."""
    with safe_open(str(shard_path(out_dir, shard)), framework="pt") as reader:
        return reader.get_slice("embeddings").get_shape()[0]


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
    """The manifest of a finished index; an unfinished or foreign directory is refused."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise IncompleteIndexError(f"{out_dir} has no {MANIFEST}: it is not an index written by encode-corpus")
    if not manifest.get("complete"):
        raise IncompleteIndexError(f"{out_dir} is not finished ({manifest['shards']} shards planned): rerun "
                                   "encode-corpus with the same arguments to complete it")
    return manifest


def iter_shards(out_dir: str | Path) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """(page ids, embeddings) of one shard at a time, in source order: for corpora larger than
    memory (score each shard, keep the best pages)."""
    out_dir = Path(out_dir)
    for shard in range(complete_manifest(out_dir)["shards"]):
        path = shard_path(out_dir, shard)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as reader:
                ids = json.loads(reader.metadata()["page_ids"])
        except Exception as error:
            raise IncompleteIndexError(f"{path} is missing or corrupt ({error}); rerun encode-corpus into "
                                       f"{out_dir} to redo it") from error
        offsets = tensors["offsets"].tolist()
        yield ids, [tensors["embeddings"][start:end] for start, end in zip(offsets, offsets[1:])]


def load_index(out_dir: str | Path) -> CorpusIndex:
    """Read a complete index written by `encode_corpus` into memory; refuse one still being written."""
    manifest = complete_manifest(Path(out_dir))
    ids: list[str] = []
    embeddings: list[torch.Tensor] = []
    for shard_ids, shard_embeddings in iter_shards(out_dir):
        ids += shard_ids
        embeddings += shard_embeddings
    return CorpusIndex(ids, embeddings, manifest)
