import copy
import json
import os
from pathlib import Path

import pytest
import torch
from auto_round.compressors.utils import block_forward
from PIL import Image

from colquant.quantize.calibration import (
    CalibrationDataError,
    CalibrationSet,
    build_page_calibration,
    build_text_calibration,
    deepstack_replay,
    page_batch,
    page_grid,
    page_prompt_tokens,
)
from colquant.evaluate.corpus import build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), n_pages=8, n_queries=16, progress=False)


@pytest.fixture(scope="module")
def page_set(tiny_model, corpus):
    model, processor = tiny_model
    images = [corpus.image(page.page_id) for page in corpus.pages]
    return build_page_calibration(model, processor, images, seqlen=128, nsamples=2, origins=["t"] * len(images))


def record_layer_inputs(language_model, run) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True)
        for layer in language_model.layers
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def replay_blocks(language_model, item, *, with_deepstack: bool) -> list[torch.Tensor]:
    """What auto-round does: capture block 0's inputs once, then feed each block the previous output."""
    captured = {}

    def grab(_m, args, kwargs):
        captured.update(kwargs, hidden_states=args[0] if args else kwargs["hidden_states"])
        raise StopIteration

    hook = language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with deepstack_replay(language_model):
            inputs = dict(item) if with_deepstack else {k: v for k, v in item.items() if k != "deepstack_residual"}
            try:
                language_model(**inputs)
            except StopIteration:
                pass
    finally:
        hook.remove()
    hidden = captured.pop("hidden_states")
    inputs_seen = [hidden]
    with deepstack_replay(language_model):
        for layer in language_model.layers[:-1]:
            hidden = block_forward(layer, hidden, dict(captured))
            inputs_seen.append(hidden)
    return inputs_seen


@torch.no_grad()
def test_replayed_blocks_see_the_real_inputs_including_deepstack(tiny_model, corpus, page_set):
    """The deepstack trap: with the hooks, block replay reproduces a full forward pass layer by layer."""
    model, processor = tiny_model
    item = page_set.items[0]
    image = corpus.image(corpus.pages[0].page_id)
    grid = page_grid(128, image.height / image.width, page_prompt_tokens(processor))
    full = page_batch(processor, image, grid)
    assert torch.equal(full["input_ids"], item["input_ids"])
    real = record_layer_inputs(model.language_model, lambda: model(**full))
    replayed = replay_blocks(model.language_model, item, with_deepstack=True)
    naive = replay_blocks(model.language_model, item, with_deepstack=False)
    assert len(real) == len(replayed) == len(model.language_model.layers)
    for layer, (expected, got) in enumerate(zip(real, replayed)):
        assert torch.allclose(expected.float(), got.float(), atol=1e-2, rtol=1e-2), f"layer {layer} inputs differ"
    # Without the deepstack residual, layers 1.. (after the first injection) get the wrong inputs.
    assert not torch.allclose(real[1].float(), naive[1].float(), atol=1e-2, rtol=1e-2)


def test_page_samples_share_one_length_within_seqlen(page_set):
    lengths = {int(item["input_ids"].shape[1]) for item in page_set.items}
    assert len(lengths) == 1 and lengths.pop() <= 128
    assert page_set.multimodal and page_set.nsamples == 2


def test_text_source_offline_without_fallback_fails_with_the_fix(tiny_model, corpus):
    _, processor = tiny_model
    with pytest.raises(CalibrationDataError, match="offline_fallback: embedded"):
        build_text_calibration(processor.tokenizer, source="pile-10k", seqlen=64, nsamples=2, seed=0, offline_fallback="none", corpus=corpus)


def test_offline_fallback_is_recorded_not_silent(tiny_model, corpus):
    _, processor = tiny_model
    calibration = build_text_calibration(
        processor.tokenizer, source="pile-10k", seqlen=64, nsamples=3, seed=0, offline_fallback="embedded", corpus=corpus
    )
    assert calibration.source == "pile-10k" and calibration.source_used == "embedded"
    assert calibration.fallback_reason
    assert all(item["input_ids"].shape == (1, 64) for item in calibration.items)
    stats = calibration.statistics()
    assert (stats["tokens"] == 64).all() and stats["main_origin"].str.startswith("embedded:").all()


def test_calibration_set_round_trips(tmp_path, page_set):
    path = page_set.save(tmp_path / "set.safetensors")
    again = CalibrationSet.load(path)
    assert again.source_used == page_set.source_used and again.seqlen == page_set.seqlen
    assert again.origins == page_set.origins and again.fallback_reason == page_set.fallback_reason
    assert [sorted(item) for item in again.items] == [sorted(item) for item in page_set.items]
    assert all(torch.equal(a[key], b[key]) for a, b in zip(page_set.items, again.items) for key in a)
    assert not list(tmp_path.glob("*.partial"))


def test_calibration_set_is_stored_as_safetensors_with_a_json_header(tmp_path, page_set):
    from safetensors import safe_open

    path = page_set.save(tmp_path / "set.safetensors")
    with safe_open(str(path), framework="pt") as file:
        provenance = json.loads(file.metadata()["provenance"])
    assert provenance["source_used"] == page_set.source_used and provenance["samples"] == page_set.nsamples


class _RunsCode:
    """Unpickling this object runs a shell command (what a crafted `.pt` file can do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_cannot_run_code(tmp_path):
    marker, crafted = tmp_path / "pwned", tmp_path / "calibration.pt"
    torch.save({"items": _RunsCode(marker)}, crafted)
    with pytest.raises(CalibrationDataError, match=r"(?s)calibration\.pt is not a calibration set.*unpickling can run code"):
        CalibrationSet.load(crafted)
    assert not marker.exists()


def test_a_truncated_set_is_reported_by_path(tmp_path, page_set):
    path = page_set.save(tmp_path / "set.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CalibrationDataError, match="set.safetensors is not a calibration set.*re-run notebooks/02"):
        CalibrationSet.load(path)


def test_seqlen_too_short_for_a_page_is_rejected():
    with pytest.raises(ValueError, match="leaves no room"):
        page_grid(20, 1.3, 19)


def test_page_batch_keeps_the_processors_image_settings(tiny_model, corpus):
    """Calibration pages go through the checkpoint's own image processor (mean/std here), not the
    default one, and only the visual-token budget changes."""
    _, processor = tiny_model
    image = corpus.image(corpus.pages[0].page_id)
    grid = page_grid(128, image.height / image.width, page_prompt_tokens(processor))
    shifted = copy.deepcopy(processor)
    shifted.image_processor.image_mean = [0.25, 0.25, 0.25]
    default = page_batch(processor, image, grid)["pixel_values"]
    own = page_batch(shifted, image, grid)["pixel_values"]
    assert own.shape == default.shape
    assert not torch.allclose(own, default)


def test_page_batch_follows_the_processors_transparency(tiny_model):
    """A transparent page under `transparency="white"` calibrates as white paper, as it embeds."""
    _, processor = tiny_model
    page = Image.new("RGBA", (256, 256), (0, 0, 0, 0))  # fully transparent, black underneath
    grid = page_grid(128, 1.0, page_prompt_tokens(processor))
    white = copy.deepcopy(processor)
    white.transparency = "white"
    dropped = page_batch(processor, page, grid)["pixel_values"]
    composited = page_batch(white, page, grid)["pixel_values"]
    assert torch.allclose(dropped, torch.full_like(dropped, -1.0))  # black after (x - 0.5) / 0.5
    assert torch.allclose(composited, torch.ones_like(composited))  # white
