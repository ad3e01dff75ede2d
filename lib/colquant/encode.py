"""Batched encoding of queries and pages: what a library user calls instead of writing the loop.

`encode_queries(model, texts)` and `encode_pages(model, images)` (also `model.encode_queries` /
`model.encode_pages` on a model from `colquant.load`, which attaches its processor) follow
sentence-transformers' conventions: batches under `torch.inference_mode`, an optional progress bar,
and per-item results in input order. Items are sorted by length before batching, so a batch pads
to similar lengths instead of to the longest item of the whole input, then restored to input order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

PageInput = Image.Image | str | Path | dict[str, Any]
QUERY_BATCH_SIZE = 32
PAGE_BATCH_SIZE = 8


def model_device(model: torch.nn.Module) -> torch.device:
    """The device inputs must go to (models here live on one device)."""
    return next(model.parameters()).device


def attached_processor(model: torch.nn.Module, processor: Any | None) -> Any:
    """The processor passed in, else the one `colquant.load` attached to the model."""
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError(
            "this model has no processor attached: load it with `colquant.load(...)`, or pass "
            "processor=ColQwen3Processor.from_pretrained(checkpoint_dir)"
        )
    return processor


def encode_queries(
    model: torch.nn.Module,
    texts: Sequence[str],
    *,
    processor: Any | None = None,
    batch_size: int = QUERY_BATCH_SIZE,
    show_progress_bar: bool = False,
    padded: bool = False,
) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
    """Multi-vector embeddings of query texts: per query a (tokens, dim) float32 CPU tensor.

    `padded=True` returns (embeddings (queries, max_tokens, dim), mask (queries, max_tokens)) instead.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got one string: wrap it as [text]")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is a {type(text).__name__}, expected str")
    processor = attached_processor(model, processor)
    lengths = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]] if texts else []
    embeddings = _encode_sorted(
        model, processor.process_queries, texts, lengths, batch_size, show_progress_bar, "queries"
    )
    return _as_padded(embeddings) if padded else embeddings


def encode_pages(
    model: torch.nn.Module,
    images: Iterable[PageInput],
    *,
    processor: Any | None = None,
    batch_size: int = PAGE_BATCH_SIZE,
    show_progress_bar: bool = False,
    padded: bool = False,
) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
    """Multi-vector embeddings of page images: per page a (tokens, dim) float32 CPU tensor.

    `images` holds PIL images, image file paths, or a `datasets` image column (decoded images, or
    `{"bytes": ..., "path": ...}` dicts when the column is not decoded). Pages are batched by
    pixel area, which orders them by visual-token count without running the image processor twice.
    """
    pages = [open_page(item, index) for index, item in enumerate(images)]
    processor = attached_processor(model, processor)
    areas = [page.width * page.height for page in pages]
    embeddings = _encode_sorted(model, processor.process_images, pages, areas, batch_size, show_progress_bar, "pages")
    return _as_padded(embeddings) if padded else embeddings


def open_page(item: PageInput, index: int) -> Image.Image:
    """A PIL image from a PIL image, a path, or a `datasets` image dict (bytes or path)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"page {index}: no image file at {path}")
        return Image.open(path)
    if isinstance(item, dict) and (item.get("bytes") or item.get("path")):
        if item.get("bytes"):
            from io import BytesIO

            return Image.open(BytesIO(item["bytes"]))
        return open_page(item["path"], index)
    raise TypeError(
        f"page {index} is a {type(item).__name__}; pass PIL images, image file paths, or a datasets image column"
    )


def _encode_sorted(
    model: torch.nn.Module,
    process: Callable[[list[Any]], Any],
    items: list[Any],
    lengths: list[int],
    batch_size: int,
    show_progress_bar: bool,
    label: str,
) -> list[torch.Tensor]:
    """Encode items in batches of similar length; results come back in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(items)), key=lambda i: lengths[i], reverse=True)
    device = model_device(model)
    results: list[torch.Tensor | None] = [None] * len(items)
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=f"encoding {label}", disable=not show_progress_bar, leave=False):
        indices = order[start : start + batch_size]
        with torch.inference_mode():
            batch = process([items[i] for i in indices]).to(device)
            embeddings = model(**batch).embeddings
        keep = batch["attention_mask"].bool()
        for i, row, mask in zip(indices, embeddings, keep):
            # Indexed outside inference mode: a copy that is an ordinary tensor, usable in place.
            results[i] = row[mask].float().cpu()
    return results  # type: ignore[return-value]  # every slot is filled: order is a permutation


def _as_padded(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, max_tokens, dim) right-padded with zeros, and the (items, max_tokens) token mask."""
    if not embeddings:
        raise ValueError("nothing to pad: no items were encoded")
    padded = torch.nn.utils.rnn.pad_sequence(embeddings, batch_first=True)
    lengths = torch.tensor([e.shape[0] for e in embeddings])
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask
