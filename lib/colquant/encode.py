"""Batched encoding of queries and pages: what a library user calls instead of writing the loop.

`encode_queries(model, texts)` and `encode_pages(model, images)` (also `model.encode_queries` /
`model.encode_pages` on a model from `colquant.load`, which attaches its processor) follow
sentence-transformers' conventions: batches under `torch.inference_mode`, an optional progress bar,
and per-item results in input order. Items are sorted by length before batching, so a batch pads
to similar lengths instead of to the longest item of the whole input, then restored to input order.

Pages run as a pipeline: a `DataLoader` prepares batches (decoding, resizing, patchifying: the
processor's work, tens of milliseconds a page on one core) in worker processes, in pinned memory,
while the GPU encodes the batch before; inputs are copied to the GPU without blocking. The order of
batches, and so every result, is the same whatever the number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

PageInput = Image.Image | str | Path | dict[str, Any]
QUERY_BATCH_SIZE = 32
PAGE_BATCH_SIZE = 8
MAX_DEFAULT_WORKERS = 8


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
        model, processor.process_queries, texts, lengths, batch_size, show_progress_bar, "queries", num_workers=0
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
    num_workers: int | None = None,
) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
    """Multi-vector embeddings of page images: per page a (tokens, dim) float32 CPU tensor.

    `images` holds PIL images, image file paths, or a `datasets` image column (decoded images, or
    `{"bytes": ..., "path": ...}` dicts when the column is not decoded). Pages are batched by
    pixel area (read from the image headers), which orders them by visual-token count without
    running the image processor twice. `num_workers` processes prepare batches ahead of the model
    (default: up to 8 on a GPU, none on a CPU, where they would compete with the model for cores).
    """
    described = [page_source(item, index) for index, item in enumerate(images)]
    processor = attached_processor(model, processor)
    embeddings = _encode_sorted(
        model, processor.process_images, [source for source, _ in described], [area for _, area in described],
        batch_size, show_progress_bar, "pages",
        num_workers=default_workers(model_device(model)) if num_workers is None else num_workers,
    )
    return _as_padded(embeddings) if padded else embeddings


def default_workers(device: torch.device) -> int:
    """Page-preparing worker processes: on a GPU up to 8 (one core stays with the main process); on a
    CPU none."""
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, (os.cpu_count() or 1) - 1))


def page_source(item: PageInput, index: int) -> tuple[Image.Image | str | bytes, int]:
    """What a worker decodes for a page (the PIL image, a file path or encoded bytes: all cheap to
    hand over) and the page's pixel area, read from the image header without decoding it."""
    if isinstance(item, Image.Image):
        return item, item.width * item.height
    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"page {index}: no image file at {path}")
        with Image.open(path) as image:
            return str(path), image.width * image.height
    if isinstance(item, dict) and (item.get("bytes") or item.get("path")):
        if item.get("bytes"):
            with Image.open(BytesIO(item["bytes"])) as image:
                return item["bytes"], image.width * image.height
        return page_source(item["path"], index)
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
    *,
    num_workers: int,
) -> list[torch.Tensor]:
    """Encode items in batches of similar length; results come back in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    order = sorted(range(len(items)), key=lambda i: lengths[i], reverse=True)
    batches = [order[start : start + batch_size] for start in range(0, len(items), batch_size)]
    device = model_device(model)
    results: list[torch.Tensor | None] = [None] * len(items)
    prepared = prepared_batches(process, items, batches, num_workers, pin=device.type == "cuda")
    for indices, batch in tqdm(zip(batches, prepared), total=len(batches), desc=f"encoding {label}",
                               disable=not show_progress_bar, leave=False):
        with torch.inference_mode():
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            embeddings = model(**batch).embeddings
        keep = batch["attention_mask"].bool()
        for i, row, mask in zip(indices, embeddings, keep):
            # Indexed outside inference mode: a copy that is an ordinary tensor, usable in place.
            results[i] = row[mask].float().cpu()
    return results  # type: ignore[return-value]  # every slot is filled: order is a permutation


class PreparedBatches(torch.utils.data.Dataset):
    """Batch `i` of the length-sorted items as the model's input tensors (a plain dict, so the
    DataLoader can pin it), prepared on access: in a worker process when there are workers."""

    def __init__(self, process: Callable[[list[Any]], Any], items: list[Any], batches: list[list[int]]) -> None:
        self.process, self.items, self.batches = process, items, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self.process([self.items[i] for i in self.batches[index]]))


def prepared_batches(process: Callable[[list[Any]], Any], items: list[Any], batches: list[list[int]],
                     num_workers: int, *, pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The batches in order, prepared `num_workers` processes ahead (0: in this process, on demand)."""
    dataset = PreparedBatches(process, items, batches)
    workers = min(num_workers, len(batches))
    if workers == 0 and not pin:
        return (dataset[index] for index in range(len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
        prefetch_factor=2 if workers else None,
    )
    return iter(loader)


def _as_padded(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, max_tokens, dim) right-padded with zeros, and the (items, max_tokens) token mask."""
    if not embeddings:
        raise ValueError("nothing to pad: no items were encoded")
    padded = torch.nn.utils.rnn.pad_sequence(embeddings, batch_first=True)
    lengths = torch.tensor([e.shape[0] for e in embeddings])
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask
