"""Encoding a page corpus on many GPUs and hosts with torch.distributed, and splitting the
evaluation's page encoding across the GPUs of one process.

The engine is torch.distributed, launched by `torchrun` (one process per GPU): it ships with torch,
so it is there wherever ColQuant runs, with no cluster service to install, and torchrun already does
what a launcher must (rendezvous, one process per GPU, several hosts with `--nnodes`, the whole job
stopped when one worker fails). Page encoding is embarrassingly parallel: ranks exchange no tensors,
so the process group (NCCL on GPUs, gloo on CPU) only holds barriers. Ray Data (`map_batches` with GPU
actors) is the field's choice for streaming a corpus over an autoscaling cluster; it could become a
second engine later, writing the same shard files (`colquant.inference.index`).

Work split: the corpus is cut into shards of `shard_size` consecutive pages, and shard k belongs to
rank k mod world_size (`shard_owner`), so each rank knows its work from its rank alone, and a rerun
with another number of GPUs still finds every finished shard. One GPU, or the CPU, is world_size 1:
the same code, no torchrun. Pages done are counted in one small file per rank under the output
directory (which, across hosts, must be on a filesystem every rank sees); rank 0 sums them into one
progress bar.

`encode_across_replicas` is the one-process form of the same split, used by the mteb encoder of
notebook 05: batch k goes to replica k mod n, one thread per GPU. A papermill kernel is one Python
process that mteb drives batch by batch; starting a process group from it would mean spawning
workers that each load the model and receive decoded images by pickling, and a process group that
outlives a re-run cell. Threads share the batches in memory, and PyTorch releases the GIL inside
its kernels, so replicas on different GPUs run concurrently.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from colquant.basics.arguments import usable_device
from colquant.basics.files import write_text
from colquant.inference import index as idx
from colquant.inference import page_sources
from colquant.retriever.checkpoint_files import checkpoint_fingerprint

log = logging.getLogger(__name__)

# NVLink multicast (NVLS, symmetric memory) can take shared GPUs out of service: off unless set.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
DEFAULT_SHARD_SIZE = 256
PROGRESS_DIR = ".progress"
PROGRESS_POLL_S = 2.0
# The last barrier waits for the slowest rank (after a rerun, one rank may hold all unfinished
# shards); a crashed rank ends the job through torchrun, so this only bounds a hang.
BARRIER_TIMEOUT = timedelta(hours=12)

Batch = TypeVar("Batch")


def leave_multicast_off() -> None:
    """Set the NVLink-multicast switches off in this process's environment unless already set."""
    for name, value in MULTICAST_OFF.items():
        os.environ.setdefault(name, value)


def shard_owner(shard: int, world_size: int) -> int:
    """The rank (or replica) that encodes shard (or batch) `shard`: round-robin."""
    return shard % world_size


@dataclass(frozen=True)
class Worker:
    """This process's place in the job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def worker_device(device: str | torch.device, local_rank: int) -> torch.device:
    """`auto`: this rank's GPU (cuda:LOCAL_RANK) when there are GPUs, else the CPU."""
    if str(device) != "auto":
        return usable_device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                           "start at most that many processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


@contextmanager
def worker_group(device: str | torch.device = "auto") -> Iterator[Worker]:
    """This process as a worker: under torchrun (WORLD_SIZE set) a member of the process group,
    which is created here and destroyed on exit; otherwise the only worker."""
    leave_multicast_off()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = worker_device(device, local_rank)
    if world_size == 1:
        yield Worker(0, 1, resolved)
        return
    created = not torch.distributed.is_initialized()
    if created:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            torch.distributed.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=resolved)
        else:
            torch.distributed.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield Worker(torch.distributed.get_rank(), torch.distributed.get_world_size(), resolved)
    finally:
        if created:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Progress across ranks


class CrossRankProgress:
    """Pages done, counted in one file per rank; rank 0 shows their sum in one bar, refreshed by a
    background thread so it moves while rank 0 is busy encoding."""

    def __init__(self, out_dir: Path, worker: Worker, total: int, show: bool) -> None:
        self.directory = Path(out_dir) / PROGRESS_DIR
        self.worker = worker
        self.done = 0
        self._stop = threading.Event()
        self._bar = tqdm(total=total, desc="encoding pages", unit="page", disable=not (show and worker.is_main))
        self._thread = threading.Thread(target=self._refresh_until_stopped, daemon=True)
        if worker.is_main and show:
            self._thread.start()

    def add(self, pages: int) -> None:
        self.done += pages
        write_text(self.directory / f"rank-{self.worker.rank}", str(self.done))

    def total_done(self) -> int:
        counts = (self.directory / f"rank-{rank}" for rank in range(self.worker.world_size))
        return sum(int(path.read_text() or 0) for path in counts if path.exists())

    def _refresh_until_stopped(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_S):
            self._show(self.total_done())

    def _show(self, done: int) -> None:
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        """Stop the refresh, show the final count (call after the last barrier)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.worker.is_main:
            self._show(self.total_done())
        self._bar.close()


# --------------------------------------------------------------------------------------------
# encode_corpus


def encode_corpus(
    model_id_or_variant: str | Path,
    source: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: str = "bfloat16",
    device: str | torch.device = "auto",
    max_num_visual_tokens: int | None = None,
    split: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    dpi: int = page_sources.DEFAULT_DPI,
    show_progress_bar: bool = True,
) -> Path:
    """Encode every page of `source` with a model or variant into an index at `out_dir`
    (`colquant.inference.index` describes the files; `load_index` reads them). Returns `out_dir`.

    Run it as is for one GPU or the CPU, or under `torchrun --nproc-per-node N` for N GPUs (each rank
    encodes its round-robin share of the shards). A rerun skips finished shards, so a killed job
    loses only the shards being encoded; a rerun with another model, dtype or visual-token budget
    into the same directory is refused. A rerun over the same source whose pages were added, removed
    or changed keeps the shards whose pages are unchanged and encodes the others. `source`, `split`,
    `image_column`, `id_column` and `dpi` as in `page_sources.open_source`.
    """
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("dpi", dpi)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    out_dir = Path(out_dir)
    with worker_group(device) as worker:
        pages = page_sources.open_source(source, split=split, image_column=image_column, id_column=id_column, dpi=dpi)
        manifest = _planned_manifest(model_id_or_variant, pages, dtype, max_num_visual_tokens, shard_size)
        idx.prepare_index_dir(out_dir)
        idx.check_manifest(out_dir, manifest)
        if worker.is_main:
            idx.write_manifest(out_dir, manifest)
        mine = [k for k in range(manifest["shards"]) if shard_owner(k, worker.world_size) == worker.rank]
        todo = [k for k in mine if not _finished(out_dir, k, pages, manifest)]
        progress = CrossRankProgress(out_dir, worker, len(pages), show_progress_bar)
        progress.add(sum(len(_pages_of(k, pages, manifest)) for k in mine if k not in todo))
        worker.barrier()  # every rank has checked the directory and counted its finished shards
        try:
            if todo:
                log.info("rank %d/%d: encoding %d of its %d shards on %s", worker.rank, worker.world_size,
                         len(todo), len(mine), worker.device)
                _encode_shards(model_id_or_variant, pages, out_dir, todo, manifest, worker, progress,
                               batch_size=batch_size, dtype=dtype, max_num_visual_tokens=max_num_visual_tokens)
            worker.barrier()  # every shard is written
        finally:
            progress.close()
        if worker.is_main:
            _finish(out_dir, pages, manifest)
    return out_dir


def _planned_manifest(model_id_or_variant: str | Path, pages: page_sources.PageSource, dtype: str,
                      max_num_visual_tokens: int | None, shard_size: int) -> dict[str, Any]:
    """The manifest of this run, from the checkpoint's files and processor (no weights loaded)."""
    from colquant.retriever.checkpoint import resolve_checkpoint
    from colquant.retriever.processing import ColQwen3Processor

    checkpoint = resolve_checkpoint(model_id_or_variant)
    processor = ColQwen3Processor.from_pretrained(checkpoint, max_num_visual_tokens=max_num_visual_tokens)
    model = {"id": str(model_id_or_variant), "checkpoint": str(checkpoint),
             "fingerprint": checkpoint_fingerprint(checkpoint)}
    return idx.new_manifest(model=model, processor=idx.processor_settings(processor), dtype=dtype,
                            source=pages.description, page_ids=pages.ids,
                            shard_size=shard_size)


def _pages_of(shard: int, pages: page_sources.PageSource, manifest: dict[str, Any]) -> range:
    return idx.shard_pages(shard, len(pages), manifest["shard_size"])


def _ids_of(shard: int, pages: page_sources.PageSource, manifest: dict[str, Any]) -> list[str]:
    return [pages.ids[i] for i in _pages_of(shard, pages, manifest)]


def _finished(out_dir: Path, shard: int, pages: page_sources.PageSource, manifest: dict[str, Any]) -> bool:
    """Whether the shard on disk can be kept: it holds these pages, whose content is unchanged (the
    pages are hashed only where a shard exists: a fresh run reads no page twice)."""
    if not idx.shard_path(out_dir, shard).exists():
        return False
    digests = [pages.digest(i) for i in _pages_of(shard, pages, manifest)]
    return idx.finished_shard(out_dir, shard, _ids_of(shard, pages, manifest), digests, manifest["key"])


def _encode_shards(model_id_or_variant: str | Path, pages: page_sources.PageSource, out_dir: Path, shards: list[int],
                   manifest: dict[str, Any], worker: Worker, progress: CrossRankProgress, *, batch_size: int,
                   dtype: str, max_num_visual_tokens: int | None) -> None:
    """Load the model on this rank's device and write its shards, decoding the next shard's pages
    in a background thread while the current one is encoded."""
    from colquant.inference.loading import load
    from colquant.retriever.encode import encode_pages
    from colquant.retriever.processing import page_size_problem

    model, processor = load(model_id_or_variant, dtype=dtype, device=worker.device,
                            max_num_visual_tokens=max_num_visual_tokens)
    storage = getattr(torch, dtype)

    def decode(shard: int) -> tuple[list[Any], list[str]]:
        """The shard's pages, each checked for a size the model can take, and their sha256."""
        images, digests = [], []
        for i in _pages_of(shard, pages, manifest):
            images.append(pages.open(i))
            digests.append(pages.digest(i))
            problem = page_size_problem(*images[-1].size)
            if problem:
                raise page_sources.SourceError(f"page {pages.ids[i]!r} {problem} Then rerun: shards whose pages "
                                               "are unchanged are kept.")
        return images, digests

    started, first_done, encoded = time.time(), 0.0, 0
    with ThreadPoolExecutor(1, thread_name_prefix="decode-pages") as decoder:
        upcoming = decoder.submit(decode, shards[0])
        for position, shard in enumerate(shards):
            images, digests = upcoming.result()
            if position + 1 < len(shards):
                upcoming = decoder.submit(decode, shards[position + 1])
            embeddings = encode_pages(model, images, processor=processor, batch_size=batch_size)
            ids = _ids_of(shard, pages, manifest)
            idx.write_shard(out_dir, shard, ids, digests, embeddings, storage, manifest["key"])
            progress.add(len(ids))
            encoded += len(ids)
            first_done = first_done or time.time()
    finished = time.time()
    # wall-clock stamps, so that a benchmark can merge the ranks' spans into one throughput
    log.info("rank %d/%d: encoded %d pages on %s in %.2f s (%.2f pages/s); first shard done at +%.2f s; "
             "span %.3f %.3f %.3f", worker.rank, worker.world_size, encoded, worker.device, finished - started,
             encoded / (finished - started), first_done - started, started, first_done, finished)


def _finish(out_dir: Path, pages: page_sources.PageSource, manifest: dict[str, Any]) -> None:
    """Record every shard's digest and mark the manifest complete (rank 0, after the last barrier:
    every rank has checked or written its shards, so their headers are read, not their tensors)."""
    unfinished = [k for k in range(manifest["shards"]) if not idx.shard_path(out_dir, k).exists()]
    if unfinished:
        raise idx.IncompleteIndexError(f"{out_dir}: shards {unfinished[:10]} are missing after every rank "
                                       "finished; rerun encode-corpus to encode them")
    records = [idx.shard_record(out_dir, k, _ids_of(k, pages, manifest), manifest["key"])
               for k in range(manifest["shards"])]
    tokens = sum(rows for _, rows in records)
    idx.remove_shards_from(out_dir, manifest["shards"])
    idx.write_manifest(out_dir, manifest | {"complete": True, "tokens": tokens,
                                            "shard_sha256": [digest for digest, _ in records]})
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    log.info("%s: %d pages, %d token vectors in %d shards", out_dir, len(pages), tokens, manifest["shards"])


# --------------------------------------------------------------------------------------------
# One process, several GPUs (the evaluation encoder)


def visible_gpus() -> list[torch.device]:
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def load_replicas(checkpoint: str | Path, devices: Sequence[torch.device], **load_options: Any) -> list[torch.nn.Module]:
    """One copy of a checkpoint's model per device, loaded as `colquant.load(checkpoint, device=...,
    **load_options)` loads it."""
    from colquant.inference.loading import load

    return [load(checkpoint, device=device, **load_options)[0] for device in devices]


def _on_device(model: torch.nn.Module, encode_batch: Callable[[torch.nn.Module, Any], list[torch.Tensor]],
               batch: Any) -> list[torch.Tensor]:
    """Run in a replica's thread: kernels (cuBLAS, Triton) launch on the thread's current GPU."""
    device = next(model.parameters()).device
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        return encode_batch(model, batch)


def encode_across_replicas(models: Sequence[torch.nn.Module], batches: Iterable[Batch],
                           encode_batch: Callable[[torch.nn.Module, Batch], list[torch.Tensor]],
                           *, in_flight_per_replica: int = 2) -> list[torch.Tensor]:
    """`encode_batch(model, batch)` for every batch, batch k on `models[k mod n]` in that model's
    own thread, results concatenated in batch order. At most `in_flight_per_replica` batches per
    replica are queued, which bounds the decoded inputs held in memory. One model runs in the
    calling thread."""
    if len(models) == 1:
        return [row for batch in batches for row in encode_batch(models[0], batch)]
    executors = [ThreadPoolExecutor(1, thread_name_prefix=f"replica-{n}") for n in range(len(models))]
    pending: deque[Future[list[torch.Tensor]]] = deque()
    results: list[torch.Tensor] = []
    try:
        for number, batch in enumerate(batches):
            owner = shard_owner(number, len(models))
            pending.append(executors[owner].submit(_on_device, models[owner], encode_batch, batch))
            while len(pending) > in_flight_per_replica * len(models):
                results += pending.popleft().result()
        while pending:
            results += pending.popleft().result()
    finally:
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)
    return results
