"""Retrieval quality of ColQwen3 variants (BF16 or 4-bit) with mteb, and the seed-000 NDCG@5 table.

mteb is the evaluation engine: it loads the ViDoRe tasks, runs the search, computes the metrics and
stores one JSON file per (variant, task) in its own result-cache layout. This module adds only what
mteb lacks for this project:

- `ColQuantEncoder`: an mteb encoder around any already-loaded `(model, processor)`, so a quantized
  model in memory is evaluated exactly like the BF16 one, under its own mteb model name;
- `ColQuantTinyPagesRetrieval`: an mteb task over the offline corpus of `colquant.corpus`, so the
  whole pipeline runs without the hub;
- `evaluate_variant`: one call that evaluates a variant with bounded corpus memory and resumable
  results, returning one row per task and subset;
- `ndcg_table`, `change_counts`, `format_seed_table`, `plot_ndcg`, `plot_delta`: the comparison
  report of seed 000 (NDCG@5 per task and variant, Δ% against the baseline, an Average row).

Scoring: the published ViDoRe numbers were computed by mteb with colpali-engine's
`score_multi_vector`, which maxes over zero-padded page rows (`colquant.score(..., mode="colpali")`).
The evaluation scores the same way by default (`evaluation.scoring: colpali`), so the BF16 row can
reproduce the published column; the baseline is also scored with the other mode (exact MaxSim) and
shown as one extra column, so readers see whether the choice matters. The scoring mode is part of
the key mteb stores results under.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mteb
import pandas as pd
import seaborn as sns
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from matplotlib.figure import Figure
from mteb.abstasks import AbsTask, AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.languages import language_label
from mteb.models import ModelMeta, SearchEncoderWrapper
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ScoringFunction
from mteb.results import TaskResult
from mteb.types import PromptType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from colquant.corpus import FORMAT_VERSION, build_corpus
from colquant.plots import hue_style, legend_outside
from colquant.scoring import SCORING_MODES, Embeddings, ScoringMode, score

log = logging.getLogger(__name__)

MODEL_ORGANISATION = "colquant"
# mteb files results under <name>/<revision>/. The revision is the fingerprint of everything the
# scores depend on (checkpoint content, dtype, visual-token budget, scoring mode; see
# `workspace.evaluation_fingerprint`), so a changed input is recomputed and its old result never read.
REVISION_PATTERN = re.compile(r"[0-9a-f]{8,64}")
NDCG_COLUMN = "ndcg_at_5"
DELTA_SUFFIX = " Δ%"
DEFAULT_SCORING: ScoringMode = "colpali"
# Similarity entries per scoring block (~400 MB in float32), the budget mteb's max_sim uses.
SIMILARITY_ELEMENTS = 100_000_000
SCORING_LABELS = {"colpali": "colpali scoring", "exact": "exact MaxSim"}


# --------------------------------------------------------------------------------------------
# Encoder


def check_scoring(scoring: str) -> None:
    """Refuse a scoring mode `colquant.score` does not have, naming the two it has."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"evaluation.scoring={scoring!r}: use 'colpali' (mteb's published scoring) or 'exact' (true MaxSim)")


def other_scoring(scoring: ScoringMode) -> ScoringMode:
    """The mode shown in the extra column beside the main one."""
    check_scoring(scoring)
    return "exact" if scoring == "colpali" else "colpali"


def variant_model_name(variant_name: str) -> str:
    """The mteb model name of a variant, e.g. `colquant/w4a16-g128-sym-rtn`.

    mteb's result cache is keyed by model name: two variants sharing a name would share results,
    and the second would silently be reported with the first one's scores.
    """
    if not variant_name or "/" in variant_name:
        raise ValueError(f"variant name {variant_name!r} must be non-empty and contain no '/', "
                         "e.g. 'bf16' or 'w4a16-g128-sym-rtn'")
    return f"{MODEL_ORGANISATION}/{variant_name}"


class ColQuantEncoder(AbsEncoder):
    """mteb encoder for a loaded ColQwen3 variant: multi-vector embeddings scored with MaxSim.

    Queries and pages go through the project's processor exactly as `colquant` uses them elsewhere
    (query augmentation, page prompt, visual-token budget). Task prompts are not prepended, as in
    mteb's own ColQwen3 wrapper that produced the published ViDoRe scores.

    `encode` returns a (items, tokens, dim) tensor in the model's dtype, each item's real tokens
    first and zero rows after (mteb pads a corpus chunk the same way); `similarity` is
    `colquant.score` in the `scoring` mode: `colpali` maxes over those zero rows as colpali-engine
    does, `exact` ignores them. Results are cached under (variant name, `revision`); the revision
    must be the fingerprint of everything that changes scores (weights, dtype, visual-token budget,
    scoring mode: `workspace.evaluation_fingerprint`).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, variant_name: str, revision: str,
                 scoring: ScoringMode = DEFAULT_SCORING) -> None:
        if not isinstance(revision, str) or not REVISION_PATTERN.fullmatch(revision):
            raise ValueError(f"revision {revision!r} must be a hex fingerprint of the variant's inputs, e.g. "
                             "workspace.evaluation_fingerprint(profile, checkpoint, scoring)")
        check_scoring(scoring)
        self.model = model
        self.processor = processor
        self.scoring = scoring
        self.device = next(model.parameters()).device
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=variant_model_name(variant_name),
            revision=revision,
            release_date=None,
            languages=["eng-Latn"],
            n_parameters=None,
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=None,
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.MAX_SIM,
            use_instructions=False,
            training_datasets=None,
            modalities=["text", "image"],
            model_type=["late-interaction"],
        )

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Embed a dataloader of text queries or page images (mteb's batches: {"text": [...]} or
        {"image": [PIL, ...]}); the batch size is the dataloader's, set by mteb from encode_kwargs."""
        columns = set(inputs.dataset.column_names) & {"text", "image"}
        if columns == {"text"}:
            column, process, description = "text", self.processor.process_queries, "Encoding queries"
        elif columns == {"image"}:
            column, process, description = "image", self.processor.process_images, "Encoding pages"
        else:
            raise ValueError(
                f"{task_metadata.name} ({hf_subset}/{hf_split}) gives inputs with columns "
                f"{sorted(inputs.dataset.column_names)}; ColQuantEncoder embeds either text queries or "
                "page images, so use text-to-image tasks (category 't2i')")
        items: list[torch.Tensor] = []
        with torch.inference_mode():
            for batch in tqdm(inputs, desc=description, disable=not kwargs.get("show_progress_bar", True)):
                features = process(batch[column]).to(self.device)
                embeddings = self.model(**features).embeddings
                keep = features["attention_mask"].bool()
                items.extend(row[mask].cpu() for row, mask in zip(embeddings, keep))
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)

    def similarity(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """Late-interaction scores (queries, pages) in the encoder's scoring mode, float32 on the
        model's device (`colquant.score` works in bounded blocks, whatever the corpus chunk)."""
        return score(embeddings1, embeddings2, mode=self.scoring, device=self.device,
                     block_elements=SIMILARITY_ELEMENTS, show_progress_bar=False)

    def similarity_pairwise(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """Score of each query with the page at the same position (mteb's reranking path)."""
        if len(embeddings1) != len(embeddings2):
            raise ValueError(f"pairwise similarity needs as many queries as pages, got "
                             f"{len(embeddings1)} and {len(embeddings2)}")
        return torch.stack([
            score(embeddings1[i : i + 1], embeddings2[i : i + 1], mode=self.scoring, device=self.device,
                  show_progress_bar=False)[0, 0].cpu()
            for i in range(len(embeddings1))
        ])


# --------------------------------------------------------------------------------------------
# Local task over the offline corpus


class ColQuantTinyPagesRetrieval(AbsTaskRetrieval):
    """The offline corpus of `colquant.corpus` (rendered report pages, one relevant page per query)
    as an mteb text-to-image retrieval task, so evaluation runs with no hub access.

    The dataset revision names the corpus build parameters: results computed on another corpus
    are then recognisable in the cache (see `evaluate_variant`).
    """

    metadata = TaskMetadata(
        name="ColQuantTinyPagesRetrieval",
        description="Retrieve the rendered report page that states the figure a question asks for "
                    "(offline corpus generated by colquant.corpus; one relevant page per query).",
        reference=None,
        dataset={"path": "colquant/embedded-corpus", "revision": f"format-v{FORMAT_VERSION}"},
        type="DocumentUnderstanding",
        category="t2i",
        modalities=["text", "image"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=NDCG_COLUMN,
        date=("2025-01-01", "2025-01-01"),
        domains=["Financial", "Non-fiction"],
        task_subtypes=["Image Text Retrieval"],
        license="not specified",
        annotations_creators="derived",
        dialect=[],
        sample_creation="created",
        bibtex_citation="",
    )

    def __init__(self, corpus_root: str | Path, *, n_pages: int = 60, n_queries: int = 120,
                 corpus_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.corpus_root = Path(corpus_root)
        self.corpus_options = {"n_pages": n_pages, "n_queries": n_queries, "seed": corpus_seed}
        revision = f"format-v{FORMAT_VERSION}-seed{corpus_seed}-pages{n_pages}-queries{n_queries}"
        self.metadata = type(self).metadata.model_copy(
            update={"dataset": {"path": str(self.corpus_root), "revision": revision}})

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        """Build the corpus under `corpus_root` if absent (else load it) and hand it to mteb;
        page images stay files, decoded batch by batch."""
        if self.data_loaded:
            return
        corpus = build_corpus(self.corpus_root, **self.corpus_options)
        pages = Dataset.from_dict({
            "id": [page.page_id for page in corpus.pages],
            "image": [str(page.image_path) for page in corpus.pages],
        }).cast_column("image", ImageFeature())
        queries = Dataset.from_dict({
            "id": [query.query_id for query in corpus.queries],
            "text": [query.text for query in corpus.queries],
        })
        split = RetrievalSplitData(queries=queries, corpus=pages, relevant_docs=corpus.qrels, top_ranked=None)
        self.dataset = {"default": {self.metadata.eval_splits[0]: split}}
        self.data_loaded = True

    def unload_data(self) -> None:
        """mteb's unload also drops instance metadata; keep ours, it carries the corpus revision."""
        metadata = self.metadata
        super().unload_data()
        self.metadata = metadata


LOCAL_TASKS: dict[str, type[ColQuantTinyPagesRetrieval]] = {
    ColQuantTinyPagesRetrieval.metadata.name: ColQuantTinyPagesRetrieval,
}


def get_tasks(names: Sequence[str], corpus_root: str | Path | None = None,
              languages: Sequence[str] | None = None, *, n_pages: int = 60, n_queries: int = 120,
              corpus_seed: int = 0) -> list[AbsTask]:
    """A profile's `evaluation.tasks` as mteb task objects, in the profile's order.

    Local task names build the offline corpus task under `corpus_root` (with the profile's corpus
    size and seed); every other name goes through `mteb.get_tasks` with `languages` (e.g. ["eng"]
    keeps the English subsets of ViDoRe v2/v3). Building task objects needs no network; loading
    their data later does, for the hub tasks.
    """
    local_names = [name for name in names if name in LOCAL_TASKS]
    hub_names = [name for name in names if name not in LOCAL_TASKS]
    if local_names and corpus_root is None:
        raise ValueError(f"{', '.join(local_names)} reads the offline corpus: pass corpus_root "
                         "(the profile's corpus.path)")
    hub_tasks = {task.metadata.name: task
                 for task in (mteb.get_tasks(tasks=hub_names, languages=languages) if hub_names else [])}
    missing = [name for name in hub_names if name not in hub_tasks]
    if missing:
        raise ValueError(f"mteb has no {', '.join(missing)} with languages {languages}; "
                         "check the task names and languages in the profile")
    return [
        LOCAL_TASKS[name](corpus_root, n_pages=n_pages, n_queries=n_queries, corpus_seed=corpus_seed)
        if name in LOCAL_TASKS else hub_tasks[name]
        for name in names
    ]


# --------------------------------------------------------------------------------------------
# Running a variant


def evaluate_variant(model: torch.nn.Module, processor: Any, variant_name: str, tasks: Iterable[AbsTask],
                     output_dir: str | Path, *, revision: str, batch_size: int, corpus_chunk_size: int,
                     scoring: ScoringMode = DEFAULT_SCORING, model_revision: str | None = None,
                     encoder: ColQuantEncoder | None = None) -> pd.DataFrame:
    """Evaluate one variant on `tasks` with mteb; one row per task and subset (see `results_frame`).

    Results are written by mteb's `ResultCache` under `output_dir/results/colquant__<variant>/<revision>/`.
    Tasks already finished there for this name and revision are read back instead of re-run, so an
    interrupted run resumes; a variant with another name, or re-quantized or evaluated under other
    settings (another revision: pass `workspace.evaluation_fingerprint(profile, checkpoint, scoring)`,
    which covers the scoring mode), never sees them. The corpus is encoded and scored
    `corpus_chunk_size` pages at a time, which bounds the memory held by page embeddings.
    `model_revision` (the hub commit of the base model) is recorded in every row. `encoder` replaces
    the default `ColQuantEncoder`, e.g. with `colquant.compress_eval.CompressedIndexEncoder`, which
    scores a compressed page index (its name carries the setting).
    """
    tasks = list(tasks)
    encoder = encoder or ColQuantEncoder(model, processor, variant_name, revision, scoring)
    cache = mteb.ResultCache(output_dir)
    _drop_interrupted_results(cache, encoder.mteb_model_meta, tasks)
    _refuse_results_of_other_datasets(cache, encoder.mteb_model_meta, tasks)
    result = mteb.evaluate(
        SearchEncoderWrapper(encoder, corpus_chunk_size=corpus_chunk_size),
        tasks,
        encode_kwargs={"batch_size": batch_size},
        cache=cache,
        overwrite_strategy="only-missing",
        co2_tracker=False,
        raise_error=True,
    )
    main_scores = {task.metadata.name: task.metadata.main_score for task in tasks}
    return results_frame(result.task_results, variant_name, main_scores).assign(
        scoring=scoring, model_revision=model_revision)


def _drop_interrupted_results(cache: mteb.ResultCache, meta: ModelMeta, tasks: list[AbsTask]) -> None:
    """mteb writes a result file in place; one a kill cut short is not a result: remove it (with a
    warning naming it) so that the task is evaluated again instead of failing every later run."""
    for task in tasks:
        path = cache.get_task_result_path(task.metadata.name, meta)
        if not path.exists():
            continue
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as error:
            log.warning("%s is not a complete mteb result (%s), as a killed write leaves it; evaluating "
                        "%s again", path, error, task.metadata.name)
            path.unlink()


def _refuse_results_of_other_datasets(cache: mteb.ResultCache, meta: ModelMeta, tasks: list[AbsTask]) -> None:
    """mteb reuses a finished result whatever dataset revision it was computed on; refuse instead,
    since e.g. a result on a 60-page corpus must not stand in for a 400-page one."""
    for task in tasks:
        cached = cache.load_task_result(task.metadata.name, meta)
        if cached is not None and cached.dataset_revision != task.metadata.revision:
            path = cache.get_task_result_path(task.metadata.name, meta)
            raise ValueError(
                f"{path} holds {meta.name} results on dataset revision {cached.dataset_revision!r}, "
                f"but {task.metadata.name} is now revision {task.metadata.revision!r}; use another "
                "output_dir or variant name, or delete that file to re-run")


def results_frame(task_results: Iterable[TaskResult], variant_name: str,
                  main_scores: dict[str, str]) -> pd.DataFrame:
    """mteb TaskResults as rows: task, subset, language, variant, ndcg_at_5, ndcg_at_10,
    main_score (its name), main_score_value, evaluation_time_s (the task's, over all subsets)."""
    rows = []
    for result in task_results:
        for split, entries in result.scores.items():
            for entry in entries:
                rows.append({
                    "task": result.task_name,
                    "split": split,
                    "subset": entry["hf_subset"],
                    "language": ", ".join(language_label(code) for code in entry["languages"]),
                    "variant": variant_name,
                    "ndcg_at_5": entry["ndcg_at_5"],
                    "ndcg_at_10": entry["ndcg_at_10"],
                    "main_score": main_scores[result.task_name],
                    "main_score_value": entry["main_score"],
                    "evaluation_time_s": result.evaluation_time,
                })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The seed-000 report


def delta_column(variant: str) -> str:
    """Name of a variant's Δ% column in `ndcg_table`."""
    return variant + DELTA_SUFFIX


def scoring_column(baseline: str, scoring: ScoringMode) -> str:
    """Name of the extra column: the baseline scored in the other mode, e.g. `bf16 (exact MaxSim)`."""
    return f"{baseline} ({SCORING_LABELS[scoring]})"


def main_scoring_rows(results: pd.DataFrame, scoring: ScoringMode = DEFAULT_SCORING) -> pd.DataFrame:
    """The rows scored in the main mode (all rows of a frame without a `scoring` column)."""
    return results[results["scoring"] == scoring] if "scoring" in results else results


def ndcg_table(results: pd.DataFrame, baseline: str = "bf16", scoring: ScoringMode = DEFAULT_SCORING) -> pd.DataFrame:
    """NDCG@5 per task (rows, "Task [Language]") per variant (columns, baseline first), each other
    variant followed by its Δ% against the baseline, plus an "Average" row.

    Columns come from the rows scored in `scoring` mode; when `results` also holds the baseline
    scored in the other mode, that is one extra column right after the baseline's
    (`scoring_column`). The Average row holds the mean NDCG@5 and the Δ% of those means (as in seed
    000), not the mean of the per-task Δ%. Every variant must cover the same tasks, else the
    averages would compare different benchmarks.
    """
    extra_mode = other_scoring(scoring)
    extra = (results[(results["scoring"] == extra_mode) & (results["variant"] == baseline)]
             if "scoring" in results else results.iloc[:0])
    results = main_scoring_rows(results, scoring)
    if extra.shape[0]:
        results = pd.concat([results, extra.assign(variant=scoring_column(baseline, extra_mode))])
    variants = list(dict.fromkeys(results["variant"]))
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not among the variants {variants}; "
                         "pass baseline= one of them")
    labelled = results.assign(benchmark=results["task"] + " [" + results["language"] + "]")
    duplicated = labelled.duplicated(["benchmark", "variant"])
    if duplicated.any():
        raise ValueError(f"several results for {labelled[duplicated][['benchmark', 'variant']].values.tolist()}; "
                         "concatenate one evaluate_variant frame per variant")
    scores = labelled.pivot(index="benchmark", columns="variant", values=NDCG_COLUMN).sort_index()
    incomplete = scores.columns[scores.isna().any()].tolist()
    if incomplete:
        missing = {variant: scores.index[scores[variant].isna()].tolist() for variant in incomplete}
        raise ValueError(f"variants lack results for some tasks: {missing}; evaluate them on the same tasks")
    scores.loc["Average"] = scores.mean()
    table = pd.DataFrame(index=scores.index)
    table.index.name = "Benchmark"
    table[baseline] = scores[baseline]
    if extra.shape[0]:
        table[scoring_column(baseline, extra_mode)] = scores[scoring_column(baseline, extra_mode)]
    for variant in variants:
        if variant not in (baseline, scoring_column(baseline, extra_mode)):
            table[variant] = scores[variant]
            table[delta_column(variant)] = (scores[variant] - scores[baseline]) / scores[baseline] * 100
    return table


def _variants(table: pd.DataFrame) -> list[str]:
    """The compared (non-baseline) variants of an `ndcg_table`, in column order."""
    return [column.removesuffix(DELTA_SUFFIX) for column in table.columns if column.endswith(DELTA_SUFFIX)]


def change_counts(table: pd.DataFrame, tolerance: float = 0.0) -> pd.DataFrame:
    """Tasks improved / degraded / unchanged per variant against the baseline (Average row excluded).

    `tolerance` is in Δ% points: |Δ%| <= tolerance counts as unchanged. The default 0 counts only
    identical scores as unchanged, as seed 000 does.
    """
    deltas = table.drop(index="Average")
    counts = {}
    for variant in _variants(table):
        delta = deltas[delta_column(variant)]
        counts[variant] = {
            "Improved": int((delta > tolerance).sum()),
            "Degraded": int((delta < -tolerance).sum()),
            "Unchanged": int((delta.abs() <= tolerance).sum()),
        }
    return pd.DataFrame(counts)


def _format_delta(value: float) -> str:
    rounded = round(value, 2)
    return "0.00%" if rounded == 0 else f"{rounded:+.2f}%"


def format_seed_table(table: pd.DataFrame) -> str:
    """`ndcg_table` as the markdown table of seed 000: scores to 5 decimals, signed Δ% to 2,
    a rule and a bold Average row at the bottom."""
    columns = list(table.columns)
    header = ["Benchmark"] + ["Δ%" if column.endswith(DELTA_SUFFIX) else column for column in columns]

    def cells(row: pd.Series) -> list[str]:
        return [_format_delta(row[c]) if c.endswith(DELTA_SUFFIX) else f"{row[c]:.5f}" for c in columns]

    rule = "|" + "|".join("-" * max(3, len(cell) + 2) for cell in header) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join([label, *cells(row)]) + " |" for label, row in table.drop(index="Average").iterrows()]
    lines.append(rule)
    lines.append("| " + " | ".join(f"**{cell}**" for cell in ["Average", *cells(table.loc["Average"])]) + " |")
    return "\n".join(lines)


def plot_ndcg(results: pd.DataFrame, scoring: ScoringMode = DEFAULT_SCORING, *,
              palette: Mapping[str, Any] | None = None) -> Figure:
    """Horizontal bars of NDCG@5 per task, one bar per variant (rows scored in `scoring` mode)."""
    results = main_scoring_rows(results, scoring)
    labelled = results.assign(benchmark=results["task"] + " [" + results["language"] + "]")
    n_tasks = labelled["benchmark"].nunique()
    figure = Figure(figsize=(9, 1.5 + 0.2 * n_tasks * labelled["variant"].nunique()), layout="constrained")
    ax = figure.subplots()
    sns.barplot(data=labelled.sort_values("benchmark"), x=NDCG_COLUMN, y="benchmark", hue="variant",
                ax=ax, **hue_style(results["variant"], palette))
    ax.set(xlabel="NDCG@5", ylabel="", title="NDCG@5 per task", xlim=(0, 1))
    legend_outside(ax)
    return figure


def plot_delta(table: pd.DataFrame, *, palette: Mapping[str, Any] | None = None) -> Figure:
    """Horizontal bars of Δ% NDCG@5 against the baseline per task (and Average), zero line marked."""
    long = (table[[delta_column(variant) for variant in _variants(table)]]
            .rename(columns=lambda column: column.removesuffix(DELTA_SUFFIX))
            .reset_index()
            .melt(id_vars="Benchmark", var_name="variant", value_name="delta"))
    figure = Figure(figsize=(9, 1.5 + 0.2 * len(long)), layout="constrained")
    ax = figure.subplots()
    sns.barplot(data=long, x="delta", y="Benchmark", hue="variant", ax=ax, **hue_style(long["variant"], palette))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel="Δ% NDCG@5 vs baseline", ylabel="", title="Change in NDCG@5 against the baseline")
    legend_outside(ax)
    return figure
