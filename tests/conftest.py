"""Shared fixtures: the embedded tiny model, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def auto_round_scratch(tmp_path_factory: pytest.TempPathFactory):
    """Tests that call auto-round directly (not through the pipeline, which points it under the output
    root) keep its scratch directory out of the working tree."""
    from colquant.quantization import scratch_dir

    with scratch_dir(tmp_path_factory.mktemp("ar_work_space")):
        yield


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from colquant import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_path: Path):
    import colquant

    return colquant.load(tiny_path)


@pytest.fixture(scope="module")
def small_model(tiny_path: Path):
    """The tiny model with a 64-visual-token budget, so pages encode in milliseconds (one per module)."""
    import colquant

    return colquant.load(tiny_path, max_num_visual_tokens=64)


@pytest.fixture(scope="session")
def tiny_w4a16_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An auto-round W4A16 variant of the tiny model (2 iterations), saved as ColQuant saves variants."""
    import colquant
    from colquant.calibration import build_text_calibration
    from colquant.corpus import build_corpus
    from colquant.quantization import (
        QuantizationSettings,
        decoder_linear_names,
        quantization_metadata,
        quantize_language_model,
        save_quantized_model,
    )

    settings = QuantizationSettings(method="autoround", bits=4, group_size=128, sym=True, iters=2, batch_size=2, seed=0)
    model, processor = colquant.load(tiny_path)
    corpus = build_corpus(tmp_path_factory.mktemp("w4a16-corpus"), n_pages=4, n_queries=4, progress=False)
    calibration = build_text_calibration(
        processor.tokenizer, source="pile-10k", seqlen=64, nsamples=2, seed=0, offline_fallback="embedded", corpus=corpus
    )
    autoround, cost = quantize_language_model(model, processor, calibration, settings)
    metadata = quantization_metadata(
        "tiny-w4a16", settings, calibration, cost, base_model=str(tiny_path), base_model_revision="local build", random_weights=True,
        quantized_layers=decoder_linear_names(model.language_model),
    )
    out = tmp_path_factory.mktemp("w4a16") / "tiny-w4a16"
    return save_quantized_model(
        model, processor, autoround, out, metadata=metadata, export_formats=("auto_round", "auto_gptq")
    )
