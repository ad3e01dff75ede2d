"""The public encode API on the tiny model: input order kept, length-sorted batches, no-grad results,
pages from PIL images, paths or a datasets column, and clear errors for inputs it cannot take."""

import os
import threading
import time
from pathlib import Path

import numpy as np

import pytest
import torch
from PIL import Image

import colquant
from colquant.retriever import encode

QUERIES = ["short", "a much longer query about the revenue of Norbright Labs in 2019", "capex", "headcount at year end"]


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    """Pages of different sizes, so visual-token counts (and sorting) differ."""
    rng = np.random.default_rng(0)
    sizes = [(96, 128), (160, 224), (64, 64), (128, 160)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_queries_come_back_in_input_order_and_match_one_at_a_time(tiny_model):
    model, _ = tiny_model
    batched = model.encode_queries(QUERIES, batch_size=2)
    assert [q.shape for q in batched] == [(len(text) + 10, 320) for text in QUERIES]  # byte tokenizer + 10
    single = [model.encode_queries([text], batch_size=1)[0] for text in QUERIES]
    for b, s in zip(batched, single):
        torch.testing.assert_close(b, s, atol=2e-2, rtol=0)


def test_batches_are_sorted_by_length(tiny_model, monkeypatch):
    model, processor = tiny_model
    seen: list[list[int]] = []
    process = processor.process_queries
    monkeypatch.setattr(processor, "process_queries", lambda texts: seen.append([len(t) for t in texts]) or process(texts))
    model.encode_queries(["a" * 5, "b" * 50, "c" * 6, "d" * 49], batch_size=2)
    assert seen == [[50, 49], [6, 5]]


def test_results_are_plain_no_grad_cpu_float32_tensors(tiny_model):
    model, _ = tiny_model
    for tensor in model.encode_queries(QUERIES[:2]):
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert not tensor.requires_grad and not tensor.is_inference()
        tensor.mul_(1.0)  # usable in place, as a user's own tensor


def test_padded_output_matches_the_list(tiny_model):
    model, _ = tiny_model
    items = model.encode_queries(QUERIES, batch_size=3)
    padded, mask = model.encode_queries(QUERIES, batch_size=3, padded=True)
    assert padded.shape == (len(QUERIES), max(len(q) for q in items), 320)
    assert mask.sum(dim=1).tolist() == [len(q) for q in items]
    for row, row_mask, item in zip(padded, mask, items):
        torch.testing.assert_close(row[row_mask], item)
        assert not row[~row_mask].any()


def test_pages_from_pil_paths_and_a_datasets_column_agree(tiny_model, pages, tmp_path: Path):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    model, processor = tiny_model
    from_pil = model.encode_pages(pages, batch_size=3)
    expected_tokens = [processor.visual_tokens(page) for page in pages]
    assert [p.shape[0] - t for p, t in zip(from_pil, expected_tokens)] == [from_pil[0].shape[0] - expected_tokens[0]] * 4
    paths = []
    for index, page in enumerate(pages):
        paths.append(tmp_path / f"page{index}.png")
        page.save(paths[-1])
    from_paths = model.encode_pages([str(p) for p in paths], batch_size=3)
    column = Dataset.from_dict({"image": [str(p) for p in paths]}).cast_column("image", ImageFeature())["image"]
    from_column = model.encode_pages(column, batch_size=3)
    raw = Dataset.from_dict({"image": [str(p) for p in paths]}).cast_column("image", ImageFeature(decode=False))
    from_raw = model.encode_pages(raw["image"], batch_size=3)
    for reference, *others in zip(from_pil, from_paths, from_column, from_raw):
        for other in others:
            torch.testing.assert_close(other, reference)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_page_pipeline_gives_the_same_results_in_the_same_order_with_workers(tiny_model, pages, num_workers):
    """Worker processes prepare batches ahead of the model; the results equal a plain loop that
    processes and encodes one page at a time, in input order."""
    model, processor = tiny_model
    piped = encode.encode_pages(model, pages, batch_size=2, num_workers=num_workers)
    for page, result in zip(pages, piped):
        with torch.inference_mode():
            batch = processor.process_images([page])
            expected = model(**batch).embeddings[0][batch["attention_mask"][0].bool()].float()
        torch.testing.assert_close(result, expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pages_prepared_one_by_one_join_into_the_processors_batch(tiny_model, pages, num_workers):
    """Pages of different sizes (so prompts pad differently), prepared apart and joined, equal the
    processor's own batch of them, batch by batch in order (pixels in the model's dtype)."""
    model, processor = tiny_model
    batches = [[3], [0, 1, 2]]
    with encode.PagePipeline.for_model(model, num_workers=num_workers) as pipeline:
        joined = list(pipeline.prepared(pages, batches))
    for batch, got in zip(batches, joined):
        expected = processor.process_images([pages[i] for i in batch])
        expected["pixel_values"] = expected["pixel_values"].to(torch.bfloat16)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key


def test_pixels_cast_in_the_worker_give_the_same_embeddings(tiny_model, pages):
    """Workers cast pixels to the vision tower's dtype (half the bytes of float32 to move); the
    tower's first step is that same cast, so embeddings are bit-identical to float32 pixels'."""
    model, processor = tiny_model
    assert encode.pixel_dtype(model) == torch.bfloat16
    prepared = encode.PageWorker(processor, encode.pixel_dtype(model)).prepare(pages[0])
    assert prepared["pixel_values"].dtype == torch.bfloat16
    for page, result in zip(pages, encode.encode_pages(model, pages, batch_size=1)):
        with torch.inference_mode():
            batch = processor.process_images([page])
            assert batch["pixel_values"].dtype == torch.float32
            expected = model(**batch).embeddings[0][batch["attention_mask"][0].bool()].float()
        assert torch.equal(result, expected)


def test_a_kept_pipeline_reuses_its_workers_across_calls(tiny_model, pages):
    """Calls through one pipeline use the same worker processes, for pages they were started with
    and for new ones, and give what the worker-less path gives."""
    import multiprocessing

    model, _ = tiny_model
    rng = np.random.default_rng(1)
    more = [Image.fromarray(rng.integers(0, 255, (112, 96, 3), dtype=np.uint8)) for _ in range(3)]
    calls = [pages, pages[::-1] + more]
    expected = [encode.encode_pages(model, call, batch_size=2, num_workers=0) for call in calls]
    with encode.PagePipeline.for_model(model, num_workers=2) as pipeline:
        first = encode.encode_pages(model, calls[0], batch_size=2, pipeline=pipeline)
        workers = set(multiprocessing.active_children())
        second = encode.encode_pages(model, calls[1], batch_size=2, pipeline=pipeline)
        assert len(workers) >= 2 and set(multiprocessing.active_children()) == workers
        # the pages the workers were forked with are named by position; only the new ones are sent
        assert sorted(kind for kind, _ in pipeline.feed.items) == ["held"] * len(pages) + ["sent"] * len(more)
    assert not workers & set(multiprocessing.active_children())  # closed: its workers are gone
    for got, want in zip(first + second, expected[0] + expected[1]):
        assert torch.equal(got, want)


def test_a_page_refused_in_a_worker_raises_and_the_pipeline_serves_the_next_call(tiny_model, pages):
    """A worker's error reaches the caller with the processor's message; the kept workers survive it."""
    model, _ = tiny_model
    sliver = Image.new("RGB", (402, 2))  # aspect ratio 201: Qwen's resizing refuses it
    with encode.PagePipeline.for_model(model, num_workers=2) as pipeline:
        with pytest.raises(ValueError, match="aspect ratio of 201"):
            encode.encode_pages(model, pages + [sliver], batch_size=2, pipeline=pipeline)
        assert not joining_threads()  # raised through the joining thread, which ended with the call
        again = encode.encode_pages(model, pages[:2], batch_size=2, pipeline=pipeline)
    with pytest.raises(ValueError, match="aspect ratio of 201"):  # prepared in the joining thread itself
        encode.encode_pages(model, pages + [sliver], batch_size=2, num_workers=0)
    for got, want in zip(again, encode.encode_pages(model, pages[:2], batch_size=2, num_workers=0)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_next_batch_is_joined_off_the_main_thread_before_this_one_is_read_back(tiny_model, pages, monkeypatch,
                                                                                   num_workers):
    """The overlap, structurally: batch i+1's pages are joined (the host's work) by another thread,
    and joined and launched before batch i's embeddings are read back (the wait for the device)."""
    model, _ = tiny_model
    joined_by: list[threading.Thread] = []
    joined_when_read: list[int] = []
    join, read_back = encode.JoinPages.__call__, encode._read_back
    monkeypatch.setattr(encode.JoinPages, "__call__",
                        lambda self, batch: joined_by.append(threading.current_thread()) or join(self, batch))
    monkeypatch.setattr(encode, "_read_back",
                        lambda batch, results: joined_when_read.append(len(joined_by)) or read_back(batch, results))
    encode.encode_pages(model, pages, batch_size=1, num_workers=num_workers)
    assert len(joined_by) == len(pages) and threading.main_thread() not in joined_by
    assert all(joined >= min(i + 2, len(pages)) for i, joined in enumerate(joined_when_read)), joined_when_read
    assert not joining_threads()  # stopped with the call


def joining_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "colquant-join-pages"]


def test_closing_a_pipeline_with_batches_queued_stops_its_thread_and_workers(tiny_model, pages):
    """Closing while the joining thread has batches queued (and workers pages ahead) ends both,
    without hanging; the unfinished batches then raise instead of waiting forever."""
    import multiprocessing

    model, _ = tiny_model
    pipeline = encode.PagePipeline.for_model(model, num_workers=2)
    batches = pipeline.prepared(pages, [[0], [1], [2], [3]])
    next(batches)
    queued = pipeline.joiner.queue
    for _ in range(600):  # the thread fills the queue (2 batches ahead) while this one holds batch 0
        if queued.full():
            break
        time.sleep(0.05)
    assert queued.full()
    workers = set(multiprocessing.active_children())
    assert workers
    pipeline.close()
    assert not joining_threads() and not workers & set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="the PagePipeline was closed"):
        next(batches)


def test_default_workers_only_on_a_gpu():
    assert encode.default_workers(torch.device("cpu")) == 0
    assert 0 <= encode.default_workers(torch.device("cuda")) <= encode.MAX_DEFAULT_WORKERS


@pytest.mark.parametrize(("cores", "workers"), [(None, 0), (1, 0), (2, 1), (8, 7), (128, 16)])
def test_default_workers_on_a_gpu_host_of_any_core_count(monkeypatch, cores, workers):
    """The core count is the machine's choice: each branch forced (unknown, one core, few, many)."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert encode.default_workers(torch.device("cuda")) == workers
    assert encode.default_workers(torch.device("cpu")) == 0


def test_processor_can_be_passed_when_none_is_attached(tiny_model):
    model, processor = tiny_model
    bare = colquant.ColQwen3(model.config).eval()
    with pytest.raises(ValueError, match="no processor attached"):
        encode.encode_queries(bare, ["q"])
    assert encode.encode_queries(bare, ["q"], processor=processor)[0].shape == (11, 320)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.encode_queries("one string"), TypeError, "wrap it as"),
        (lambda m: m.encode_queries(["ok", 3]), TypeError, r"texts\[1\] is a int"),
        (lambda m: m.encode_queries(["ok"], batch_size=0), ValueError, "batch_size must be >= 1"),
        (lambda m: m.encode_pages([42]), TypeError, "page 0 is a int"),
        (lambda m: m.encode_pages(["/nonexistent/page.png"]), FileNotFoundError, "page 0: no image file"),
        (lambda m: m.encode_queries([], padded=True), ValueError, "nothing to pad"),
        (lambda m: m.encode_pages([], num_workers=-1), ValueError, "num_workers must be >= 0"),
        (lambda m: encode.PagePipeline(m.processor, -1, pin=False), ValueError, "num_workers must be >= 0"),
        (lambda m: encode.PagePipeline(m.processor, 1, pin=False, ahead_batches=0), ValueError,
         "ahead_batches must be >= 1"),
        (lambda m: m.encode_pages([], pipeline=encode.PagePipeline.for_model(m), num_workers=2), ValueError,
         "give num_workers and processor to"),
        (lambda m: m.encode_pages([], pipeline=encode.PagePipeline(m.processor, 0, pin=False,
                                                                   pixel_dtype=torch.float16)),
         ValueError, "casts pixels to torch.float16, but the model's vision tower takes torch.bfloat16"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(tiny_model, call, error, message):
    model, _ = tiny_model
    with pytest.raises(error, match=message):
        call(model)


@pytest.mark.parametrize("as_one", [str, Path, Image.open, lambda path: path.read_bytes(), lambda path: {"path": str(path)}])
def test_one_page_not_in_a_list_is_refused(tiny_model, pages, tmp_path, as_one):
    """A path was iterated character by character ("page 0: no image file at /"), a PIL image or a
    Path raised "not iterable", bytes were read as integers and a dict by its keys."""
    model, _ = tiny_model
    path = tmp_path / "page.png"
    pages[0].save(path)
    with pytest.raises(TypeError, match=r"images must be a list of pages, got one page \(\w+\): wrap it as \[page\]"):
        model.encode_pages(as_one(path))


def test_one_query_as_bytes_is_refused_as_one_string_is(tiny_model):
    """Its bytes were iterated as integers ("texts[0] is a int")."""
    model, _ = tiny_model
    with pytest.raises(TypeError, match=r"got one bytes: wrap it as \[text\]"):
        model.encode_queries(b"what was the 2019 revenue?")


@pytest.mark.parametrize("option, value, error, message", [
    ("padded", "no", TypeError, "padded='no' is not a boolean: pass True or False"),
    ("show_progress_bar", "no", TypeError, "show_progress_bar='no' is not a boolean"),
    ("show_progress_bar", None, TypeError, "show_progress_bar=None is not a boolean"),
    ("batch_size", True, TypeError, r"batch_size must be an int >= 1, got True \(bool\)"),
    ("batch_size", 2.5, TypeError, r"batch_size must be an int >= 1, got 2.5 \(float\)"),
    ("batch_size", "8", TypeError, "batch_size must be an int >= 1, got '8'"),
])
def test_options_of_the_wrong_type_are_refused_not_read_by_truthiness(tiny_model, pages, option, value, error,
                                                                      message):
    """`padded="no"` returned the padded tuple and `batch_size=True` batched by one; a float or a
    string batch size failed inside with "cannot be interpreted as an integer"."""
    model, _ = tiny_model
    with pytest.raises(error, match=message):
        model.encode_queries(["q"], **{option: value})
    with pytest.raises(error, match=message):
        model.encode_pages(pages[:1], **{option: value})
    with pytest.raises(TypeError, match="num_workers must be an int >= 0, got True"):
        model.encode_pages(pages[:1], num_workers=True)


def test_load_defaults_to_the_gpu_when_present(tiny_path):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = colquant.load(tiny_path, accelerate=False)  # device="auto" is the default
    assert encode.model_device(model).type == expected
    assert model.processor is processor
