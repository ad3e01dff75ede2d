"""Offline, deterministic ViDoRe-style retrieval corpus: rendered report pages, questions, qrels.

Why this exists: the quantization experiments need a document-retrieval benchmark that runs with
no network and no hub (CI, air-gapped GPU boxes) and that is byte-for-byte reproducible, so a
score change can only come from the model. Pages look like excerpts of company reports (prose,
tables, bar charts). Every page carries numeric facts that occur on no other page and every query
asks for one of them, so each query has exactly one relevant page.

How uniqueness is guaranteed by construction:
- each page is about its own (company, metric) topic, so a question such as "What was the revenue
  of Norbright Labs in 2019?" can only be answered by that page;
- every number on every page is drawn without replacement from one pool of ``ddd.d`` values
  (three integer digits, one decimal). No other string on a page has a digit-dot-digit pattern,
  so an answer string occurs in exactly one page's text.

This module is the corpus's data model, files and build/load; what the pages say and ask is
`colquant.evaluate.corpus_content`, how they are drawn `colquant.evaluate.page_render`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from colquant.evaluate.corpus_content import (
    LAYOUTS,
    MAX_PAGES,
    MAX_QUERIES_PER_PAGE,
    PageContent,
    Query,
    generate_contents,
    make_queries,
    page_id_of,
    page_text,
)
from colquant.basics.files import atomic_directory, refuse_unrelated
from colquant.evaluate.page_render import DEFAULT_PAGE_SIZE, render_page

FORMAT_VERSION = 1
MIN_PAGE_WIDTH = 224


# --------------------------------------------------------------------------------------------
# Public data model


@dataclass(frozen=True)
class Page:
    """One rendered document page; ``text`` holds the strings drawn on it (for calibration)."""

    page_id: str
    image_path: Path
    text: str
    layout: str


@dataclass(repr=False)
class Corpus:
    """Pages, queries and their relevance judgements, as read from ``root``."""

    root: Path
    pages: list[Page]
    queries: list[Query]

    def __post_init__(self) -> None:
        self._pages_by_id = {page.page_id: page for page in self.pages}

    def __len__(self) -> int:
        return len(self.pages)

    def __repr__(self) -> str:
        return f"Corpus(root={str(self.root)!r}, pages={len(self.pages)}, queries={len(self.queries)})"

    @property
    def qrels(self) -> dict[str, dict[str, int]]:
        """``{query_id: {page_id: 1}}``, the format retrieval metrics (e.g. MTEB/BEIR) expect."""
        return {query.query_id: {query.page_id: 1} for query in self.queries}

    def image(self, page_id: str) -> Image.Image:
        """The page image, fully loaded and RGB, so callers never hold an open file."""
        if page_id not in self._pages_by_id:
            raise KeyError(f"no page {page_id!r} in {self!r}")
        with Image.open(self._pages_by_id[page_id].image_path) as image:
            return image.convert("RGB")


# --------------------------------------------------------------------------------------------
# Files


def _png_bytes(image: Image.Image) -> bytes:
    """PNG with no metadata chunks (no time, no text), so equal pixels give equal bytes."""
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _files_digest(files: dict[str, str]) -> str:
    """One sha256 over every file's path and sha256, so two corpora compare with one string."""
    listing = "".join(f"{name}\t{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _write_corpus(directory: Path, contents: list[PageContent], queries: list[Query],
                  params: dict[str, Any], progress: bool) -> None:
    (directory / "pages").mkdir()
    files: dict[str, str] = {}
    page_records = []
    for index, content in enumerate(tqdm(contents, desc="Rendering corpus pages", disable=not progress)):
        page_id = page_id_of(index)
        image_file = f"pages/{page_id}.png"
        files[image_file] = _write(directory / image_file, _png_bytes(render_page(content, params["page_size"])))
        page_records.append({"page_id": page_id, "image": image_file, "text": page_text(content),
                             "layout": content.layout})
    query_records = [{"query_id": q.query_id, "text": q.text, "page_id": q.page_id, "answer": q.answer}
                     for q in queries]
    qrel_records = [{"query_id": q.query_id, "page_id": q.page_id, "relevance": 1} for q in queries]
    for name, records in (("pages.jsonl", page_records), ("queries.jsonl", query_records),
                          ("qrels.jsonl", qrel_records)):
        files[name] = _write(directory / name, _jsonl(records))
    manifest = {**params, "files": files, "sha256": _files_digest(files)}
    # Written last: a directory with a manifest is a finished one.
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Public functions


def _check_int(name: str, value: Any, low: int, high: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}; {fix}")


def _params(n_pages: int, n_queries: int, seed: int, page_size: tuple[int, int]) -> dict[str, Any]:
    """Validate the build arguments and return them as stored in the manifest."""
    _check_int("n_pages", n_pages, 1, MAX_PAGES, f"pass between 1 and {MAX_PAGES} pages")
    _check_int("n_queries", n_queries, 1, MAX_QUERIES_PER_PAGE * n_pages,
               f"at most {MAX_QUERIES_PER_PAGE} queries per page exist; lower n_queries or raise n_pages")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}; pass e.g. seed=0")
    if (not isinstance(page_size, (tuple, list)) or len(page_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in page_size)):
        raise ValueError(f"page_size must be a (width, height) pair of integers, got {page_size!r}; "
                         f"pass e.g. page_size={DEFAULT_PAGE_SIZE}")
    width, height = page_size
    if width < MIN_PAGE_WIDTH or height < width:
        raise ValueError(f"page_size must be portrait with width >= {MIN_PAGE_WIDTH} and height >= width, "
                         f"got {tuple(page_size)}; pass e.g. page_size={DEFAULT_PAGE_SIZE}")
    return {"format_version": FORMAT_VERSION, "seed": seed, "n_pages": n_pages, "n_queries": n_queries,
            "page_size": [width, height]}


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete {root} and run "
                         "colquant.evaluate.corpus.build_corpus again") from error


def build_corpus(root: str | Path, *, n_pages: int = 60, n_queries: int = 120, seed: int = 0,
                 page_size: tuple[int, int] = DEFAULT_PAGE_SIZE, progress: bool = True) -> Corpus:
    """Generate the corpus into ``root`` (or load it if ``root`` already holds this exact build).

    The build renders into a hidden sibling directory and renames it onto ``root`` only when
    complete, so an interrupted build never leaves a half corpus that looks finished. An existing
    corpus built with other parameters is replaced; a directory holding anything else is refused.
    """
    params = _params(n_pages, n_queries, seed, page_size)
    root = Path(root)
    if (root / "manifest.json").is_file():
        manifest = _read_manifest(root)
        if all(manifest.get(key) == value for key, value in params.items()):
            return load_corpus(root)
    refuse_unrelated(root, "manifest.json", "colquant corpus", "build_corpus")
    rng = random.Random(seed)
    contents = generate_contents(rng, n_pages)
    queries = make_queries(rng, contents, n_queries)
    with atomic_directory(root) as building:
        _write_corpus(building, contents, queries, params, progress)
    return load_corpus(root)


def _verify_files(root: Path, manifest: dict[str, Any]) -> None:
    rebuild = f"delete {root} and run colquant.evaluate.corpus.build_corpus again"
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root / 'manifest.json'} has format_version {manifest.get('format_version')!r}, "
                         f"this code reads {FORMAT_VERSION}; {rebuild}")
    files = manifest.get("files", {})
    for required in ("pages.jsonl", "queries.jsonl", "qrels.jsonl"):
        if required not in files:
            raise ValueError(f"{root / 'manifest.json'} does not list {required}; {rebuild}")
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            raise ValueError(f"{path} is listed in manifest.json but missing; {rebuild}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path} does not match its sha256 in manifest.json; {rebuild}")


def _verify_references(root: Path, manifest: dict[str, Any], pages: list[Page], queries: list[Query],
                       qrels: list[dict[str, Any]]) -> None:
    rebuild = f"delete {root} and run colquant.evaluate.corpus.build_corpus again"
    if len(pages) != manifest["n_pages"] or len(queries) != manifest["n_queries"]:
        raise ValueError(f"{root / 'pages.jsonl'} or queries.jsonl disagree with the counts in "
                         f"manifest.json; {rebuild}")
    page_ids = {page.page_id for page in pages}
    for page in pages:
        if page.image_path.relative_to(root).as_posix() not in manifest["files"]:
            raise ValueError(f"{root / 'pages.jsonl'} names image {page.image_path} that manifest.json "
                             f"does not list; {rebuild}")
    for query in queries:
        if query.page_id not in page_ids:
            raise ValueError(f"{root / 'queries.jsonl'} refers to unknown page {query.page_id!r}; {rebuild}")
    expected = [{"query_id": q.query_id, "page_id": q.page_id, "relevance": 1} for q in queries]
    if qrels != expected:
        raise ValueError(f"{root / 'qrels.jsonl'} disagrees with queries.jsonl; {rebuild}")


def load_corpus(root: str | Path) -> Corpus:
    """Read a corpus written by :func:`build_corpus`, checking every file against the manifest."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"no corpus at {root} (no manifest.json); build it with "
            f"colquant.evaluate.corpus.build_corpus({str(root)!r}) first")
    manifest = _read_manifest(root)
    _verify_files(root, manifest)
    pages = [Page(r["page_id"], root / r["image"], r["text"], r["layout"])
             for r in _read_jsonl(root / "pages.jsonl")]
    queries = [Query(r["query_id"], r["text"], r["page_id"], r["answer"])
               for r in _read_jsonl(root / "queries.jsonl")]
    _verify_references(root, manifest, pages, queries, _read_jsonl(root / "qrels.jsonl"))
    return Corpus(root, pages, queries)


def corpus_statistics(corpus: Corpus) -> pd.DataFrame:
    """Per-layout page counts, mean text length and queries per page, plus an "all" row."""
    queries_per_page = Counter(query.page_id for query in corpus.queries)
    per_page = pd.DataFrame({
        "layout": [page.layout for page in corpus.pages],
        "text_chars": [len(page.text) for page in corpus.pages],
        "queries": [queries_per_page[page.page_id] for page in corpus.pages],
    })
    everything = per_page.assign(layout="all")
    stats = (pd.concat([per_page, everything])
             .groupby("layout", sort=False)
             .agg(pages=("text_chars", "size"), mean_text_chars=("text_chars", "mean"),
                  queries=("queries", "sum")))
    stats["queries_per_page"] = stats["queries"] / stats["pages"]
    order = [layout for layout in LAYOUTS if layout in stats.index] + ["all"]
    return stats.loc[order]
