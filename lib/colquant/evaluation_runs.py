"""The variants notebooks 05 and 07 evaluate, loaded one after another, each with its embedding cache.

`loaded_variants(profile, variants)` yields each variant loaded with the profile's settings and its
`EmbeddingCache` under `outputs/<profile>/embeddings/`, and releases it before loading the next, so
the notebooks' loops hold one variant's weights at a time. Before the first, entries of checkpoints
the profile no longer evaluates are removed (`embedding_cache.retain`), which bounds the cache to
the current variants.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from colquant import embedding_cache, workspace
from colquant.embedding_cache import EmbeddingCache


@dataclass
class LoadedVariant:
    """A variant in memory: its name, checkpoint, model, processor and embedding cache."""

    name: str
    path: Path
    model: torch.nn.Module | None
    processor: Any
    cache: EmbeddingCache

    def release(self) -> None:
        """Drop the model, so its memory is freed before the next variant loads."""
        self.model = self.processor = None


def loaded_variants(profile: dict[str, Any], variants: Mapping[str, Path]) -> Iterator[LoadedVariant]:
    """Each variant loaded (`workspace.load_variant`) with its embedding cache, in order; the one
    yielded before is released when the next is asked for."""
    root = workspace.embeddings_dir(profile)
    root.mkdir(parents=True, exist_ok=True)  # the pipeline counts 05 and 07 done only once it exists
    embedding_cache.retain(root, [workspace.checkpoint_fingerprint(path) for path in variants.values()])
    for name, path in variants.items():
        model, processor = workspace.load_variant(profile, path)
        variant = LoadedVariant(name, Path(path), model, processor,
                                EmbeddingCache.for_model(root, path, model, processor))
        del model, processor
        yield variant
        variant.release()
        free_memory()


def free_memory() -> None:
    """Collect released models now, and hand the GPU's cached blocks back, so the next load has them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
