"""ColQuantEncoder's pages go through a PagePipeline per model: the same embeddings as processing
each mteb batch in one processor call, mteb's batch boundaries kept, the workers kept across calls
and stopped by close(), and a page the processor refuses named in the error."""

from __future__ import annotations

import multiprocessing
import os
import threading

import mteb
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType
from PIL import Image
from torch.utils.data import DataLoader

from colquant.evaluate.mteb_encoder import ColQuantEncoder, read_ahead, workers_per_model

REV = "0123abcd"
# widths x heights of different visual-token counts (tiny processor: 93, 329, 93 | 107, 381, 143 | 137
# prompt tokens), so every batch of 3 pads its prompts, and batching them sorted by size, as
# encode_pages does, would pad every batch to another length (381, 143, 93)
SIZES = [(96, 96), (640, 480), (150, 150), (80, 200), (512, 700), (200, 600), (300, 400)]
SLIVER = (402, 2)  # aspect ratio 201: Qwen's resizing refuses it


def page_dataset(sizes: list[tuple[int, int]]) -> Dataset:
    """Noise pages of the given sizes in a datasets image column, with ids, as a ViDoRe corpus."""
    generator = np.random.default_rng(0)
    images = [Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return Dataset.from_dict({"id": [f"page-{i}" for i in range(len(images))], "image": images},
                             features=Features({"id": Value("string"), "image": ImageFeature()}))


def mteb_loader(sizes: list[tuple[int, int]], batch_size: int = 3) -> tuple[DataLoader, dict]:
    """The dataloader mteb gives an encoder for a ViDoRe corpus, and the encode arguments."""
    metadata = mteb.get_task("VidoreArxivQARetrieval").metadata
    loader = create_dataloader(page_dataset(sizes), task_metadata=metadata, prompt_type=PromptType.document,
                               batch_size=batch_size)
    return loader, {"task_metadata": metadata, "hf_split": "test", "hf_subset": "default",
                    "prompt_type": PromptType.document, "show_progress_bar": False}


def per_batch_reference(model: torch.nn.Module, processor, loader: DataLoader) -> list[torch.Tensor]:
    """What the encoder did before it had a pipeline: each mteb batch through the processor in one
    call, then the model; each page's real tokens."""
    items = []
    with torch.inference_mode():
        for batch in loader:
            features = processor.process_images(batch["image"])
            keep = features["attention_mask"].bool()
            items += [row[mask] for row, mask in zip(model(**features).embeddings, keep)]
    return items


def forward_shapes(model: torch.nn.Module) -> tuple[list[tuple[int, ...]], torch.utils.hooks.RemovableHandle]:
    """The (pages, prompt length) of every forward of `model`, recorded by a hook."""
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes, hook


@pytest.mark.parametrize("page_workers", [None, 1])  # None: the CPU default, no workers
@pytest.mark.parametrize("batches_per_call", [1, 2])
def test_page_embeddings_are_bit_identical_to_processing_each_mteb_batch(tiny_model, page_workers,
                                                                         batches_per_call):
    model, processor = tiny_model
    loader, arguments = mteb_loader(SIZES)
    expected = per_batch_reference(model, processor, loader)
    with ColQuantEncoder(model, processor, "bf16", REV, replicas=(), page_workers=page_workers,
                         batches_per_call=batches_per_call) as encoder:
        encoded = encoder.encode(loader, **arguments)
    assert encoded.dtype == expected[0].dtype and len(encoded) == len(SIZES)
    for item, want in zip(encoded, expected):
        assert torch.equal(item[: len(want)], want)
        assert not item[len(want):].any()  # mteb's layout: real tokens first, zero rows after


def test_pages_are_decoded_in_the_page_workers_not_by_mtebs_dataloader(tiny_model, tmp_path, monkeypatch):
    """Iterating mteb's dataloader decodes every page in this process, then sends it decoded to a
    worker: the bound of the evaluation's page rate. The stored pages go to the workers instead."""
    model, processor = tiny_model
    loader, arguments = mteb_loader(SIZES)
    decoders = tmp_path / "decoders"
    decode = ImageFeature.decode_example

    def recording(self, value, token_per_repo_id=None):
        with decoders.open("a") as file:  # a worker is another process: it appends its pid here
            file.write(f"{os.getpid()}\n")
        return decode(self, value, token_per_repo_id)

    expected = per_batch_reference(model, processor, loader)
    monkeypatch.setattr(ImageFeature, "decode_example", recording)
    with ColQuantEncoder(model, processor, "bf16", REV, replicas=(), page_workers=1) as encoder:
        encoded = encoder.encode(loader, **arguments)
    pids = decoders.read_text().split()
    assert len(pids) == len(SIZES) and str(os.getpid()) not in pids
    for item, want in zip(encoded, expected):
        assert torch.equal(item[: len(want)], want)


def test_a_loader_that_does_not_read_the_corpus_in_order_is_read_as_mteb_gives_it(tiny_model):
    model, processor = tiny_model
    loader, arguments = mteb_loader(SIZES)
    shuffled = DataLoader(loader.dataset, batch_size=3, sampler=list(reversed(range(len(SIZES)))),
                          collate_fn=loader.collate_fn)
    expected = per_batch_reference(model, processor, shuffled)
    with ColQuantEncoder(model, processor, "bf16", REV, replicas=()) as encoder:
        encoded = encoder.encode(shuffled, **arguments)
    for item, want in zip(encoded, expected):
        assert torch.equal(item[: len(want)], want)


def test_mteb_batches_are_padded_as_mteb_gives_them_not_regrouped(tiny_model):
    """A batch of a small and a large page is one forward padded to the large page's prompt, as the
    processor pads that batch (sorting pages by size, as encode_pages does, would change it)."""
    model, processor = tiny_model
    loader, arguments = mteb_loader(SIZES)
    expected = [tuple(processor.process_images(batch["image"])["input_ids"].shape) for batch in loader]
    assert len(set(expected)) > 1  # the batches differ, so a regrouping shows
    shapes, hook = forward_shapes(model)
    try:
        with ColQuantEncoder(model, processor, "bf16", REV, replicas=(), batches_per_call=4) as encoder:
            encoder.encode(loader, **arguments)
    finally:
        hook.remove()
    assert shapes == expected


def test_the_pipeline_is_kept_across_encode_calls_and_stopped_by_close(tiny_model):
    model, processor = tiny_model
    loader, arguments = mteb_loader(SIZES[:4], batch_size=2)
    before = set(multiprocessing.active_children())
    encoder = ColQuantEncoder(model, processor, "bf16", REV, replicas=(), page_workers=2)
    first = encoder.encode(loader, **arguments)
    (pipeline,) = encoder.pipelines.values()
    workers = set(multiprocessing.active_children()) - before
    second = encoder.encode(loader, **arguments)
    assert list(encoder.pipelines.values()) == [pipeline]
    assert len(workers) == 2 and set(multiprocessing.active_children()) - before == workers  # the same workers
    encoder.close()
    assert not encoder.pipelines and not workers & set(multiprocessing.active_children())
    assert torch.equal(first, second)


@pytest.mark.parametrize("page_workers", [0, 1])
def test_a_page_the_processor_refuses_is_named_in_the_error(tiny_model, page_workers):
    model, processor = tiny_model
    loader, arguments = mteb_loader(SIZES[:4] + [SLIVER] + SIZES[4:], batch_size=2)
    with ColQuantEncoder(model, processor, "bf16", REV, replicas=(), page_workers=page_workers,
                         batches_per_call=2) as encoder:
        with pytest.raises(ValueError, match="aspect ratio of 201") as raised:
            encoder.encode(loader, **arguments)
        # page 4 is item 0 of mteb batch 2, the first batch of the second group of two
        assert "page 4 (id 'page-4') of this encode call (mteb batch 2, item 0)" in "\n".join(
            getattr(raised.value, "__notes__", []))
        # the pipeline serves the next call
        good, _ = mteb_loader(SIZES[:2], batch_size=2)
        again = encoder.encode(good, **arguments)
    for item, want in zip(again, per_batch_reference(model, processor, good)):
        assert torch.equal(item[: len(want)], want)


def test_read_ahead_keeps_order_raises_in_order_and_stops_its_thread_when_closed():
    def items():
        yield from range(3)
        raise OSError("page 3 is unreadable")

    got = []
    with pytest.raises(OSError, match="page 3 is unreadable"):
        got.extend(read_ahead(items(), ahead=1))
    assert got == [0, 1, 2]
    endless = read_ahead(iter(int, 1), ahead=2)  # 0, 0, 0, ... forever
    assert next(endless) == 0
    endless.close()
    assert not [t for t in threading.enumerate() if t.name == "colquant-read-mteb-batches"]


@pytest.mark.parametrize(("cores", "n_models", "workers"), [(None, 1, 1), (1, 1, 1), (2, 2, 1), (16, 1, 15), (16, 4, 3), (128, 2, 16)])
def test_workers_per_model_on_a_gpu_host_of_any_core_count(monkeypatch, cores, n_models, workers):
    """The core count is the machine's choice: each branch forced (unknown, one core, shared, capped)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert workers_per_model(torch.device("cuda"), n_models) == workers
    assert workers_per_model(torch.device("cpu"), n_models) == 0
