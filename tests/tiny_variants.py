"""The tiny model's auto-round W4A16 variant, built as ColQuant builds variants, under a forced CPU branch.

auto-round asks the processor whether it computes in bfloat16 (`CpuInfo().bf16`: AVX512-BF16/AMX) and
takes another code path where it does not. CI runs on whatever CPU it gets, so the tests force each
branch instead of trusting the machine: `forced_cpu_bf16(False)` is an AVX2-only laptop on any CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from auto_round.utils.device_manager import CpuARDevice

W4A16_ITERS = 2


@contextmanager
def forced_cpu_bf16(supported: bool) -> Iterator[None]:
    """auto-round sees a CPU with (True) or without (False) bfloat16 support, whatever this one has."""
    with mock.patch.object(CpuARDevice, "supports_bf16", lambda self: supported):
        yield


def build_tiny_w4a16(tiny_path: Path, workdir: Path, *, cpu_bf16: bool):
    """(in-memory quantized model, processor, saved variant dir) with auto-round's CPU branch forced."""
    import colquant
    from colquant.evaluate.corpus import build_corpus
    from colquant.quantize.calibration import build_text_calibration
    from colquant.quantize.autoround import (
        QuantizationSettings,
        decoder_linear_names,
        quantization_metadata,
        quantize_language_model,
        save_quantized_model,
    )

    settings = QuantizationSettings(method="autoround", bits=4, group_size=128, sym=True, iters=W4A16_ITERS, batch_size=2, seed=0)
    model, processor = colquant.load(tiny_path)
    corpus = build_corpus(workdir / "corpus", n_pages=4, n_queries=4, progress=False)
    calibration = build_text_calibration(
        processor.tokenizer, source="pile-10k", seqlen=64, nsamples=2, seed=0, offline_fallback="embedded", corpus=corpus
    )
    with forced_cpu_bf16(cpu_bf16):
        autoround, cost = quantize_language_model(model, processor, calibration, settings)
    metadata = quantization_metadata(
        "tiny-w4a16", settings, calibration, cost, base_model=str(tiny_path), base_model_revision="local build", random_weights=True,
        quantized_layers=decoder_linear_names(model.language_model),
    )
    out = save_quantized_model(
        model, processor, autoround, workdir / "tiny-w4a16", metadata=metadata, export_formats=("auto_round", "auto_gptq")
    )
    return model, processor, out
