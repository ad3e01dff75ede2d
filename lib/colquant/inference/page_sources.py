"""The pages `encode-corpus` reads: a folder of page images and PDFs, one such file, or a
`datasets` dataset.

A source is an ordered list of page ids, a way to decode page i, and the sha256 of the bytes page
i is read from (its file, or its dataset row's image), which a rerun compares to find pages whose
content changed under the same id. How a folder is read:

- every file under it, recursively, in path order; entries whose name starts with '.' are skipped;
- symbolic links are followed wherever they point, inside or outside the folder, to files and to
  folders alike: a linked page is read as if it were at the link's path, and a page reached by two
  paths is listed under both. A link that points to nothing, where a page file is expected (a page
  suffix), and a folder link back to a folder above it (a loop) are refused, naming the link;
- each page of a PDF is a page (`report.pdf#page=N`, 1-based), rendered at `dpi`; so is each frame
  of an image file that holds several (a multi-page TIFF, an animated GIF, WebP or PNG:
  `scan.tif#page=N`); a file holding one image is one page under its path;
- every page file's header is read while listing, so files that cannot be read as pages are all
  named before anything is encoded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from colquant.basics.files import file_sha256
from colquant.inference.index import CorpusIndexError
from colquant.retriever.processing import open_page

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
PDF_SUFFIX = ".pdf"
PAGE_SUFFIXES = IMAGE_SUFFIXES | {PDF_SUFFIX}
DEFAULT_DPI = 144  # PDF pages rendered at 2x PDF points: ~1190 x 1684 px for A4, above the 1280-token cap
PDF_EXTRA_HINT = "pip install 'colquant[pdf]' (it installs pypdfium2)"
LISTED_PROBLEMS = 10  # how many unreadable files an error names (then a count)


class SourceError(CorpusIndexError):
    """The page source is missing, empty, unreadable, or needs an extra that is not installed."""


@dataclass
class PageSource:
    """An ordered list of pages: `ids[i]` names page i, `open(i)` decodes it, `digest(i)` is the
    sha256 of the bytes it is read from. Every rank lists the same source the same way, so page i
    is the same page on every rank."""

    ids: list[str]
    description: dict[str, Any]
    opener: Callable[[int], Image.Image] = field(repr=False)
    digester: Callable[[int], str] = field(repr=False)

    def open(self, index: int) -> Image.Image:
        return self.opener(index)

    def digest(self, index: int) -> str:
        return self.digester(index)

    def __len__(self) -> int:
        return len(self.ids)


def open_source(source: str | Path, *, split: str | None = None, image_column: str | None = None,
                id_column: str | None = None, dpi: int = DEFAULT_DPI) -> PageSource:
    """The pages of `source`: a folder of page images and/or PDFs (see the module docstring), one PDF
    or image file (its pages, named as in a folder), a `datasets` dataset saved with `save_to_disk`, or, with `split`, anything `datasets.load_dataset`
    reads (a hub id or a local dataset repository)."""
    path = Path(source).expanduser()
    if split is None and path.is_dir() and not _is_saved_dataset(path):
        return folder_source(path, dpi=dpi)
    if split is None and path.is_file():
        return file_source(path, dpi=dpi)
    if split is None and not path.exists():
        raise SourceError(f"no page source at {path}: pass a folder of page images or PDFs, one such file, a "
                          "dataset saved with save_to_disk, or a datasets repository with --split")
    return dataset_source(source, split=split, image_column=image_column, id_column=id_column)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


# --------------------------------------------------------------------------------------------
# A folder


def folder_source(root: Path, *, dpi: int = DEFAULT_DPI) -> PageSource:
    """The pages under `root`; a page id is the path relative to `root`, with `#page=N` (1-based)
    for a page of a PDF or a frame of a multi-frame image."""
    _check_dpi(dpi)
    files = listed_files(root)
    pages = [p for p in files if p.suffix.lower() in PAGE_SUFFIXES]
    if not pages:
        raise SourceError(f"{root} holds no page images ({', '.join(sorted(IMAGE_SUFFIXES))}) or PDFs"
                          f"{f' (only {len(files)} other files)' if files else ''}: point SOURCE at the folder of pages")
    skipped = [path for path in files if path.suffix.lower() not in PAGE_SUFFIXES]
    if skipped:  # named, so a page in another format (.jp2, .heic) is seen missing, not just counted
        log.warning("%s: ignoring %d files that are neither images (%s) nor PDFs: %s%s", root, len(skipped),
                    ", ".join(sorted(IMAGE_SUFFIXES)), ", ".join(str(path.relative_to(root)) for path in skipped[:5]),
                    ", ..." if len(skipped) > 5 else "")
    return _pages_in_files(root, pages, dpi, {"kind": "folder", "path": str(root.resolve()), "dpi": dpi})


def file_source(file: Path, *, dpi: int = DEFAULT_DPI) -> PageSource:
    """The pages of one PDF or image file, under its file name (`#page=N` as in a folder)."""
    _check_dpi(dpi)
    if file.suffix.lower() not in PAGE_SUFFIXES:
        raise SourceError(f"{file} is neither a page image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a PDF: pass "
                          "a folder of pages, one PDF or image, or a dataset")
    return _pages_in_files(file.parent, [file], dpi, {"kind": "file", "path": str(file.resolve()), "dpi": dpi})


def _check_dpi(dpi: int) -> None:
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise SourceError(f"dpi must be a whole number >= 1 (the resolution PDF pages are rendered at), got {dpi!r}")


def _pages_in_files(root: Path, files: list[Path], dpi: int, description: dict[str, Any]) -> PageSource:
    """The pages of page files under `root`, every file's header read first: unreadable files are
    all named in one error."""
    if any(p.suffix.lower() == PDF_SUFFIX for p in files):
        _pdfium()  # a missing extra is one error, not one per PDF
    ids: list[str] = []
    locations: list[tuple[Path, int | None]] = []
    problems: list[str] = []
    for file in files:
        relative = file.relative_to(root).as_posix()
        try:
            count = pdf_page_count(file) if file.suffix.lower() == PDF_SUFFIX else image_frame_count(file)
        except SourceError as error:
            problems.append(str(error))
            continue
        if count == 1 and file.suffix.lower() != PDF_SUFFIX:
            ids.append(relative)
            locations.append((file, None))
        else:
            ids += [f"{relative}#page={n + 1}" for n in range(count)]
            locations += [(file, n) for n in range(count)]
    if problems:
        more = f"; and {len(problems) - LISTED_PROBLEMS} more" if len(problems) > LISTED_PROBLEMS else ""
        raise SourceError(f"{len(problems)} files under {root} cannot be read as pages: "
                          + "; ".join(problems[:LISTED_PROBLEMS]) + more)

    def opener(index: int) -> Image.Image:
        file, page = locations[index]
        if file.suffix.lower() == PDF_SUFFIX:
            return render_pdf_page(file, page, dpi)
        return read_image(file, ids[index]) if page is None else read_frame(file, page, ids[index])

    def digester(index: int) -> str:
        return file_sha256(locations[index][0])

    return PageSource(ids, description, opener, digester)


def listed_files(root: Path) -> list[Path]:
    """Every file under `root` in path order, hidden entries skipped, symbolic links followed
    (the module docstring says how)."""
    found: list[Path] = []

    def visit(folder: Path, ancestors: frozenset[Path]) -> None:
        try:
            entries = list(folder.iterdir())
        except OSError as error:
            raise SourceError(f"cannot list {folder} ({error.strerror or error}): fix its permissions, or move it "
                              "out of SOURCE") from error
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                target = entry.resolve()
                if target in ancestors:
                    raise SourceError(f"{entry} links to {target}, a folder above it, so the source would never end; "
                                      "remove the link or point it elsewhere")
                visit(entry, ancestors | {target})
            elif entry.is_file():
                found.append(entry)
            elif entry.is_symlink() and entry.suffix.lower() in PAGE_SUFFIXES:
                raise SourceError(f"{entry} is a link to {os.readlink(entry)}, which does not exist; point the link at "
                                  "the page or remove it, and rerun")

    visit(root, frozenset({root.resolve()}))
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def image_frame_count(file: Path) -> int:
    """How many images a file holds (read from its header); one that is not an image is refused."""
    try:
        with Image.open(file) as image:
            return getattr(image, "n_frames", 1)
    except (ValueError, OSError) as error:
        raise SourceError(f"{file} cannot be read as an image ({error})") from error


def read_image(file: Path, page_id: str) -> Image.Image:
    """A decoded image file; an unreadable one stops the run naming the file and the fix."""
    try:
        return open_page(file)
    except (ValueError, OSError) as error:
        raise SourceError(f"page {page_id!r} ({file}) cannot be read as an image ({error}); replace or remove "
                          "the file and rerun: shards whose pages are unchanged are kept") from error


def read_frame(file: Path, frame: int, page_id: str) -> Image.Image:
    """Frame `frame` (0-based) of a multi-frame image file."""
    try:
        with Image.open(file) as image:
            image.seek(frame)
            return image.copy()
    except (ValueError, OSError, EOFError) as error:
        raise SourceError(f"page {page_id!r} ({file}) cannot be read as an image ({error}); replace or remove "
                          "the file and rerun: shards whose pages are unchanged are kept") from error


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


# --------------------------------------------------------------------------------------------
# A dataset


def _dataset_page_ids(dataset: Any, id_column: str | None, source: str | Path) -> list[str]:
    """One id per row: `id_column`'s values as strings, else the row numbers. A missing or empty
    value is refused by its row (str(None) would file the page as 'None'), and so are repeats."""
    if id_column is None:
        return [str(row) for row in range(len(dataset))]
    values = dataset[id_column]
    missing = [row for row, value in enumerate(values) if value is None or str(value) == ""]
    if missing:
        raise SourceError(f"{source}: column {id_column!r} has no id in row {missing[0]} ({len(missing)} rows "
                          f"without one: {missing[:10]}); fill them in or pass an --id-column whose values are set")
    ids = [str(value) for value in values]
    if len(set(ids)) != len(ids):
        raise SourceError(f"{source}: column {id_column!r} repeats ids; pass an --id-column whose values are unique")
    return ids


def dataset_source(source: str | Path, *, split: str | None, image_column: str | None,
                   id_column: str | None) -> PageSource:
    """Rows of a `datasets` split; ids from `id_column`, else the row number. A row's page is read
    from its image's encoded bytes (or the file they name), which are also what its digest hashes."""
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
    ids = _dataset_page_ids(dataset, id_column, source)
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    where = str(path.resolve()) if path.exists() else str(source)
    description = {"kind": "dataset", "source": where, "split": split, "image_column": column, "id_column": id_column}

    def encoded(index: int) -> bytes:
        return _row_image_bytes(dataset[index][column], column, index, ids[index])

    def opener(index: int) -> Image.Image:
        try:
            return open_page(encoded(index))
        except (ValueError, OSError) as error:
            raise SourceError(f"row {index} (page {ids[index]!r}) of column {column!r} is not a readable image "
                              f"({error})") from error

    return PageSource(ids, description, opener, lambda index: hashlib.sha256(encoded(index)).hexdigest())


def _the_image_column(dataset: Any, source: str | Path) -> str:
    import datasets

    columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(columns) != 1:
        raise SourceError(f"{source} has {len(columns)} image columns {columns}: pass --image-column")
    return columns[0]


def _row_image_bytes(value: Any, column: str, index: int, page_id: str) -> bytes:
    """A row's encoded image: `{"bytes": ..., "path": ...}` (an undecoded image column), raw bytes,
    or a path to an image file."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        value = value.get("bytes") or value["path"]
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and Path(value).is_file():
        return Path(value).read_bytes()
    raise SourceError(f"row {index} (page {page_id!r}) of column {column!r} holds {type(value).__name__} "
                      f"{str(value)[:80]!r}, not an image, its bytes or a path to one; pass the --image-column of pages")
