"""How many pages and queries a profile's evaluation tasks hold, and how big they are, without loading them.

For the ViDoRe tasks the counts come from the descriptive statistics mteb ships with each task
(`TaskMetadata.descriptive_stats`, offline): per evaluated subset, `num_samples` counts the corpus
and the queries together, the queries' count is their total text length over their average length,
and the pages are the rest; the average page width and height and query length come from the same
statistics. The local task's sizes are the profile's `corpus` section and the embedded corpus's
page size. `colquant run --plan` multiplies them by measured per-item times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from colquant.evaluate.page_render import DEFAULT_PAGE_SIZE


@dataclass(frozen=True)
class TaskSize:
    """One evaluated (task, subset): its pages and queries, the pages' mean width and height in
    pixels, and the queries' mean length in characters (None where the statistics have none)."""

    task: str
    subset: str
    revision: str
    pages: int
    queries: int
    page_width: float
    page_height: float
    query_chars: float | None


def task_sizes(profile: dict[str, Any]) -> list[TaskSize]:
    """Every (task, subset) the profile's evaluation runs, in the profile's task order."""
    from colquant.evaluate.evaluation import LOCAL_TASKS, get_tasks

    evaluation, corpus = profile["evaluation"], profile["corpus"]
    sizes = []
    hub = [name for name in evaluation["tasks"] if name not in LOCAL_TASKS]
    hub_tasks = {task.metadata.name: task for task in get_tasks(hub, languages=evaluation.get("languages"))} if hub else {}
    for name in evaluation["tasks"]:
        if name in LOCAL_TASKS:
            revision = LOCAL_TASKS[name](".", n_pages=corpus["n_pages"], n_queries=corpus["n_queries"],
                                         corpus_seed=corpus["seed"]).metadata.revision
            sizes.append(TaskSize(name, "default", revision, corpus["n_pages"], corpus["n_queries"],
                                  *DEFAULT_PAGE_SIZE, None))
            continue
        task = hub_tasks[name]
        sizes += [_subset_size(task, subset) for subset in task.hf_subsets]
    return sizes


def _subset_size(task: Any, subset: str) -> TaskSize:
    metadata = task.metadata
    split = metadata.eval_splits[0]
    stats = (metadata.descriptive_stats or {}).get(split)
    if not stats:
        raise ValueError(f"mteb ships no descriptive statistics for {metadata.name} ({split}): its page and query "
                         "counts cannot be read without downloading it; run without --plan, or upgrade mteb")
    stats = (stats.get("hf_subset_descriptive_stats") or {}).get(subset, stats)
    text, images = stats["queries_text_statistics"], stats["documents_image_statistics"]
    queries = round(text["total_text_length"] / text["average_text_length"])
    return TaskSize(metadata.name, subset, metadata.revision, stats["num_samples"] - queries, queries,
                    images["average_image_width"], images["average_image_height"], text["average_text_length"])


def mean_page_size(sizes: list[TaskSize]) -> tuple[int, int]:
    """(width, height) of the page-weighted mean page: the size the warm-up times pages at."""
    pages = sum(size.pages for size in sizes)
    width = sum(size.page_width * size.pages for size in sizes) / pages
    height = sum(size.page_height * size.pages for size in sizes) / pages
    return round(width), round(height)


def mean_query_chars(sizes: list[TaskSize]) -> float | None:
    """The query-weighted mean query length, None where no task's statistics give one."""
    known = [size for size in sizes if size.query_chars is not None]
    if not known:
        return None
    return sum(size.query_chars * size.queries for size in known) / sum(size.queries for size in known)
