"""The files beside a checkpoint's weights: the weights' fingerprint, the size they take on disk."""

import os

from colquant.retriever.checkpoint_files import EXPORTS_DIR, checkpoint_fingerprint, size_on_disk


def test_checkpoint_fingerprint_follows_content_not_the_model_card(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    first = checkpoint_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("card")
    assert checkpoint_fingerprint(tmp_path) == first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert checkpoint_fingerprint(tmp_path) != first


def test_checkpoint_fingerprint_is_the_weights_content_not_their_file_dates(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    weights = model / "model.safetensors"
    weights.write_bytes(b"weights-1")
    first = checkpoint_fingerprint(model)
    os.utime(weights, ns=(1, 1))  # touched
    assert checkpoint_fingerprint(model) == first
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in model.iterdir():  # copied (or downloaded again): new files, new dates, same bytes
        (copy / file.name).write_bytes(file.read_bytes())
    assert checkpoint_fingerprint(copy) == first
    stamp = weights.stat().st_mtime_ns
    weights.write_bytes(b"weights-2")  # same size, other bytes, the old date put back
    os.utime(weights, ns=(stamp, stamp))
    assert checkpoint_fingerprint(model) != first


def test_size_on_disk_counts_the_weights_not_the_exports_wherever_the_checkpoint_lives(tmp_path):
    checkpoint = tmp_path / EXPORTS_DIR / "w4a16"  # kept under a folder that happens to be named like the exports
    (checkpoint / EXPORTS_DIR / "auto_gptq").mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"0" * 10)
    (checkpoint / EXPORTS_DIR / "auto_gptq" / "model.safetensors").write_bytes(b"0" * 7)
    (checkpoint / "config.json").write_text("{}")
    assert size_on_disk(checkpoint) == 10
