"""Batched encoding of queries and pages: what a library user calls instead of writing the loop.

`encode_queries(model, texts)` and `encode_pages(model, images)` (also `model.encode_queries` /
`model.encode_pages` on a model from `colquant.load`, which attaches its processor) follow
sentence-transformers' conventions: batches under `torch.inference_mode`, an optional progress bar,
and per-item results in input order. Items are sorted by length before batching, so a batch pads
to similar lengths instead of to the longest item of the whole input, then restored to input order.

Pages run as a pipeline (`PagePipeline`): worker processes prepare pages (decoding, resizing,
patchifying: the processor's work, ~0.1 s for a 2560x2048 page on one core) ahead of the model and
cast the pixels to the vision tower's dtype; a thread of the main process joins each batch in
pinned memory ahead of the model (`BatchJoiner`); the main thread copies it to the GPU without
blocking, and launches batch i+1 before it reads batch i's embeddings back, so neither side waits
for the other. A pipeline can be kept across calls so its workers start once per index, not once
per call. The order of batches, and so every result, is the same whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from colquant.basics.arguments import require_count, require_flag

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
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts must be a list of strings, got one {type(texts).__name__}: wrap it as [text]")
    _check_options(batch_size=batch_size, show_progress_bar=show_progress_bar, padded=padded)
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
    pipeline: PagePipeline | None = None,
) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
    """Multi-vector embeddings of page images: per page a (tokens, dim) float32 CPU tensor.

    `images` holds PIL images, image file paths, or a `datasets` image column (decoded images, or
    `{"bytes": ..., "path": ...}` dicts when the column is not decoded). Pages are batched by
    pixel area (read from the image headers), which orders them by visual-token count without
    running the image processor twice. `num_workers` processes prepare pages ahead of the model
    (default: a core's worth each, up to 16, on a GPU; none on a CPU, where they would compete with
    the model for cores); they start for this call and stop after it. To index in many calls, make
    `pipeline=PagePipeline.for_model(model)` once and pass it to each: its workers stay up.
    """
    if isinstance(images, (str, Path, bytes, dict, Image.Image)):
        raise TypeError(f"images must be a list of pages, got one page ({type(images).__name__}): wrap it as [page]")
    _check_options(batch_size=batch_size, show_progress_bar=show_progress_bar, padded=padded)
    if num_workers is not None:
        require_count("num_workers", num_workers, 0)
    described = [page_source(item, index) for index, item in enumerate(images)]
    if pipeline is not None:
        if num_workers is not None or processor is not None:
            raise ValueError("encode_pages: with pipeline=..., give num_workers and processor to "
                             "PagePipeline.for_model(...) instead of to this call")
        _check_pipeline_fits(pipeline, model)
        return _encode_page_sources(model, pipeline, described, batch_size, show_progress_bar, padded)
    workers = default_workers(model_device(model)) if num_workers is None else num_workers
    with PagePipeline.for_model(model, processor=processor, num_workers=min(workers, len(described))) as own:
        return _encode_page_sources(model, own, described, batch_size, show_progress_bar, padded)


def _check_options(*, batch_size: Any, show_progress_bar: Any, padded: Any) -> None:
    """Before any work: `padded="no"` would return the padded tuple, a float batch size fail mid-way."""
    require_count("batch_size", batch_size, 1)
    require_flag("show_progress_bar", show_progress_bar)
    require_flag("padded", padded)


def _encode_page_sources(model: torch.nn.Module, pipeline: PagePipeline, described: list[tuple[Any, int]],
                         batch_size: int, show_progress_bar: bool,
                         padded: bool) -> list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
    """`encode_pages` once its inputs are read: (source, pixel area) pairs through `pipeline`."""
    sources = [source for source, _ in described]
    embeddings = _encode_sorted(
        model, lambda batches: pipeline.prepared(sources, batches),
        [area for _, area in described], batch_size, show_progress_bar, "pages",
    )
    return _as_padded(embeddings) if padded else embeddings


def _check_pipeline_fits(pipeline: PagePipeline, model: torch.nn.Module) -> None:
    """A pipeline made for another model could cast pixels to a dtype this one does not use, which
    would change its embeddings: refuse it."""
    if pipeline.pixel_dtype != pixel_dtype(model):
        raise ValueError(
            f"this PagePipeline casts pixels to {pipeline.pixel_dtype}, but the model's vision tower takes "
            f"{pixel_dtype(model)}: make the pipeline with PagePipeline.for_model(model)"
        )


def pixel_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The 16-bit dtype the model's vision tower casts pixels to before anything else, or None (keep
    float32) when it has none or the two towers' first casts would differ.

    transformers' tower starts with `pixel_values.type(visual.dtype)`, the fast tower with a cast to
    the patch embedding's weight dtype. Casting in the worker instead is the same rounding, done
    earlier, where it halves the bytes through shared memory, pinned memory and PCIe.
    """
    visual = getattr(model, "visual", None)
    weight = getattr(getattr(getattr(visual, "patch_embed", None), "proj", None), "weight", None)
    if weight is None or weight.dtype != getattr(visual, "dtype", None):
        return None
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else None


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
    prepare: Callable[[list[list[int]]], Generator[dict[str, torch.Tensor], None, None]],
    lengths: list[int],
    batch_size: int,
    show_progress_bar: bool,
    label: str,
) -> list[torch.Tensor]:
    """Encode items in batches of similar length (`prepare` turns batches of item indices into model
    inputs, in order); results come back in input order.

    One batch stays in flight: batch i+1 is prepared and launched before batch i's embeddings are
    read back, so the host's share of a batch (joining it, launching its kernels) overlaps the
    device's work on the one before instead of following it. `prepare`'s generator is closed at the
    end, even on an error, so whatever it runs ahead (a `BatchJoiner`) stops with this call.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches = [order[start : start + batch_size] for start in range(0, len(lengths), batch_size)]
    device = model_device(model)
    results: list[torch.Tensor | None] = [None] * len(lengths)
    in_flight: InFlight | None = None
    with contextlib.closing(prepare(batches)) as prepared:
        for indices, batch in tqdm(zip(batches, prepared), total=len(batches), desc=f"encoding {label}",
                                   disable=not show_progress_bar, leave=False):
            launched = _launch(model, batch, indices, device)
            if in_flight is not None:
                _read_back(in_flight, results)
            in_flight = launched
    if in_flight is not None:
        _read_back(in_flight, results)
    return results  # type: ignore[return-value]  # every slot is filled: order is a permutation


@dataclass
class InFlight:
    """A batch given to the model: its items' indices, its token mask (on the host), and its
    embeddings on their way to the host; on a GPU `arrived` fires when they are there."""

    indices: list[int]
    keep: torch.Tensor
    embeddings: torch.Tensor
    arrived: torch.cuda.Event | None


def _launch(model: torch.nn.Module, batch: dict[str, torch.Tensor], indices: list[int],
            device: torch.device) -> InFlight:
    """Queue a batch's copy to the device, its forward and the copy of its embeddings back (into
    pinned memory, which torch allocates for a non-blocking copy to the CPU), without waiting."""
    with torch.inference_mode():
        inputs = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        embeddings = model(**inputs).embeddings.to("cpu", non_blocking=True)
    arrived = None
    if device.type == "cuda":
        arrived = torch.cuda.Event()
        arrived.record()
    return InFlight(indices, batch["attention_mask"].bool(), embeddings, arrived)


def _read_back(batch: InFlight, results: list[torch.Tensor | None]) -> None:
    """Wait for a batch's embeddings, then store each item's real tokens as float32."""
    if batch.arrived is not None:
        batch.arrived.synchronize()
    for i, row, mask in zip(batch.indices, batch.embeddings, batch.keep):
        # Indexed outside inference mode: a copy that is an ordinary tensor, usable in place.
        results[i] = row[mask].float()


@dataclass(frozen=True)
class StoredPage:
    """A page as a `datasets` Image column stores it (`{"bytes", "path"}`) and the feature decoding it:
    a worker decodes it as `datasets` would, so only encoded bytes cross to the workers."""

    stored: dict[str, Any]
    feature: Any  # datasets.Image

    def decoded(self) -> Image.Image:
        return self.feature.decode_example(self.stored)


class PageWorker(torch.utils.data.Dataset):
    """What a worker does for one page: the processor's tensors for a batch of one, pixels cast to
    `pixel_dtype` (see `pixel_dtype`). An item names its page either by position among the pages
    the workers were started with (`("held", i)`: shared by fork, nothing sent) or carries it
    (`("sent", source)`)."""

    def __init__(self, processor: Any, pixel_dtype: torch.dtype | None) -> None:
        self.processor, self.pixel_dtype = processor, pixel_dtype
        self.held: list[Any] = []

    def __getitem__(self, item: tuple[str, Any]) -> dict[str, torch.Tensor]:
        kind, value = item
        return self.prepare(self.held[value] if kind == "held" else value)

    def prepare(self, source: Any) -> dict[str, torch.Tensor]:
        if isinstance(source, StoredPage):
            source = source.decoded()
        page = dict(self.processor.process_images([source]))
        if self.pixel_dtype is not None:
            page["pixel_values"] = page["pixel_values"].to(self.pixel_dtype)
        return page


class PageFeed(torch.utils.data.Sampler):
    """The items of the current call, in order: a persistent `DataLoader` re-reads its sampler at
    each new iteration, so one loader (and its workers) serves every call."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class JoinPages:
    """Pages prepared one by one -> the batch the processor would have made of them: prompts
    left-padded to the longest (pad token, mask 0), pixel patches and grids concatenated; into
    pinned memory when `pin`, so the copy to the GPU does not block (torch's caching host allocator
    hands a freed batch's pinned block to a later batch instead of pinning new memory)."""

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


@dataclass
class Failed:
    """What `BatchJoiner`'s thread hands over instead of a batch: the error that stopped it."""

    error: BaseException


class BatchJoiner:
    """A thread that joins prepared pages into batches (`JoinPages`) and queues up to `ahead` of
    them, so the main thread only copies and launches.

    Why a thread: joining a batch (16 pages' pixels, ~250 MB of bf16, into pinned memory) takes the
    main thread a while, and the main thread gets to it only once it has launched the current
    batch's kernels. The eager page forward launches thousands of them; once the launch queue is
    full, launching returns near the end of the GPU's work, so a join done there runs while the GPU
    idles. Here it runs while the main thread launches; `torch.cat` releases the GIL. An error in
    the thread (a page a worker refuses) is handed over and raised by `batches()` in the caller;
    `stop()` ends the thread, whatever it was doing, and drops what it queued.
    """

    def __init__(self, pages: Iterator[dict[str, torch.Tensor]], sizes: list[int], join: JoinPages,
                 ahead: int) -> None:
        self.sizes = sizes
        self.queue: queue.Queue[dict[str, torch.Tensor] | Failed] = queue.Queue(maxsize=ahead)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(pages, join), name="colquant-join-pages",
                                       daemon=True)
        self.thread.start()

    def _run(self, pages: Iterator[dict[str, torch.Tensor]], join: JoinPages) -> None:
        """Join batch after batch into the queue, until done, stopped, or failed."""
        try:
            for size in self.sizes:
                batch_pages = []
                for _ in range(size):
                    if self.stopping.is_set():
                        return
                    batch_pages.append(next(pages))
                self.queue.put(join(batch_pages))
        except BaseException as error:  # noqa: BLE001  # handed to the caller, raised there
            self.queue.put(Failed(error))

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The joined batches, in order; raises the thread's error where it stopped."""
        for _ in self.sizes:
            item = self.queue.get()
            if isinstance(item, Failed):
                raise item.error
            yield item

    def stop(self) -> None:
        """End the thread and drop its queued batches; a later `batches()` step raises instead of
        waiting for batches that will not come."""
        self.stopping.set()
        while self.thread.is_alive():
            self._drain()  # frees a `put` the thread may be blocked in
            self.thread.join(timeout=0.01)
        self._drain()
        self.queue.put(Failed(RuntimeError("these pages' batches were stopped: the PagePipeline was closed")))

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()


class PagePipeline:
    """Worker processes that prepare pages ahead of the model, kept from one call to the next.

    Why kept: a worker is a fork of this process (slow with a model loaded), and a fresh set per
    call makes each call's first batch wait for start-up and preparation with nothing to overlap.
    The pages of the first call reach the workers by that fork (shared, not copied); later calls
    refer to those same page objects by position, and send any other page to a worker: free for
    paths and encoded bytes, a copy (~16 MB for a decoded 2560x2048 page) for decoded images.
    Workers run one torch thread each (DataLoader's rule), so 15 of them share 16 cores with the
    main process. Up to `ahead_batches` batches of pages are prepared, and as many joined (by a
    `BatchJoiner`), ahead. With 0 workers pages are prepared in the joining thread, in the same
    order. One call at a time uses a pipeline; use it as a context manager, or `close()` it.
    """

    def __init__(self, processor: Any, num_workers: int, *, pin: bool, pixel_dtype: torch.dtype | None = None,
                 ahead_batches: int = 2) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if ahead_batches < 1:
            raise ValueError(f"ahead_batches must be >= 1, got {ahead_batches}")
        self.worker, self.feed = PageWorker(processor, pixel_dtype), PageFeed()
        self.join = JoinPages(processor.tokenizer.pad_token_id, pin)
        self.num_workers, self.pixel_dtype, self.ahead_batches = num_workers, pixel_dtype, ahead_batches
        self.loader: torch.utils.data.DataLoader | None = None
        self.held_at: dict[int, int] = {}
        self.joiner: BatchJoiner | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, processor: Any | None = None,
                  num_workers: int | None = None) -> PagePipeline:
        """A pipeline for `model`: its processor, pinned memory on a GPU, pixels in its vision
        tower's dtype, and `default_workers` unless `num_workers` is given."""
        device = model_device(model)
        workers = default_workers(device) if num_workers is None else num_workers
        return cls(attached_processor(model, processor), workers, pin=device.type == "cuda",
                   pixel_dtype=pixel_dtype(model))

    def prepared(self, sources: Sequence[Any],
                 batches: list[list[int]]) -> Generator[dict[str, torch.Tensor], None, None]:
        """The batches (lists of positions in `sources`) as the processor would batch them, in order,
        joined ahead by a thread that stops when this generator is closed or finished."""
        # The workers start (fork) here, in the main thread, before the joining thread exists.
        pages = self._pages([sources[i] for batch in batches for i in batch], max(map(len, batches), default=1))
        joiner = self.joiner = BatchJoiner(pages, [len(batch) for batch in batches], self.join, self.ahead_batches)
        try:
            yield from joiner.batches()
        finally:
            joiner.stop()
            if self.joiner is joiner:
                self.joiner = None

    def _pages(self, ordered: list[Any], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Each page's tensors, in order; prepared ahead by the workers when there are any."""
        if self.num_workers == 0 or not ordered:
            return (self.worker.prepare(source) for source in ordered)
        if self.loader is None:
            self.loader = self._started(ordered, batch_size)
        self.feed.items = [self._item(source) for source in ordered]
        return iter(self.loader)

    def _started(self, first: list[Any], batch_size: int) -> torch.utils.data.DataLoader:
        """The persistent loader, with the first call's pages held by the workers it forks."""
        self.worker.held = list(first)
        self.held_at = {id(source): position for position, source in reversed(list(enumerate(first)))}
        per_worker = max(2, math.ceil(self.ahead_batches * batch_size / self.num_workers))
        return torch.utils.data.DataLoader(self.worker, batch_size=None, sampler=self.feed,
                                           num_workers=self.num_workers, persistent_workers=True,
                                           prefetch_factor=per_worker)

    def _item(self, source: Any) -> tuple[str, Any]:
        """How a worker gets a page: by position when it holds that very object, else sent."""
        position = self.held_at.get(id(source))
        if position is not None and self.worker.held[position] is source:
            return ("held", position)
        return ("sent", source)

    def close(self) -> None:
        """Stop the joining thread and the workers now (a later call starts new ones); DataLoader has
        no public way to stop its workers."""
        if self.joiner is not None:
            self.joiner.stop()
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
        self.loader, self.held_at, self.worker.held = None, {}, []

    def __enter__(self) -> PagePipeline:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _as_padded(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, max_tokens, dim) right-padded with zeros, and the (items, max_tokens) token mask."""
    if not embeddings:
        raise ValueError("nothing to pad: no items were encoded")
    padded = torch.nn.utils.rnn.pad_sequence(embeddings, batch_first=True)
    lengths = torch.tensor([e.shape[0] for e in embeddings])
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return padded, mask
