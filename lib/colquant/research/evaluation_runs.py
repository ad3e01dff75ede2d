"""The variants notebooks 05 and 07 evaluate, loaded in groups that share a vision tower, each with its cache.

`loaded_variants(profile, variants)` yields each variant loaded with the profile's settings, with its
`EmbeddingCache` under `outputs/<profile>/embeddings/` and its `companions`: the variants loaded
beside it that keep the same vision tower and come after it (`shared_vision`). Evaluating a variant
with its companions encodes their pages too, the vision tower once per batch, so the companions'
own evaluations read every page from their caches. A group holds as many variants as memory allows
(`shared_vision.MemoryCheck`: measured, and every decision logged); a group is released before the
next loads. Before the first, entries of checkpoints the profile no longer evaluates are removed
(`embedding_cache.retain`), which bounds the cache to the current variants.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colquant.evaluate import embedding_cache
from colquant.evaluate.embedding_cache import EmbeddingCache
from colquant.evaluate.shared_vision import Companion, MemoryCheck, sharing_groups
from colquant.research import workspace
from colquant.retriever.encode import model_device

log = logging.getLogger(__name__)


@dataclass
class LoadedVariant:
    """A variant in memory: its name, checkpoint, model, processor, embedding cache, and the variants
    loaded beside it whose pages it encodes with its own (`companions`)."""

    name: str
    path: Path
    model: torch.nn.Module | None
    processor: Any
    cache: EmbeddingCache
    companions: list[Companion] = field(default_factory=list)

    def release(self) -> None:
        """Drop the model, so its memory is freed before the next variants load."""
        self.model = self.processor = None
        self.companions = []


def loaded_variants(profile: dict[str, Any], variants: Mapping[str, Path]) -> Iterator[LoadedVariant]:
    """Each variant loaded (`workspace.load_variant`) with its cache and companions, in groups that
    share a vision tower, each group in the given order; a group is released when the variant after
    its last is asked for."""
    root = workspace.embeddings_dir(profile)
    root.mkdir(parents=True, exist_ok=True)  # the pipeline counts 05 and 07 done only once it exists
    embedding_cache.retain(root, [workspace.checkpoint_fingerprint(path) for path in variants.values()])
    for names in sharing_groups(variants):
        while names:
            group = _load_group(profile, root, names, variants)
            names = names[len(group):]
            for index, variant in enumerate(group):
                variant.companions = [Companion(later.model, later.cache) for later in group[index + 1:]]
                yield variant
            for variant in group:
                variant.release()
            del group, variant
            free_memory()


def _load_group(profile: dict[str, Any], root: Path, names: list[str], paths: Mapping[str, Path]) -> list[LoadedVariant]:
    """The first of `names` loaded, then each next one while it fits beside those (the rest wait)."""
    first = _load(profile, root, names[0], paths[names[0]])
    if len(names) == 1:
        return [first]
    device = model_device(first.model)
    why = MemoryCheck.unavailable_reason(device)
    if why:
        log.info("%s are evaluated one by one: %s", ", ".join(names), why)
        return [first]
    memory = MemoryCheck(device)
    peak = memory.measure(first.model, first.processor, profile["evaluation"]["batch_size"])
    log.info("a page batch of %s takes %.2f GiB at its peak on %s", first.name, peak / 2**30, device)
    group = [first]
    for name in names[1:]:
        why = memory.before_loading(paths[name])
        candidate = None if why else _load(profile, root, name, paths[name])
        why = why or memory.after_loading(candidate.model)
        if why:
            log.info("%s is evaluated after %s, not with their vision tower: %s",
                     name, ", ".join(v.name for v in group), why)
            del candidate
            free_memory()
            break
        group.append(candidate)
    if len(group) > 1:
        log.info("%s share %s's vision tower: pages run through it once for all of them",
                 ", ".join(v.name for v in group[1:]), first.name)
    return group


def _load(profile: dict[str, Any], root: Path, name: str, path: Path) -> LoadedVariant:
    model, processor = workspace.load_variant(profile, path)
    return LoadedVariant(name, Path(path), model, processor, EmbeddingCache.for_model(root, path, model, processor))


def free_memory() -> None:
    """Collect released models now, and hand the GPU's cached blocks back, so the next load has them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
