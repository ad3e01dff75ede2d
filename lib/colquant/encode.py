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
MAX_DEFAULT_WORKERS = 16


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
        model, lambda batches: (dict(processor.process_queries([texts[i] for i in b])) for b in batches),
        lengths, batch_size, show_progress_bar, "queries",
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
    (default: a core's worth each, up to 16, on a GPU; none on a CPU, where they would compete with
    the model for cores). Each page is prepared on its own, so workers share a batch's pages.
    """
    described = [page_source(item, index) for index, item in enumerate(images)]
    processor = attached_processor(model, processor)
    workers = default_workers(model_device(model)) if num_workers is None else num_workers
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {workers}")
    pin = model_device(model).type == "cuda"
    sources = [source for source, _ in described]
    embeddings = _encode_sorted(
        model, lambda batches: prepared_pages(processor, sources, batches, workers, pin=pin),
        [area for _, area in described], batch_size, show_progress_bar, "pages",
    )
    return _as_padded(embeddings) if padded else embeddings


def default_workers(device: torch.device) -> int:
    """Page-preparing worker processes: on a GPU one per core but one (the main process drives the
    GPU), at most 16; on a CPU none."""
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
    prepare: Callable[[list[list[int]]], Iterable[dict[str, torch.Tensor]]],
    lengths: list[int],
    batch_size: int,
    show_progress_bar: bool,
    label: str,
) -> list[torch.Tensor]:
    """Encode items in batches of similar length (`prepare` turns batches of item indices into model
    inputs, in order); results come back in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches = [order[start : start + batch_size] for start in range(0, len(lengths), batch_size)]
    device = model_device(model)
    results: list[torch.Tensor | None] = [None] * len(lengths)
    for indices, batch in tqdm(zip(batches, prepare(batches)), total=len(batches), desc=f"encoding {label}",
                               disable=not show_progress_bar, leave=False):
        with torch.inference_mode():
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            embeddings = model(**batch).embeddings
        keep = batch["attention_mask"].bool()
        for i, row, mask in zip(indices, embeddings, keep):
            # Indexed outside inference mode: a copy that is an ordinary tensor, usable in place.
            results[i] = row[mask].float().cpu()
    return results  # type: ignore[return-value]  # every slot is filled: order is a permutation


class PreparedPages(torch.utils.data.Dataset):
    """Page `i` as the processor's tensors for a batch of one (decoded, resized, patchified on
    access: in a worker process when there are workers)."""

    def __init__(self, processor: Any, sources: list[Any]) -> None:
        self.processor, self.sources = processor, sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self.processor.process_images([self.sources[index]]))


class JoinPages:
    """Pages prepared one by one -> the batch the processor would have made of them: prompts
    left-padded to the longest (pad token, mask 0), pixel patches and grids concatenated; into
    pinned memory when `pin`, so the copy to the GPU does not block."""

    def __init__(self, pad_token_id: int, pin: bool) -> None:
        self.pad = {"input_ids": pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
        self.pin = pin

    def __call__(self, pages: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(page["input_ids"].shape[1] for page in pages)
        return {key: self._joined([self._padded(key, page[key], longest) for page in pages]) for key in pages[0]}

    def _padded(self, key: str, value: torch.Tensor, longest: int) -> torch.Tensor:
        if key not in self.pad:
            return value
        return torch.nn.functional.pad(value, (longest - value.shape[1], 0), value=self.pad[key])

    def _joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=self.pin))


def prepared_pages(processor: Any, sources: list[Any], batches: list[list[int]], num_workers: int, *,
                   pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The page batches in order. With workers, pages are prepared ahead of the model one by one
    across `num_workers` processes (so a batch's pages are prepared in parallel), in batch order."""
    dataset, join = PreparedPages(processor, sources), JoinPages(processor.tokenizer.pad_token_id, pin)
    workers = min(num_workers, len(sources))
    if workers == 0:
        pages: Iterator[dict[str, torch.Tensor]] = (dataset[i] for batch in batches for i in batch)
    else:
        pages = iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[i for b in batches for i in b],
                                                 num_workers=workers))
    for batch in batches:
        yield join([next(pages) for _ in batch])


def _as_padded(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, max_tokens, dim) right-padded with zeros, and the (items, max_tokens) token mask."""
    if not embeddings:
        raise ValueError("nothing to pad: no items were encoded")
    padded = torch.nn.utils.rnn.pad_sequence(embeddings, batch_first=True)
    lengths = torch.tensor([e.shape[0] for e in embeddings])
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask
