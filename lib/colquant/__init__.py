"""ColQuant: 4-bit ColQwen3 retrievers that still retrieve.

    model, processor = colquant.load("TomoroAI/tomoro-colqwen3-embed-4b")   # or a local directory
    queries = model.encode_queries(["What was the 2019 revenue?"])
    pages = model.encode_pages(page_images)                                # PIL images or paths
    scores = colquant.score(queries, pages)                                # MaxSim, (queries, pages)

The names below are imported on first use (PEP 562), so `import colquant` and the `colquant`
command line start without loading torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CheckpointError": "colquant.checkpoint",
    "load": "colquant.loading",
    "ColQwen3": "colquant.model",
    "ColQwen3Config": "colquant.model",
    "ColQwen3Processor": "colquant.processing",
    "score": "colquant.scoring",
    "encode_queries": "colquant.encode",
    "encode_pages": "colquant.encode",
}
# Modules that are public names too: `colquant.tiny.build(path)`, and `from colquant import encode` in the
# remote code of checkpoints (`model.encode_queries`).
_SUBMODULES = {"tiny": "colquant.tiny", "encode": "colquant.encode"}

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
