"""The mteb encoder of ColQuant: any loaded ColQwen3 variant (BF16 or 4-bit) as an mteb model.

`ColQuantEncoder` embeds text queries and page images with the project's processor and scores them
with `colquant.score`. With `replicas` (copies of the model on other GPUs) it splits the page
encoding of each corpus chunk across them, group k of `batches_per_call` mteb batches on replica
k mod n (`distributed.encode_across_replicas`, the round-robin of `encode-corpus`'s shards), so the
evaluation of one variant on N GPUs takes about 1/N of the page-encoding time. `gpu_replicas`
loads those copies when more than one GPU is visible. `colquant.evaluate.evaluation` runs it through mteb.

Pages run as `encode_pages` runs them: each model (and replica) has a `PagePipeline` whose worker
processes prepare (decode, resize, normalise, patchify) the pages of the next mteb batches while the
model encodes the current one. The pages are read from mteb's corpus rows as stored, not through
its dataloader (`mteb_page_batches`): iterating the dataloader decodes every page in one thread of
this process and then sends the decoded page (~16 MB at 2560x2048) to a worker, which bounded the
evaluation at a third of `encode_pages`' rate; a stored page is its encoded bytes or file path,
decoded in a worker exactly as `datasets` decodes it (`encode.StoredPage`). A corpus not stored as
a `datasets` Image column, or a dataloader that does not read it in order, is read through the
dataloader as before. A thread reads the batches ahead of the models. mteb's batches are kept
exactly as mteb gives them (the published ViDoRe numbers pad each of its batches as one): the
pipeline joins each batch's pages into the tensors the processor makes of that batch, so the
embeddings are the same as processing the batch in one call. Memory: per model, the pages of a
group being encoded and of up to two more read ahead, plus the first group's pages, which the
pipeline's workers were forked with, until `close()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import torch
from datasets import Dataset
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ScoringFunction
from mteb.types import PromptType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from colquant.evaluate.embedding_cache import EmbeddingCache, Request
from colquant.evaluate.mteb_rows import items_digest, mteb_page_batches
from colquant.evaluate.shared_vision import Companion, check_shareable, launch_shared_vision
from colquant.inference.distributed import encode_across_replicas, load_replicas, visible_gpus
from colquant.retriever.encode import MAX_DEFAULT_WORKERS, Failed, InFlight, PagePipeline, StoredPage, _launch, model_device
from colquant.retriever.scoring import SCORING_MODES, Embeddings, ScoringMode, score

log = logging.getLogger(__name__)

MODEL_ORGANISATION = "colquant"
# mteb files results under <name>/<revision>/. The revision is the fingerprint of everything the
# scores depend on (checkpoint content, dtype, visual-token budget, scoring mode; see
# `workspace.evaluation_fingerprint`), so a changed input is recomputed and its old result never read.
REVISION_PATTERN = re.compile(r"[0-9a-f]{8,64}")
DEFAULT_SCORING: ScoringMode = "colpali"
# Similarity entries per scoring block (~400 MB in float32), the budget mteb's max_sim uses.
SIMILARITY_ELEMENTS = 100_000_000
# mteb batches handed to a page pipeline at once: while the model runs one, the pipeline prepares
# the next of the same call; the decoded pages of this many batches (per model, twice over: one
# group running, one queued) are what the encoder holds in memory.
BATCHES_PER_CALL = 4

def check_scoring(scoring: str) -> None:
    """Refuse a scoring mode `colquant.score` does not have, naming the two it has."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"evaluation.scoring={scoring!r}: use 'colpali' (mteb's published scoring) or 'exact' (true MaxSim)")


def other_scoring(scoring: ScoringMode) -> ScoringMode:
    """The mode shown in the extra column beside the main one."""
    check_scoring(scoring)
    return "exact" if scoring == "colpali" else "colpali"


def variant_model_name(variant_name: str) -> str:
    """The mteb model name of a variant, e.g. `colquant/w4a16-g128-sym-rtn`.

    mteb's result cache is keyed by model name: two variants sharing a name would share results,
    and the second would silently be reported with the first one's scores.
    """
    if not variant_name or "/" in variant_name:
        raise ValueError(f"variant name {variant_name!r} must be non-empty and contain no '/', "
                         "e.g. 'bf16' or 'w4a16-g128-sym-rtn'")
    return f"{MODEL_ORGANISATION}/{variant_name}"


class ColQuantEncoder(AbsEncoder):
    """mteb encoder for a loaded ColQwen3 variant: multi-vector embeddings scored with MaxSim.

    Queries and pages go through the project's processor exactly as `colquant` uses them elsewhere
    (query augmentation, page prompt, visual-token budget). Task prompts are not prepended, as in
    mteb's own ColQwen3 wrapper that produced the published ViDoRe scores.

    `encode` returns a (items, tokens, dim) tensor in the model's dtype, each item's real tokens
    first and zero rows after (mteb pads a corpus chunk the same way); `similarity` is
    `colquant.score` in the `scoring` mode: `colpali` maxes over those zero rows as colpali-engine
    does, `exact` ignores them. Results are cached under (variant name, `revision`); the revision
    must be the fingerprint of everything that changes scores (weights, dtype, visual-token budget,
    scoring mode: `workspace.evaluation_fingerprint`). `replicas` (the same model on other devices)
    share the page encoding with `model`; `"auto"` loads `gpu_replicas(model, processor)` when pages
    are first encoded (so a run whose results are all cached loads none), `()` keeps to one device.

    Each model's `PagePipeline` starts on its first pages and is kept across `encode` calls (its
    workers fork once per evaluation, not once per corpus chunk); `close()` stops them, and the
    encoder is a context manager that does. `page_workers` processes per model prepare pages
    (default: the cores but one per model, shared among the models, up to 16 each, on a GPU; none
    on a CPU), `batches_per_call` mteb batches at a time.

    With a `cache` (`embedding_cache.EmbeddingCache` of this model), a call whose items, task and
    batching were encoded before returns the stored embeddings (bit-identical) instead of encoding,
    and a call it encodes is stored. `companions` (`shared_vision.Companion`: models with the same
    vision tower, on the same device, and their caches) are encoded with it: each page batch runs
    through this model's vision tower once and through every model's language model, and the
    companions' embeddings go to their caches, so evaluating them after this one encodes no page
    (their calls' embeddings are held in memory until this call ends).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, variant_name: str, revision: str,
                 scoring: ScoringMode = DEFAULT_SCORING,
                 replicas: Sequence[torch.nn.Module] | Literal["auto"] = "auto", *,
                 page_workers: int | None = None, batches_per_call: int = BATCHES_PER_CALL,
                 cache: EmbeddingCache | None = None, companions: Sequence[Companion] = ()) -> None:
        if not isinstance(revision, str) or not REVISION_PATTERN.fullmatch(revision):
            raise ValueError(f"revision {revision!r} must be a hex fingerprint of the variant's inputs, e.g. "
                             "workspace.evaluation_fingerprint(profile, checkpoint, scoring)")
        check_scoring(scoring)
        if page_workers is not None and page_workers < 0:
            raise ValueError(f"page_workers must be >= 0 (0: prepare pages in a thread of this process), got {page_workers}")
        if batches_per_call < 1:
            raise ValueError(f"batches_per_call must be >= 1, got {batches_per_call}")
        self.page_workers, self.batches_per_call = page_workers, batches_per_call
        self.cache, self.companions = cache, list(companions)
        if self.companions:
            replicas = replicas_with_companions(model, cache, replicas, self.companions)
        self._sharing: list[Companion] = []  # during a page call: the companions encoded with it
        self._shared_items: list[list[torch.Tensor]] = []
        self.pipelines: dict[int, PagePipeline] = {}
        self.model = model
        self.replicas: list[torch.nn.Module] | None = None if replicas == "auto" else list(replicas)
        self.processor = processor
        self.scoring = scoring
        self.device = next(model.parameters()).device
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=variant_model_name(variant_name),
            revision=revision,
            release_date=None,
            languages=["eng-Latn"],
            n_parameters=None,
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=None,
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.MAX_SIM,
            use_instructions=False,
            training_datasets=None,
            modalities=["text", "image"],
            model_type=["late-interaction"],
        )

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Embed a dataloader of text queries or page images (mteb's batches: {"text": [...]} or
        {"image": [PIL, ...]}); the batch size is the dataloader's, set by mteb from encode_kwargs.
        Page batches are spread over the model and its replicas, prepared ahead by their page
        pipelines; queries run on the model. Read from the cache instead where it holds the call."""
        columns = set(inputs.dataset.column_names) & {"text", "image"}
        progress = kwargs.get("show_progress_bar", True)
        if columns not in ({"text"}, {"image"}):
            raise ValueError(
                f"{task_metadata.name} ({hf_subset}/{hf_split}) gives inputs with columns "
                f"{sorted(inputs.dataset.column_names)}; ColQuantEncoder embeds either text queries or "
                "page images, so use text-to-image tasks (category 't2i')")
        column = columns.pop()
        request = None if self.cache is None else cache_request(inputs, column, task_metadata, hf_subset, hf_split)
        items = None if request is None else self.cache.get(request)
        if items is None:
            items = (self._encode_queries(inputs, progress) if column == "text"
                     else self._encode_pages(inputs, progress, request))
            if request is not None:
                self.cache.put(request, items)
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)

    def _encode_queries(self, inputs: DataLoader, progress: bool) -> list[torch.Tensor]:
        """Each mteb batch of queries through the processor and the model, in this thread."""
        items = []
        with torch.inference_mode():
            for batch in tqdm(inputs, desc="Encoding queries", disable=not progress):
                features = self.processor.process_queries(batch["text"]).to(self.device)
                embeddings = self.model(**features).embeddings
                keep = features["attention_mask"].bool()
                items += [row[mask].cpu() for row, mask in zip(embeddings, keep)]
        return items

    def _encode_pages(self, inputs: DataLoader, progress: bool, request: Request | None) -> list[torch.Tensor]:
        """mteb's page batches, `batches_per_call` at a time, group k on model k mod n (each with
        its own pipeline), read from mteb's dataloader one group ahead by a thread; the companions
        whose caches lack this call are encoded with the model and their embeddings stored."""
        self._sharing = [c for c in self.companions if request is not None and not c.cache.has(request)]
        self._shared_items = [[] for _ in self._sharing]
        try:
            items = self._encode_page_groups(inputs, progress)
            for companion, shared in zip(self._sharing, self._shared_items):
                companion.cache.put(request, shared)
        finally:
            self._sharing, self._shared_items = [], []
        return items

    def _encode_page_groups(self, inputs: DataLoader, progress: bool) -> list[torch.Tensor]:
        if self.replicas is None:
            self.replicas = gpu_replicas(self.model, self.processor)
        models = [self.model, *self.replicas]
        for model in models:
            self._pipeline(model, len(models))  # made here, in the calling thread, before any is used
        batches = tqdm(self._page_batches(inputs), total=len(inputs), desc="Encoding pages", disable=not progress)
        with contextlib.closing(read_ahead(page_groups(batches, self.batches_per_call), ahead=1)) as groups:
            return encode_across_replicas(models, groups, self._encode_group)

    def _page_batches(self, inputs: DataLoader) -> Iterable[dict[str, Any]]:
        """mteb's page batches, stored pages where its corpus allows (`mteb_page_batches`)."""
        return mteb_page_batches(inputs)

    def _pipeline(self, model: torch.nn.Module, n_models: int) -> PagePipeline:
        """`model`'s page pipeline, made on first use and kept until `close()`."""
        if id(model) not in self.pipelines:
            workers = self.page_workers
            if workers is None:
                workers = workers_per_model(model_device(model), n_models)
            self.pipelines[id(model)] = PagePipeline.for_model(model, processor=self.processor, num_workers=workers)
        return self.pipelines[id(model)]

    def _encode_group(self, model: torch.nn.Module, group: PageGroup) -> list[torch.Tensor]:
        """The embeddings of a group's pages (each page's real tokens, in the model's dtype), its
        batches prepared by the model's pipeline; batch i+1 is launched before batch i is read back."""
        pipeline = self.pipelines[id(model)]
        sources = [page for batch in group.batches for page in batch["image"]]
        positions, start = [], 0
        for batch in group.batches:
            positions.append(list(range(start, start + len(batch["image"]))))
            start += len(batch["image"])
        device = model_device(model)
        items: list[list[torch.Tensor]] = [[] for _ in range(1 + len(self._sharing))]  # model's, companions'
        in_flight: list[InFlight] = []
        with contextlib.closing(pipeline.prepared(sources, positions)) as prepared:
            for number, indices in enumerate(positions):
                try:
                    features = next(prepared)
                except Exception as error:
                    self._name_the_page(error, group, number)
                    raise
                launched = (launch_shared_vision([model, *(c.model for c in self._sharing)], features, indices, device)
                            if self._sharing else [_launch(model, features, indices, device)])
                for own, batch in zip(items, in_flight):
                    own += embeddings_read_back(batch)
                in_flight = launched
        for own, batch in zip(items, in_flight):
            own += embeddings_read_back(batch)
        for shared, companion_items in zip(self._shared_items, items[1:]):
            shared += companion_items
        return items[0]

    def _name_the_page(self, error: Exception, group: PageGroup, number: int) -> None:
        """Add a note to `error`, raised while preparing batch `number` of `group`, naming the page:
        the first page of that batch the processor refuses on its own (what a worker does with it).
        The pipeline prepares pages in order, so the failing page is in the batch being waited for."""
        batch = group.batches[number]
        first = group.first_page + sum(len(earlier["image"]) for earlier in group.batches[:number])
        for offset, page in enumerate(batch["image"]):
            try:
                self.processor.process_images([page.decoded() if isinstance(page, StoredPage) else page])
            except Exception:  # noqa: BLE001  # the page is found; the error raised is the original
                ids = batch.get("id")
                named = f" (id {ids[offset]!r})" if ids is not None else ""
                error.add_note(f"while preparing page {first + offset}{named} of this encode call "
                               f"(mteb batch {group.first_batch + number}, item {offset}) for the model")
                return
        error.add_note(f"while preparing mteb batch {group.first_batch + number} (pages {first} to "
                       f"{first + len(batch['image']) - 1}) for the model; each page alone prepares fine")

    def close(self) -> None:
        """Stop every page pipeline's workers (a later `encode` starts new ones)."""
        pipelines, self.pipelines = list(self.pipelines.values()), {}
        for pipeline in pipelines:
            pipeline.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def similarity(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """Late-interaction scores (queries, pages) in the encoder's scoring mode, float32 on the
        model's device (`colquant.score` works in bounded blocks, whatever the corpus chunk)."""
        return score(embeddings1, embeddings2, mode=self.scoring, device=self.device,
                     block_elements=SIMILARITY_ELEMENTS, show_progress_bar=False)

    def similarity_pairwise(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """Score of each query with the page at the same position (mteb's reranking path)."""
        if len(embeddings1) != len(embeddings2):
            raise ValueError(f"pairwise similarity needs as many queries as pages, got "
                             f"{len(embeddings1)} and {len(embeddings2)}")
        return torch.stack([
            score(embeddings1[i : i + 1], embeddings2[i : i + 1], mode=self.scoring, device=self.device,
                  show_progress_bar=False)[0, 0].cpu()
            for i in range(len(embeddings1))
        ])



def replicas_with_companions(model: torch.nn.Module, cache: EmbeddingCache | None,
                             replicas: Sequence[torch.nn.Module] | Literal["auto"],
                             companions: Sequence[Companion]) -> tuple[()]:
    """Companions run on the model's one device (no replicas) and store into caches: refuse an
    encoder that has no cache, is given replicas, or whose companions cannot share its vision output."""
    if cache is None:
        raise ValueError("companions are encoded into their caches alongside this model's: give this encoder a "
                         "cache too, or no companions")
    if replicas != "auto" and len(replicas):
        raise ValueError("companions share this model's vision tower on its one device: pass replicas=() with "
                         "companions, or no companions to spread pages over replicas")
    check_shareable([model, *(companion.model for companion in companions)])
    return ()


def cache_request(inputs: DataLoader, column: str, task_metadata: TaskMetadata, hf_subset: str,
                  hf_split: str) -> Request:
    """What an encode call asks for, as the embedding cache keys it: the task's name and dataset
    revision, subset and split, queries or pages, mteb's batch size and the items' content in order."""
    if not isinstance(inputs.dataset, Dataset):
        raise TypeError(f"the embedding cache identifies a call by its datasets.Dataset (mteb's create_dataloader "
                        f"gives one), not a {type(inputs.dataset).__name__}: pass cache=None to encode without it")
    return Request(task=task_metadata.name, revision=task_metadata.revision, subset=hf_subset, split=hf_split,
                   kind="queries" if column == "text" else "pages", batch_size=inputs.batch_size,
                   items=len(inputs.dataset), content=items_digest(inputs.dataset, column))


def gpu_replicas(model: torch.nn.Module, processor: Any) -> list[torch.nn.Module]:
    """Copies of `model` on every other visible GPU, loaded from the checkpoint it was loaded from
    with its dtype and visual-token budget; none when it is on the CPU or is the only GPU's."""
    device = next(model.parameters()).device
    others = [gpu for gpu in visible_gpus() if gpu != device] if device.type == "cuda" else []
    if not others:
        return []
    checkpoint = getattr(model.config, "_name_or_path", "")
    if not checkpoint or not (Path(checkpoint) / "config.json").is_file():
        raise ValueError(f"cannot copy the model to {len(others)} more GPU(s): it was not loaded from a checkpoint "
                         f"directory (config._name_or_path={checkpoint!r}); load it with colquant.load(path), pass "
                         "replicas=load_replicas(path, devices), or replicas=() to encode on one GPU")
    log.info("encoding pages on %d GPUs: %s plus replicas on %s", len(others) + 1, device,
             ", ".join(map(str, others)))
    return load_replicas(checkpoint, others, dtype=model.dtype, max_num_visual_tokens=processor.max_num_visual_tokens)


@dataclass
class PageGroup:
    """Consecutive mteb batches of pages, and where they start among the call's pages and batches."""

    batches: list[dict[str, Any]]
    first_page: int
    first_batch: int


def page_groups(batches: Iterable[dict[str, Any]], size: int) -> Iterator[PageGroup]:
    """mteb's batches, unchanged, `size` at a time (the last group may be smaller)."""
    group: list[dict[str, Any]] = []
    first_page = first_batch = 0
    for number, batch in enumerate(batches):
        group.append(batch)
        if len(group) == size:
            yield PageGroup(group, first_page, first_batch)
            first_page, first_batch, group = first_page + sum(len(b["image"]) for b in group), number + 1, []
    if group:
        yield PageGroup(group, first_page, first_batch)


def read_ahead(items: Iterable[Any], *, ahead: int) -> Generator[Any, None, None]:
    """`items` in order, read by a thread up to `ahead` items before they are asked for.

    Why: mteb's dataloader decodes the page images when iterated (PIL decodes with the GIL
    released), so reading it in a thread overlaps decoding with the model instead of making the
    model wait for it. An error while reading is raised here, in order; closing this generator stops
    the thread (after the item it is reading).
    """
    buffer: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stopping, done = threading.Event(), object()

    def hand_over(item: Any) -> bool:
        while not stopping.is_set():
            with contextlib.suppress(queue.Full):
                buffer.put(item, timeout=0.05)
                return True
        return False

    def run() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(done)
        except BaseException as error:  # noqa: BLE001  # handed to the consumer, raised there
            hand_over(Failed(error))

    thread = threading.Thread(target=run, name="colquant-read-mteb-batches", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, Failed):
                raise item.error
            yield item
    finally:
        stopping.set()
        thread.join()


def embeddings_read_back(batch: InFlight) -> list[torch.Tensor]:
    """Wait for a launched batch's embeddings; each item's real tokens, in the model's dtype (what
    mteb's encoder returns), as ordinary CPU tensors."""
    if batch.arrived is not None:
        batch.arrived.synchronize()
    return [row[mask] for row, mask in zip(batch.embeddings, batch.keep)]


def workers_per_model(device: torch.device, n_models: int) -> int:
    """Page-preparing processes for each of `n_models` models: on GPUs the cores but one per model
    (each drives its GPU from a thread of this process), shared, at most 16 each; none on a CPU, as
    `encode.default_workers`."""
    if device.type != "cuda":
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, ((os.cpu_count() or 1) - n_models) // n_models))
