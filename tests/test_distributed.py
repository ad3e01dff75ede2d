"""encode-corpus: the index it writes on one process and on two gloo ranks, resumption, refusals,
page sources (image folder, PDF folder, saved dataset), and the reader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import colquant
from colquant.__main__ import main
from colquant.inference import distributed, page_sources
from colquant.inference import index as idx
from colquant.inference.distributed import CrossRankProgress, Worker, encode_corpus
from colquant.inference.index import IncompleteIndexError, IndexMismatchError, load_index
from colquant.inference.page_sources import SourceError
from colquant.retriever import encode

LIB = Path(__file__).resolve().parents[1] / "lib"
N_PAGES, SHARD_SIZE, BUDGET = 5, 2, 64
SIZES = [(64, 96), (96, 64), (128, 96), (64, 64), (96, 128)]  # pages of different token counts


def make_pages(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for number, size in enumerate(SIZES):
        Image.new("RGB", size, (40 * number, 120, 255 - 40 * number)).save(folder / f"page-{number}.png")
    return folder


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pages(tmp_path_factory.mktemp("corpus") / "pages")


def encode_into(out: Path, source: Path, model: Path, **options) -> Path:
    settings = {"batch_size": 2, "shard_size": SHARD_SIZE, "max_num_visual_tokens": BUDGET,
                "show_progress_bar": False} | options
    return encode_corpus(model, source, out, **settings)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, pages: Path, tiny_path: Path) -> idx.CorpusIndex:
    """The index one process writes (N=1): what every other way of writing it must equal."""
    return load_index(encode_into(tmp_path_factory.mktemp("reference") / "index", pages, tiny_path))


def assert_same_index(index: idx.CorpusIndex, expected: idx.CorpusIndex) -> None:
    assert index.ids == expected.ids
    assert len(index.embeddings) == len(expected.embeddings)
    assert all(torch.equal(a, b) for a, b in zip(index.embeddings, expected.embeddings))


# --------------------------------------------------------------------------------------------
# What is written


def test_the_index_holds_every_page_in_source_order_as_the_model_encodes_it(reference, pages, tiny_path):
    model, processor = colquant.load(tiny_path, max_num_visual_tokens=BUDGET)
    assert reference.ids == [f"page-{n}.png" for n in range(N_PAGES)]
    direct = []
    for shard in range(idx.shard_count(N_PAGES, SHARD_SIZE)):  # encoded shard by shard, as the index is
        files = [pages / reference.ids[i] for i in idx.shard_pages(shard, N_PAGES, SHARD_SIZE)]
        direct += model.encode_pages(files, batch_size=2)
    assert all(torch.equal(stored.float(), item) for stored, item in zip(reference.embeddings, direct))
    assert {item.dtype for item in reference.embeddings} == {torch.bfloat16}  # the model's dtype: lossless
    manifest = reference.manifest
    assert manifest["complete"] and manifest["pages"] == N_PAGES and manifest["shards"] == 3
    assert manifest["tokens"] == sum(len(item) for item in reference.embeddings)
    assert manifest["processor"]["max_num_visual_tokens"] == BUDGET and manifest["dtype"] == "bfloat16"
    queries = model.encode_queries(["what is on the page?"])
    assert colquant.score(queries, reference.embeddings).shape == (1, N_PAGES)


def test_two_gloo_ranks_under_torchrun_write_the_index_one_process_writes(reference, pages, tiny_path, tmp_path):
    out = tmp_path / "index"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "colquant", "encode-corpus", str(tiny_path), str(pages), str(out), "--batch-size", "2",
               "--shard-size", str(SHARD_SIZE), "--max-num-visual-tokens", str(BUDGET), "--no-progress"]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")]),
                        "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "rank 0/2: encoding 2 of its 2 shards" in finished.stderr  # shards 0, 2
    assert "rank 1/2: encoding 1 of its 1 shards" in finished.stderr  # shard 1
    assert_same_index(load_index(out), reference)
    assert not (out / distributed.PROGRESS_DIR).exists()


def test_progress_counts_pages_of_every_rank(tmp_path):
    ranks = [CrossRankProgress(tmp_path, Worker(rank, 2, torch.device("cpu")), total=9, show=False) for rank in (0, 1)]
    ranks[0].add(2)
    ranks[1].add(3)
    ranks[1].add(4)
    assert ranks[0].total_done() == 9
    for progress in ranks:
        progress.close()


def test_the_multicast_switches_are_off_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")
    with distributed.worker_group("cpu") as worker:
        assert (worker.rank, worker.world_size) == (0, 1)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    assert os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "0"


# --------------------------------------------------------------------------------------------
# Resuming


def test_a_rerun_keeps_finished_shards_and_redoes_cut_short_and_missing_ones(reference, pages, tiny_path, tmp_path):
    out = encode_into(tmp_path / "index", pages, tiny_path)
    kept = idx.shard_path(out, 0).stat().st_mtime_ns
    cut = idx.shard_path(out, 1)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a write cut short (not through write_shard)
    idx.shard_path(out, 2).unlink()
    encode_into(out, pages, tiny_path)
    assert idx.shard_path(out, 0).stat().st_mtime_ns == kept
    assert_same_index(load_index(out), reference)


def test_a_killed_run_loses_only_the_shard_it_was_encoding(reference, pages, tiny_path, tmp_path, monkeypatch):
    out = tmp_path / "index"
    real_encode_pages = encode.encode_pages
    encoded: list[int] = []

    def killed_at_the_second_shard(model, images, **options):
        if len(encoded) == 1:
            raise KeyboardInterrupt  # what a kill looks like from inside the process
        encoded.append(len(images))
        return real_encode_pages(model, images, **options)

    monkeypatch.setattr(encode, "encode_pages", killed_at_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode_into(out, pages, tiny_path)
    assert idx.shard_path(out, 0).exists() and not idx.shard_path(out, 1).exists()
    with pytest.raises(IncompleteIndexError, match="not finished"):
        load_index(out)
    encoded.clear()
    monkeypatch.setattr(encode, "encode_pages", lambda model, images, **options:
                        encoded.append(len(images)) or real_encode_pages(model, images, **options))
    encode_into(out, pages, tiny_path)
    assert encoded == [2, 1]  # shards 1 and 2 only
    assert_same_index(load_index(out), reference)


# --------------------------------------------------------------------------------------------
# Refusals


def test_another_model_or_visual_token_budget_into_the_same_directory_is_refused(pages, tiny_path, tmp_path, capsys):
    out = encode_into(tmp_path / "index", pages, tiny_path)
    other = colquant.tiny.build(tmp_path / "other-model", seed=1)
    with pytest.raises(IndexMismatchError, match="holds embeddings of .* not of .*another directory"):
        encode_into(out, pages, other)
    with pytest.raises(IndexMismatchError, match="'max_num_visual_tokens': 64"):
        encode_into(out, pages, tiny_path, max_num_visual_tokens=128)
    assert main(["encode-corpus", str(other), str(pages), str(out), "--shard-size", str(SHARD_SIZE),
                 "--max-num-visual-tokens", str(BUDGET), "--no-progress"]) == 2
    assert "holds embeddings of" in capsys.readouterr().err
    assert json.loads((out / idx.MANIFEST).read_text())["complete"]  # the index is left as it was


def test_another_corpus_or_shard_size_into_the_same_directory_is_refused(pages, tiny_path, tmp_path):
    out = encode_into(tmp_path / "index", pages, tiny_path)
    with pytest.raises(IndexMismatchError, match="another source or shard layout"):
        encode_into(out, pages, tiny_path, shard_size=3)
    fewer = make_pages(tmp_path / "fewer")
    (fewer / "page-4.png").unlink()
    with pytest.raises(IndexMismatchError, match="another source"):
        encode_into(out, fewer, tiny_path)
    with pytest.raises(IndexMismatchError, match="another source"):
        encode_into(out, pages, tiny_path, dpi=72)  # PDF pages would be rendered otherwise


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root / "absent", "no page source at"),
    (lambda root: root, "holds no page images"),
    (lambda root: (root / "notes.txt").write_text("no pages here") and root, r"holds no page images .*1 other files"),
])
def test_a_source_without_pages_is_refused_before_anything_is_written(make, message, tiny_path, tmp_path):
    root = tmp_path / "source"
    root.mkdir()
    with pytest.raises(SourceError, match=message):
        encode_into(tmp_path / "index", make(root), tiny_path)
    assert not (tmp_path / "index").exists()


def test_files_that_are_not_images_are_all_named_before_anything_is_encoded(tiny_path, tmp_path):
    source = make_pages(tmp_path / "pages")
    (source / "page-1.png").write_bytes(b"not a png")
    (source / "page-3.png").write_bytes(b"nor this")
    with pytest.raises(SourceError, match=r"2 files .* cannot be read as pages: .*page-1.png.*page-3.png"):
        encode_into(tmp_path / "index", source, tiny_path)
    assert not idx.shard_path(tmp_path / "index", 0).exists()


def truncated(page: Path) -> None:
    """A page file cut short: its header reads, its pixels do not."""
    page.write_bytes(page.read_bytes()[:60])


def test_after_replacing_or_removing_an_unreadable_page_as_advised_the_rerun_works(reference, tiny_path, tmp_path):
    source = make_pages(tmp_path / "pages")
    truncated(source / "page-3.png")
    out = tmp_path / "index"
    with pytest.raises(SourceError, match=r"page 'page-3.png' \(.*page-3.png\) cannot be read as an image.*replace or "
                                          "remove the file and rerun"):
        encode_into(out, source, tiny_path)
    kept = idx.shard_path(out, 0).stat().st_mtime_ns  # shard 0 (pages 0, 1) was finished
    (source / "page-3.png").unlink()
    assert load_index(encode_into(out, source, tiny_path)).ids == ["page-0.png", "page-1.png", "page-2.png", "page-4.png"]
    make_pages(source)  # page-3.png replaced by a readable one
    assert_same_index(load_index(encode_into(out, source, tiny_path)), reference)
    assert idx.shard_path(out, 0).stat().st_mtime_ns == kept


def test_a_page_whose_content_changed_under_the_same_name_is_encoded_again(reference, tiny_path, tmp_path):
    source = make_pages(tmp_path / "pages")
    out = encode_into(tmp_path / "index", source, tiny_path)
    kept = [idx.shard_path(out, shard).stat().st_mtime_ns for shard in (0, 2)]
    Image.new("RGB", SIZES[2], "black").save(source / "page-2.png")  # same name and size, other content
    index = load_index(encode_into(out, source, tiny_path))
    model, _ = colquant.load(tiny_path, max_num_visual_tokens=BUDGET)
    again = model.encode_pages([source / "page-2.png", source / "page-3.png"], batch_size=2)
    assert torch.equal(index.embeddings[2].float(), again[0])
    assert not torch.equal(index.embeddings[2], reference.embeddings[2])
    assert [idx.shard_path(out, shard).stat().st_mtime_ns for shard in (0, 2)] == kept
    (source / "page-4.png").unlink()  # the last shard's only page: its file goes too
    assert load_index(encode_into(out, source, tiny_path)).ids == [f"page-{n}.png" for n in range(4)]
    assert not idx.shard_path(out, 2).exists()


def test_the_same_model_copied_or_touched_keeps_the_finished_shards(pages, tiny_path, tmp_path):
    out = encode_into(tmp_path / "index", pages, tiny_path)
    kept = [path.stat().st_mtime_ns for path in sorted((out / idx.SHARDS_DIR).iterdir())]
    copy = Path(shutil.copytree(tiny_path, tmp_path / "copy"))
    for file in copy.rglob("*"):
        os.utime(file)  # a plain copy or a new download: new dates, same bytes
    encode_into(out, pages, copy)
    assert [path.stat().st_mtime_ns for path in sorted((out / idx.SHARDS_DIR).iterdir())] == kept


def test_a_page_the_model_cannot_take_is_named_by_its_id(tiny_path, tmp_path, capsys):
    source = make_pages(tmp_path / "pages")
    Image.new("RGB", (4000, 12), "white").save(source / "page-3.png")
    assert main(["encode-corpus", str(tiny_path), str(source), str(tmp_path / "index"), "--shard-size", "2",
                 "--max-num-visual-tokens", str(BUDGET), "--no-progress"]) == 2
    assert "page 'page-3.png' is 4000x12 pixels, an aspect ratio of 333" in capsys.readouterr().err


def test_nan_embeddings_are_refused_naming_the_page(pages, tiny_path, tmp_path, monkeypatch):
    real_encode_pages = encode.encode_pages

    def nan_for_the_last_page(model, images, **options):
        embeddings = real_encode_pages(model, images, **options)
        embeddings[-1][0, 0] = float("nan")
        return embeddings

    monkeypatch.setattr(encode, "encode_pages", nan_for_the_last_page)
    with pytest.raises(idx.EmbeddingError, match=r"NaN or infinite embeddings for 1 pages of shard 0: \['page-1.png'\]"):
        encode_into(tmp_path / "index", pages, tiny_path)
    assert not idx.shard_path(tmp_path / "index", 0).exists()


def test_an_unfinished_or_foreign_directory_is_not_read_as_an_index(tmp_path):
    with pytest.raises(IncompleteIndexError, match="not an index written by encode-corpus"):
        load_index(tmp_path)


def test_the_index_reads_shard_by_shard_and_names_a_shard_lost_after_it_was_written(pages, tiny_path, tmp_path):
    out = encode_into(tmp_path / "index", pages, tiny_path)
    assert [ids for ids, _ in idx.iter_shards(out)] == [["page-0.png", "page-1.png"], ["page-2.png", "page-3.png"],
                                                        ["page-4.png"]]
    idx.shard_path(out, 1).unlink()
    with pytest.raises(IncompleteIndexError, match=r"shard-000001.safetensors is missing or corrupt .* rerun encode-corpus"):
        load_index(out)


# --------------------------------------------------------------------------------------------
# Sources


def test_a_saved_dataset_gives_the_pages_of_the_folder_under_its_own_ids(reference, pages, tiny_path, tmp_path):
    import datasets

    files = [str(pages / page_id) for page_id in reference.ids]
    dataset = datasets.Dataset.from_dict({"doc": [f"doc-{n}" for n in range(N_PAGES)], "page": files})
    dataset.cast_column("page", datasets.Image()).save_to_disk(str(tmp_path / "dataset"))
    index = load_index(encode_into(tmp_path / "index", tmp_path / "dataset", tiny_path, id_column="doc"))
    assert index.ids == [f"doc-{n}" for n in range(N_PAGES)]
    assert all(torch.equal(a, b) for a, b in zip(index.embeddings, reference.embeddings))
    with pytest.raises(SourceError, match="no column 'title'"):
        encode_into(tmp_path / "other", tmp_path / "dataset", tiny_path, id_column="title")


def test_a_dataset_repository_split_is_read_through_load_dataset(reference, pages, tiny_path, tmp_path):
    import datasets

    files = [str(pages / page_id) for page_id in reference.ids]
    repository = tmp_path / "repository"
    dataset = datasets.Dataset.from_dict({"corpus-id": reference.ids, "image": files}).cast_column("image", datasets.Image())
    dataset.to_parquet(str(repository / "data" / "test-00000-of-00001.parquet"))  # the hub's file layout
    index = load_index(encode_into(tmp_path / "index", repository, tiny_path, split="test", id_column="corpus-id"))
    assert_same_index(index, reference)
    assert index.manifest["source"]["split"] == "test"


def test_a_dataset_with_several_splits_needs_one_named(tmp_path):
    import datasets

    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict({"x": [1]}) for name in ("test", "train")})
    splits.save_to_disk(str(tmp_path / "dataset"))
    with pytest.raises(SourceError, match=r"splits \['test', 'train'\]: pass --split"):
        page_sources.open_source(tmp_path / "dataset")


def pdf_with_pages(path: Path, count: int) -> Path:
    images = [Image.new("RGB", (200, 260), (60 * n, 90, 200)) for n in range(count)]
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)
    return path


def test_pdf_pages_are_rendered_one_page_each(tmp_path):
    pytest.importorskip("pypdfium2")
    source = tmp_path / "pages"
    source.mkdir()
    pdf_with_pages(source / "report.pdf", 3)
    Image.new("RGB", (64, 64), "white").save(source / "cover.png")
    pages = page_sources.open_source(source, dpi=144)
    assert pages.ids == ["cover.png", "report.pdf#page=1", "report.pdf#page=2", "report.pdf#page=3"]
    rendered = pages.open(2)
    assert rendered.size == (400, 520)  # 200 x 260 points at 144 dpi
    assert rendered.getpixel((200, 260)) == (60, 90, 200)


def test_pdfs_without_the_pdf_extra_name_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # as if not installed
    source = tmp_path / "pages"
    source.mkdir()
    pdf_with_pages(source / "report.pdf", 1)
    with pytest.raises(SourceError, match=r"needs pypdfium2: pip install 'colquant\[pdf\]'"):
        page_sources.open_source(source)


@pytest.mark.parametrize("device, message", [("gpu", "device='gpu' is not a device: pass 'auto'"),
                                             ("cuda", "device='cuda': this machine has no CUDA device")])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(pages, tiny_path, tmp_path, capsys,
                                                                           monkeypatch, device, message):
    """`--device gpu` ended in torch's RuntimeError traceback; `--device cuda` without a GPU in an
    AssertionError, or (now that load checks it) only once the run had started on the index."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["encode-corpus", str(tiny_path), str(pages), str(tmp_path / "index"), "--device", device,
                 "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "index").exists()
