"""The index readers verify what they read: a manifest, or a shard, changed after the index was
finished is refused with the file named and the fix, and the fix (a rerun) works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from colquant.inference import index as idx
from colquant.inference.distributed import encode_corpus
from colquant.inference.index import IncompleteIndexError, IndexMismatchError, load_index

N_PAGES, BUDGET = 3, 16


def encode_into(out: Path, source: Path, model: Path) -> Path:
    return encode_corpus(model, source, out, batch_size=1, shard_size=1, max_num_visual_tokens=BUDGET,
                         show_progress_bar=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("index-pages")
    for number in range(N_PAGES):
        Image.new("RGB", (64, 64), (80 * number, 30, 200)).save(folder / f"page-{number}.png")
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, source: Path, tiny_path: Path) -> Path:
    """One shard per page."""
    return encode_into(tmp_path_factory.mktemp("index") / "index", source, tiny_path)


@pytest.fixture
def index(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished index to change."""
    return Path(shutil.copytree(finished, tmp_path / "index"))


def edit_manifest(out: Path, **changes) -> None:
    manifest = json.loads((out / idx.MANIFEST).read_text())
    (out / idx.MANIFEST).write_text(json.dumps(manifest | changes))


def resave_shard(out: Path, shard: int, change) -> None:
    """Rewrite a shard's tensors with `change` (header metadata kept), as an editing user would."""
    path = idx.shard_path(out, shard)
    metadata = idx.shard_header(path)
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_a_finished_index_reads_back_verified(index):
    loaded = load_index(index)
    assert loaded.ids == [f"page-{n}.png" for n in range(N_PAGES)]
    assert len(loaded.manifest["shard_sha256"]) == N_PAGES


def test_a_lowered_shard_count_is_refused_not_read_as_fewer_pages(index, source, tiny_path):
    edit_manifest(index, shards=2)
    with pytest.raises(IncompleteIndexError, match=r"manifest.json was edited: 3 pages in shards of 1 make 3 shards, "
                                                   r"but it lists 2 shards.*rerun encode-corpus"):
        load_index(index)
    digests = json.loads((index / idx.MANIFEST).read_text())["shard_sha256"]
    edit_manifest(index, shards=2, pages=2, shard_sha256=digests[:2])  # consistent, but not the index's pages
    with pytest.raises(IncompleteIndexError, match=r"its shards hold 2 pages .* the manifest 2 pages \(ids hash"):
        list(idx.iter_shards(index))
    encode_into(index, source, tiny_path)  # the advised fix
    assert len(load_index(index).ids) == N_PAGES


def test_a_shard_copied_from_another_models_index_is_refused(index, source, tiny_path, tmp_path):
    import colquant.retriever.tiny

    other = encode_into(tmp_path / "other-index", source, colquant.tiny.build(tmp_path / "other-model", seed=1))
    shutil.copyfile(idx.shard_path(other, 1), idx.shard_path(index, 1))
    with pytest.raises(IndexMismatchError, match=r"shard-000001.safetensors holds embeddings of another model .* "
                                                  "delete it and rerun"):
        load_index(index)
    with pytest.raises(IndexMismatchError, match="shard-000001.safetensors holds embeddings of another model"):
        encode_into(index, source, tiny_path)  # a resuming run refuses it too
    idx.shard_path(index, 1).unlink()
    encode_into(index, source, tiny_path)
    assert load_index(index).ids == [f"page-{n}.png" for n in range(N_PAGES)]


def test_a_shard_of_the_same_model_from_another_index_is_refused(index, source, tiny_path, tmp_path):
    changed = Path(shutil.copytree(source, tmp_path / "changed"))
    Image.new("RGB", (64, 64), "black").save(changed / "page-1.png")
    other = encode_into(tmp_path / "other-index", changed, tiny_path)
    shutil.copyfile(idx.shard_path(other, 1), idx.shard_path(index, 1))  # same key, ids and shape
    with pytest.raises(IncompleteIndexError, match=r"shard-000001.safetensors does not match the index: its pages or "
                                                   "embeddings are not those the index was finished with"):
        load_index(index)


def test_edited_offsets_are_refused_and_a_rerun_encodes_the_shard_again(index, finished, source, tiny_path):
    def cut_elsewhere(tensors):
        tensors["offsets"][1] -= 3

    resave_shard(index, 0, cut_elsewhere)
    with pytest.raises(IncompleteIndexError, match=r"shard-000000.safetensors does not match the index: its tensors "
                                                   "changed after it was written"):
        load_index(index)
    encode_into(index, source, tiny_path)
    assert all(torch.equal(a, b) for a, b in zip(load_index(index).embeddings, load_index(finished).embeddings))


def test_nan_rows_written_into_a_shard_are_refused(index):
    def poison(tensors):
        tensors["embeddings"][0] = float("nan")

    resave_shard(index, 2, poison)
    with pytest.raises(IncompleteIndexError, match="shard-000002.safetensors does not match the index"):
        list(idx.iter_shards(index))


def test_a_shard_moved_to_another_place_is_refused(index):
    shutil.copyfile(idx.shard_path(index, 0), idx.shard_path(index, 1))
    with pytest.raises(IncompleteIndexError, match="shard-000001.safetensors does not match the index: its header "
                                                   "says it is shard 0"):
        load_index(index)


def test_an_index_of_another_format_is_refused_with_the_fix(index, source, tiny_path):
    edit_manifest(index, format=1)
    for read in (load_index, lambda out: encode_into(out, source, tiny_path)):
        with pytest.raises(IndexMismatchError, match="format 1 .* encode the corpus again into a new directory"):
            read(index)


def test_an_index_whose_manifest_was_lost_is_rebuilt_from_its_shards_as_advised(index, source, tiny_path):
    (index / idx.MANIFEST).unlink()
    with pytest.raises(IncompleteIndexError, match="no manifest.json.*if its manifest was lost, rerun encode-corpus"):
        load_index(index)
    kept = [idx.shard_path(index, shard).stat().st_mtime_ns for shard in range(N_PAGES)]
    encode_into(index, source, tiny_path)
    assert [idx.shard_path(index, shard).stat().st_mtime_ns for shard in range(N_PAGES)] == kept
    assert len(load_index(index).ids) == N_PAGES


@pytest.mark.parametrize("content", ["[1, 2]", "null", "3"])
def test_a_manifest_that_is_not_a_json_object_is_refused_with_the_fix(index, source, tiny_path, content):
    """A manifest holding a list or null failed with AttributeError ('list' object has no attribute 'get')."""
    (index / idx.MANIFEST).write_text(content)
    for read in (load_index, lambda out: encode_into(out, source, tiny_path)):
        with pytest.raises(IncompleteIndexError, match="manifest.json is not a JSON object.*delete it and rerun "
                                                       "encode-corpus"):
            read(index)
    (index / idx.MANIFEST).unlink()
    encode_into(index, source, tiny_path)
    assert len(load_index(index).ids) == N_PAGES
