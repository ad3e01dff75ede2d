"""The embedding cache of the evaluation: bit-identical to encoding, keyed by what embeddings depend on,
nothing a killed write left is ever read, bounded, and notebook 07 after 05 encodes no page."""

from __future__ import annotations

import shutil

import colquant
import pytest
import torch
from colquant.evaluate import embedding_cache
from colquant.evaluate.compress_eval import EmbeddingMemo, evaluate_setting
from colquant.evaluate.embedding_cache import EmbeddingCache, Request
from colquant.evaluate.evaluation import ColQuantEncoder, evaluate_variant, get_tasks
from colquant.inference.compress import parse_setting
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType
from tiny_task import N_PAGES, N_QUERIES, TASK

REV = "0123456789abcdef"


@pytest.fixture(scope="module")
def task(corpus_root):
    task = get_tasks([TASK], corpus_root=corpus_root, n_pages=N_PAGES, n_queries=N_QUERIES)[0]
    task.load_data()
    yield task
    task.unload_data()


def loaders(task, batch_size: int = 4) -> dict[PromptType, object]:
    split = task.dataset["default"]["test"]
    return {kind: create_dataloader(split["queries" if kind is PromptType.query else "corpus"],
                                    task_metadata=task.metadata, prompt_type=kind, batch_size=batch_size)
            for kind in (PromptType.query, PromptType.document)}


def encode(encoder: ColQuantEncoder, task, loader, kind: PromptType, metadata=None) -> torch.Tensor:
    return encoder.encode(loader, task_metadata=metadata or task.metadata, hf_split="test", hf_subset="default",
                          prompt_type=kind, show_progress_bar=False)


class Forwards:
    """Counts a model's forwards with pages and with queries only."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.pages = self.queries = 0
        self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if kwargs.get("pixel_values") is not None:
            self.pages += 1
        else:
            self.queries += 1

    def close(self) -> None:
        self.hook.remove()


def test_cached_embeddings_are_bit_identical_to_fresh_ones_and_encode_nothing(small_model, tiny_path, task, tmp_path):
    model, processor = small_model
    batches = loaders(task)
    with ColQuantEncoder(model, processor, "bf16", REV, replicas=()) as plain:
        fresh = {kind: encode(plain, task, loader, kind) for kind, loader in batches.items()}
    for attempt in ("stores", "reads"):
        cache = EmbeddingCache.for_model(tmp_path, tiny_path, model, processor)
        forwards = Forwards(model)
        with ColQuantEncoder(model, processor, "bf16", REV, replicas=(), cache=cache) as cached:
            got = {kind: encode(cached, task, loader, kind) for kind, loader in batches.items()}
        forwards.close()
        for kind in batches:
            assert got[kind].dtype == fresh[kind].dtype and torch.equal(got[kind], fresh[kind]), (attempt, kind)
        assert (forwards.pages, forwards.queries) == ((2, 2) if attempt == "stores" else (0, 0))
    assert embedding_cache.cache_size(tmp_path)[0] == 2  # one entry per call: queries, pages


def request(**changes) -> Request:
    fields = {"task": TASK, "revision": "r1", "subset": "default", "split": "test", "kind": "pages",
              "batch_size": 4, "items": 2, "content": "c" * 64}
    return Request(**{**fields, **changes})


def items() -> list[torch.Tensor]:
    return [torch.randn(3, 8).to(torch.bfloat16), torch.randn(5, 8).to(torch.bfloat16)]


def test_a_changed_checkpoint_budget_or_task_revision_misses(small_model, tiny_path, task, tmp_path):
    model, processor = small_model
    cache = EmbeddingCache.for_model(tmp_path / "cache", tiny_path, model, processor)
    stored = items()
    assert cache.put(request(), stored)
    assert all(torch.equal(a, b) for a, b in zip(cache.get(request()), stored))
    assert cache.get(request(revision="r2")) is None  # the task's dataset revision
    assert cache.get(request(batch_size=8)) is None  # pages are padded in other batches
    assert cache.get(request(content="d" * 64)) is None  # other pages under the same ids

    changed = tmp_path / "changed"
    shutil.copytree(tiny_path, changed)
    weights = changed / "model-00002-of-00002.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    other_weights = EmbeddingCache.for_model(tmp_path / "cache", changed, model, processor)
    smaller, smaller_processor = colquant.load(tiny_path, max_num_visual_tokens=32)
    other_budget = EmbeddingCache.for_model(tmp_path / "cache", tiny_path, smaller, smaller_processor)
    assert len({cache.key, other_weights.key, other_budget.key}) == 3
    assert other_weights.get(request()) is None and other_budget.get(request()) is None

    # through the encoder: the same pages under another task revision are encoded again
    loader = loaders(task)[PromptType.document]
    revised = task.metadata.model_copy(update={"dataset": {**task.metadata.dataset, "revision": "other"}})
    forwards = Forwards(model)
    with ColQuantEncoder(model, processor, "bf16", REV, replicas=(), cache=cache) as encoder:
        encode(encoder, task, loader, PromptType.document)
        encode(encoder, task, loader, PromptType.document, revised)
        encode(encoder, task, loader, PromptType.document)
    forwards.close()
    assert forwards.pages == 4  # two batches, twice; the third call reads the first


def test_an_entry_a_killed_write_left_is_never_read_and_the_next_run_removes_it(tmp_path, monkeypatch):
    identity = {"checkpoint": "0" * 16, "processor": {}, "dtype": "bfloat16", "compute": {}}
    cache = EmbeddingCache(tmp_path, identity)
    assert cache.put(request(), items())

    def killed(*args, **kwargs):  # the entry is renamed into place, the kill comes before its record
        raise KeyboardInterrupt

    monkeypatch.setattr(embedding_cache, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.put(request(revision="r2"), items())
    monkeypatch.undo()
    unrecorded = cache.entry_path(request(revision="r2"))
    assert unrecorded.is_file() and cache.get(request(revision="r2")) is None
    staging = cache.folder / f".{unrecorded.name}.x1y2z3.partial"  # what SIGKILL leaves inside atomic_write
    staging.write_bytes(unrecorded.read_bytes()[:100])
    assert embedding_cache.remove_unfinished(tmp_path) == [staging, unrecorded]
    assert cache.get(request()) is not None  # the finished entry stays


def test_an_entry_changed_after_it_was_recorded_is_encoded_again(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path, {"checkpoint": "0" * 16})
    cache.put(request(), items())
    path = cache.entry_path(request())
    path.write_bytes(path.read_bytes()[:-8])
    assert cache.get(request()) is None and "not a whole cache entry" in caplog.text
    other = EmbeddingCache(tmp_path, {"checkpoint": "0" * 16})
    other.put(request(revision="r2"), items())
    shutil.copy(other.entry_path(request(revision="r2")), path)  # an entry renamed into another's place
    assert cache.get(request()) is None and "names another encoder or request" in caplog.text


def test_the_cache_stays_within_its_bound_and_keeps_only_evaluated_checkpoints(tmp_path, monkeypatch, caplog):
    stored = items()
    entry_bytes = sum(t.nbytes for t in embedding_cache.pack_items(stored, torch.bfloat16).values())
    cache = EmbeddingCache(tmp_path, {"checkpoint": "a" * 16}, max_bytes=int(entry_bytes * 1.5))
    assert cache.put(request(), stored) and not cache.put(request(revision="r2"), stored)
    assert f"would pass {embedding_cache.SIZE_ENV}" in caplog.text and cache.get(request(revision="r2")) is None
    assert embedding_cache.cache_size(tmp_path)[0] == 1

    monkeypatch.setenv(embedding_cache.SIZE_ENV, "lots")
    with pytest.raises(ValueError, match="is not a size in GiB > 0"):
        EmbeddingCache(tmp_path, {"checkpoint": "b" * 16})
    monkeypatch.setenv(embedding_cache.SIZE_ENV, "2")
    assert EmbeddingCache(tmp_path, {"checkpoint": "b" * 16}).max_bytes == 2 * 2**30

    EmbeddingCache(tmp_path, {"checkpoint": "b" * 16}).put(request(), stored)
    assert embedding_cache.retain(tmp_path, ["b" * 16]) == [cache.folder]
    assert embedding_cache.cache_size(tmp_path)[0] == 1


def test_notebook_07_after_05_encodes_no_page_and_no_query(small_model, tiny_path, corpus_root, tmp_path):
    """What the notebooks run: 05 scores BF16 both ways, 07 two index settings; one cache."""
    model, processor = small_model
    tasks = get_tasks([TASK], corpus_root=corpus_root, n_pages=N_PAGES, n_queries=N_QUERIES)
    cache = EmbeddingCache.for_model(tmp_path / "embeddings", tiny_path, model, processor)
    forwards = Forwards(model)
    for scoring in ("colpali", "exact"):
        evaluate_variant(model, processor, "bf16", tasks, tmp_path / "mteb", revision=REV, batch_size=4,
                         corpus_chunk_size=4, scoring=scoring, replicas=(), cache=cache)
    assert (forwards.pages, forwards.queries) == (2, 2)  # two corpus chunks and two query batches, once
    memo = EmbeddingMemo()
    for setting in ("none", "pool2+binary"):
        evaluate_setting(model, processor, "bf16", parse_setting(setting), tasks, tmp_path / "mteb-index",
                         revision=REV, batch_size=4, corpus_chunk_size=4, memo=memo, cache=cache)
    forwards.close()
    assert (forwards.pages, forwards.queries) == (2, 2)
