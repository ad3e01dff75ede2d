"""Retrieval quality of compressed page indexes through mteb: one NDCG@5 per (variant, setting, task).

Kept apart from `colquant.inference.compress` because it needs mteb, which the GPU machines that run the
scoring benchmark do not have. The pieces:

- `CompressedIndexEncoder`: `ColQuantEncoder` whose `similarity` compresses the page embeddings
  with a setting and scores them with `compress.score_compressed`; its mteb model name carries the
  setting, so each (variant, setting) has results of its own in mteb's cache. Encodings can be
  shared between the settings of one variant through an `EmbeddingMemo`, so a variant encodes
  each task once, not once per setting.
- `evaluate_setting`: `evaluation.evaluate_variant` with that encoder, plus the index's bytes per
  page (measured on the compressed tensors, stored beside mteb's results so resumed runs have them).
- `plot_pareto`: quality against index size (the table and the recommendation are in
  `colquant.inference.compress`, which the report reads without mteb).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from mteb.abstasks import AbsTask
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType
from torch.utils.data import DataLoader

from colquant.basics import files
from colquant.evaluate.embedding_cache import EmbeddingCache
from colquant.evaluate.evaluation import SIMILARITY_ELEMENTS, ColQuantEncoder, evaluate_variant
from colquant.evaluate.plots import hue_style, legend_outside
from colquant.evaluate.shared_vision import Companion
from colquant.inference.compress import CompressionSetting, compress_pages, pareto_front, score_compressed
from colquant.retriever.scoring import Embeddings

INDEX_STATS_DIR = "index_stats"


def index_variant_name(variant_name: str, setting: CompressionSetting) -> str:
    """The name a (variant, setting) pair is evaluated and cached under, e.g. `tiny-bf16__index-pool3-binary`."""
    return f"{variant_name}__index-{setting.slug}"


class EmbeddingMemo:
    """Embeddings of one variant, keyed by what was encoded, shared by the encoders of its settings.

    The key is (task, subset, split, prompt type, item ids): the same items of the same task give
    the same embeddings for one variant. Only one task is held at a time (a new task clears it),
    which bounds the memory to one task's corpus; evaluate tasks in the outer loop and settings in
    the inner one to benefit.
    """

    def __init__(self) -> None:
        self._task: str | None = None
        self._items: dict[tuple[Any, ...], torch.Tensor] = {}

    def get_or_encode(self, key: tuple[Any, ...], encode: Any) -> torch.Tensor:
        if key[0] != self._task:
            self._task, self._items = key[0], {}
        if key not in self._items:
            self._items[key] = encode()
        return self._items[key]


class CompressedIndexEncoder(ColQuantEncoder):
    """ColQuantEncoder over a compressed page index: pages are stored as `setting` says, then scored.

    Queries stay float (the index is what is compressed). `encode` is the parent's (shared through
    `memo` when given); `similarity` compresses the page embeddings it receives and scores them with
    exact MaxSim, recording the stored bytes and pages per (task, subset) in `index_stats`.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, variant_name: str, setting: CompressionSetting,
                 revision: str, memo: EmbeddingMemo | None = None, cache: EmbeddingCache | None = None,
                 companions: Sequence[Companion] = ()) -> None:
        super().__init__(model, processor, index_variant_name(variant_name, setting), revision, "exact", cache=cache,
                         companions=companions)
        self.setting = setting
        self.memo = memo
        self.index_stats: dict[str, dict[str, int]] = {}
        self._current: str | None = None

    def encode(self, inputs: DataLoader, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> torch.Tensor:
        """The parent's embeddings; remembers the (task, subset) the next `similarity` belongs to."""
        self._current = stats_key(task_metadata.name, hf_subset)

        def encode() -> torch.Tensor:
            return super(CompressedIndexEncoder, self).encode(
                inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                prompt_type=prompt_type, **kwargs)

        if self.memo is None:
            return encode()
        key = (task_metadata.name, hf_subset, hf_split, str(prompt_type), _item_ids(inputs))
        return self.memo.get_or_encode(key, encode)

    def similarity(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """MaxSim of float queries against the pages compressed with the setting."""
        pages = compress_pages(embeddings2, self.setting)
        if self._current is None:
            raise RuntimeError("similarity before any encode: the index size cannot be filed under a task")
        stats = self.index_stats.setdefault(self._current, {"pages": 0, "bytes": 0})
        stats["pages"] += len(pages)
        stats["bytes"] += pages.nbytes
        return score_compressed(embeddings1, pages, device=self.device, similarity_elements=SIMILARITY_ELEMENTS)

    def similarity_pairwise(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """MaxSim of each query with the compressed page at the same position (mteb's reranking path)."""
        if len(embeddings1) != len(embeddings2):
            raise ValueError(f"pairwise similarity needs as many queries as pages, got "
                             f"{len(embeddings1)} and {len(embeddings2)}")
        return torch.stack([self.similarity(embeddings1[i : i + 1], embeddings2[i : i + 1])[0, 0].cpu()
                            for i in range(len(embeddings1))])


def stats_key(task: str, subset: str) -> str:
    return f"{task}/{subset}"


def _item_ids(inputs: DataLoader) -> tuple[Any, ...]:
    """The ids of the items a dataloader yields, which identify what is encoded."""
    dataset = inputs.dataset
    if "id" not in getattr(dataset, "column_names", []):
        raise ValueError("sharing embeddings between settings needs an 'id' column in mteb's dataloader; "
                         "pass memo=None to encode per setting")
    return tuple(dataset["id"])


def evaluate_setting(model: torch.nn.Module, processor: Any, variant_name: str, setting: CompressionSetting,
                     tasks: Iterable[AbsTask], output_dir: str | Path, *, revision: str, batch_size: int,
                     corpus_chunk_size: int, memo: EmbeddingMemo | None = None,
                     cache: EmbeddingCache | None = None, companions: Sequence[Companion] = ()) -> pd.DataFrame:
    """`evaluation.evaluate_variant` of one variant with its page index compressed by `setting`.

    Rows as `evaluation.results_frame`, with `variant` the plain variant name, plus `setting` and
    `bytes_per_page` (stored bytes of the compressed index over its pages, for that task). The
    bytes are written to `output_dir/index_stats/<model name>/<revision>.json` when measured and read from
    there when mteb answers from its cache. `cache`: the model's `embedding_cache.EmbeddingCache`,
    shared with notebook 05's evaluation of the same variant (same tasks and batching: no page is
    encoded again); `companions` as in `evaluation.evaluate_variant`.
    """
    with CompressedIndexEncoder(model, processor, variant_name, setting, revision, memo, cache, companions) as encoder:
        results = evaluate_variant(model, processor, index_variant_name(variant_name, setting), tasks, output_dir,
                                   revision=revision, scoring="exact", batch_size=batch_size,
                                   corpus_chunk_size=corpus_chunk_size, encoder=encoder)
    stats = _stored_index_stats(
        Path(output_dir) / INDEX_STATS_DIR / index_variant_name(variant_name, setting) / f"{revision}.json",
        encoder.index_stats)
    keys = [stats_key(task, subset) for task, subset in zip(results["task"], results["subset"])]
    missing = [key for key in keys if key not in stats]
    if missing:
        raise ValueError(f"no index size recorded for {missing} of {encoder.mteb_model_meta.name}: mteb answered "
                         f"from results cached without it; delete them under {output_dir} to re-run")
    return results.assign(variant=variant_name, setting=setting.name,
                          bytes_per_page=[stats[key]["bytes"] / stats[key]["pages"] for key in keys])


def _stored_index_stats(path: Path, measured: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Index sizes known for a (variant, setting): those on disk updated with the ones just measured."""
    stats = json.loads(path.read_text()) if path.exists() else {}
    if measured:
        stats.update(measured)
        files.write_json(path, stats)
    return stats


# --------------------------------------------------------------------------------------------
# The grid


def plot_pareto(table: pd.DataFrame, *, palette: Mapping[str, Any] | None = None) -> Figure:
    """NDCG@5 against bytes per page (log scale), one marker per setting and colour per variant,
    the Pareto front drawn as a line."""
    figure = Figure(figsize=(9, 5), layout="constrained")
    ax = figure.subplots()
    sns.scatterplot(data=table.assign(kib=table["bytes_per_page"] / 1024), x="kib", y="ndcg_at_5",
                    hue="variant", style="setting", s=90, ax=ax, **hue_style(table["variant"], palette))
    front = pareto_front(table)
    ax.plot(front["bytes_per_page"] / 1024, front["ndcg_at_5"], color="black", linewidth=0.8, linestyle="--",
            label="Pareto front")
    ax.set(xscale="log", xlabel="index size (KiB per page, log scale)", ylabel="NDCG@5 (mean over tasks)",
           title="Retrieval quality against index size")
    legend_outside(ax)
    return figure
