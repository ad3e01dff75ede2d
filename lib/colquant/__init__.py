"""ColQuant: 4-bit ColQwen3 retrievers that still retrieve.

    model, processor = colquant.load("TomoroAI/tomoro-colqwen3-embed-4b")   # or a local directory
    queries = model.encode_queries(["What was the 2019 revenue?"])
    pages = model.encode_pages(page_images)                                # PIL images or paths
    scores = colquant.score(queries, pages)                                # MaxSim, (queries, pages)

The names below are imported on first use (PEP 562), so `import colquant` and the `colquant`
command line start without loading torch and transformers.

Layers, lowest first (a module imports from its own layer and those below it, never from one above,
imports inside functions included; tests/test_layers.py checks it):

    colquant_vllm       the vLLM plugin that keeps the projection bias (imports nothing of colquant)
    colquant.basics     files written whole, argument checks, time and memory measurements
    colquant.retriever  ColQwen3, its processor, MaxSim, encoding, checkpoints, FP8 layers, tiny, remote code
    colquant.quantize   making variants: calibration, auto-round W4A16, FP8, GPTQ/AWQ exports, model cards
    colquant.kernels    the fast path: 4-bit and FP8 GEMMs, fused towers, CUDA graphs, per-GPU tuning
    colquant.inference  colquant.load (read, then made fast), multi-GPU corpus encoding, the index, compression
    colquant.evaluate   the embedded corpus, mteb retrieval, fidelity, speed and memory sweeps, metrics, plots
    colquant.research   profiles, their outputs, a profile's variants, the notebook pipeline, the report
    colquant.deploy     hub pushes, the vLLM serving check, the benchmark
    colquant            the public names (this file) and the command line (__main__)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CheckpointError": "colquant.retriever.checkpoint",
    "load": "colquant.inference.loading",
    "ColQwen3": "colquant.retriever.model",
    "ColQwen3Config": "colquant.retriever.model",
    "ColQwen3Processor": "colquant.retriever.processing",
    "score": "colquant.retriever.scoring",
    "encode_queries": "colquant.retriever.encode",
    "encode_pages": "colquant.retriever.encode",
}
# Modules that are public names too: `colquant.tiny.build(path)`, and `from colquant import encode` in the
# remote code of checkpoints (`model.encode_queries`).
_SUBMODULES = {"tiny": "colquant.retriever.tiny", "encode": "colquant.retriever.encode"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    """`colquant.load`, `colquant.score`, `colquant.tiny`, ... and any subpackage (`colquant.kernels`),
    imported on first use."""
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = import_module(_SUBMODULES[name])
    else:
        try:
            value = import_module(f"colquant.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"colquant.{name}":
                raise  # the subpackage exists but needs a package that is missing: say which
            raise AttributeError(f"module 'colquant' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
