"""A short measured warm-up on this machine's device: the per-item times `colquant run --plan` multiplies.

It times, with the profile's model settings on the detected device: loading the base checkpoint
(where it is on disk), a few page batches of the evaluation's batch size through `encode_pages`
(the pages of the local corpus, or blank pages of the ViDoRe tasks' mean size: the model's work
depends on the page's size, not its content), the vision tower alone on one batch, a few query
batches, and one text forward of auto-round's batch at the longest calibration seqlen. On a GPU
each is run once untimed first (worker start, kernel choice, CUDA graphs).

The model is the base checkpoint where it exists (built in the output folder, or in the hub cache);
the built profiles' model (tiny, synthetic 4B) is otherwise made in memory with random weights, as
`tiny.build` would make it, so nothing is written. A hub model not downloaded yet is not timed.

`measure_in_subprocess(profile)` runs it in a child process, so that `colquant run` itself never
holds the GPU (a CUDA context stays for the life of a process) while the notebooks run.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

BATCHES = 1  # timed batches of pages and of queries (after one untimed batch on a GPU)


@dataclass(frozen=True)
class Rates:
    """Seconds per item measured on `device` with `model` (what was timed, in words)."""

    device: str
    model: str
    load_s: float | None  # loading the base checkpoint; None when the model was made in memory
    page_s: float  # a page through encode_pages, at the evaluation's batch size
    vision_s: float  # a page through the vision tower alone
    query_s: float
    text_token_s: float  # a token of auto-round's calibration batch through one text forward
    page_tokens: float  # tokens (rows) of a timed page's embedding
    query_tokens: float
    embedding_bytes: int  # bytes of one token's embedding (dim x dtype size)
    page_size: tuple[int, int]
    pages: int
    queries: int

    @property
    def vision_share(self) -> float:
        return min(1.0, self.vision_s / self.page_s)


@dataclass(frozen=True)
class Workload:
    """What the evaluation encodes, as the warm-up imitates it: the local corpus's own pages and
    queries (`local_corpus`), or blank pages of `page_size` and questions of `query_chars` characters
    (`task_sizes.mean_page_size` / `mean_query_chars` of the ViDoRe tasks)."""

    local_corpus: bool
    page_size: tuple[int, int]
    query_chars: float | None


def workload_of(profile: dict[str, Any]) -> Workload:
    """The profile's evaluation workload (reads mteb's task statistics for hub tasks: no download)."""
    from colquant.evaluate.evaluation import LOCAL_TASKS
    from colquant.evaluate.page_render import DEFAULT_PAGE_SIZE
    from colquant.evaluate.task_sizes import mean_page_size, mean_query_chars, task_sizes

    if all(name in LOCAL_TASKS for name in profile["evaluation"]["tasks"]):
        return Workload(True, DEFAULT_PAGE_SIZE, None)
    sizes = task_sizes(profile)
    return Workload(False, mean_page_size(sizes), mean_query_chars(sizes))


def measure(profile: dict[str, Any], workload: Workload) -> Rates:
    """Time the warm-up (see the module's docstring); raises ValueError naming why it cannot."""
    from colquant.retriever.checkpoint import resolve_device
    from colquant.retriever.encode import PagePipeline, encode_pages, encode_queries

    device = resolve_device(profile["model"]["device"])
    model, processor, described, load_s = _timed_model(profile, device)
    batch = profile["evaluation"]["batch_size"]
    warm = batch if device.type == "cuda" else 0  # kernel choice, CUDA graphs, grid plans; a CPU needs none
    pages = _pages(profile, workload, warm + batch * BATCHES)
    texts = _queries(profile, workload, warm + batch * BATCHES)
    with PagePipeline.for_model(model, processor=processor) as pipeline:
        encode_pages(model, pages[:warm], batch_size=batch, pipeline=pipeline)
        page_s, encoded = _per_item(lambda: encode_pages(model, pages[warm:], batch_size=batch, pipeline=pipeline),
                                    len(pages) - warm, device)
    encode_queries(model, texts[:warm], processor=processor, batch_size=batch)
    query_s, queries = _per_item(lambda: encode_queries(model, texts[warm:], processor=processor, batch_size=batch),
                                 len(texts) - warm, device)
    vision_s = _vision_per_page(model, processor, pages[:batch], device)
    text_token_s = _text_token_time(model, profile, device)
    return Rates(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", model=described,
                 load_s=load_s, page_s=page_s, vision_s=vision_s, query_s=query_s, text_token_s=text_token_s,
                 page_tokens=sum(item.shape[0] for item in encoded) / len(encoded),
                 query_tokens=sum(item.shape[0] for item in queries) / len(queries),
                 embedding_bytes=model.config.embed_dim * torch.finfo(model.dtype).bits // 8,
                 page_size=workload.page_size, pages=len(pages), queries=len(texts))


def _per_item(run: Callable[[], list[torch.Tensor]], items: int, device: torch.device) -> tuple[float, list[torch.Tensor]]:
    _synchronize(device)
    start = time.perf_counter()
    result = run()
    _synchronize(device)
    return (time.perf_counter() - start) / items, result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_model(profile: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Any, str, float | None]:
    """(model, processor, what it is, load seconds or None) for the profile's base model."""
    from colquant.research import workspace
    from colquant.retriever.tiny import TINY_MARKER

    model_id = profile["model"]["id"]
    built = workspace.output_dir(profile) / "base-model"
    if model_id in ("embedded-tiny", "synthetic-4b") and not (built / TINY_MARKER).is_file():
        return (*_in_memory(profile, device), f"{model_id} with random weights, made in memory (not built yet)", None)
    path = built if model_id in ("embedded-tiny", "synthetic-4b") else _hub_snapshot(profile)
    if path is None:
        described = (f"random weights of {model_id}'s exact shapes, in memory (the checkpoint is not downloaded "
                     "yet; the time depends on shapes)")
        return (*_in_memory(profile, device), described, None)
    start = time.perf_counter()
    model, processor = workspace.load_variant(profile, path)
    _synchronize(device)
    return model, processor, str(path), time.perf_counter() - start


def _hub_snapshot(profile: dict[str, Any]) -> Path | None:
    """The hub model's local snapshot; None when not downloaded but of a known architecture (timed
    with random weights of its shapes); a ValueError naming the fix when neither."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from colquant.retriever.checkpoint import DEFAULT_MODEL_ID

    model = profile["model"]
    try:
        return Path(snapshot_download(model["id"], revision=model["revision"], local_files_only=True))
    except LocalEntryNotFoundError as error:
        if model["id"] == DEFAULT_MODEL_ID:
            return None
        raise ValueError(f"{model['id']} is not downloaded yet (step 01 downloads it), so it cannot be timed: run "
                         f"`hf download {model['id']}` first for an estimate") from error


def _in_memory(profile: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Any]:
    """Random weights of the profile's architecture (tiny, or the 4B's for synthetic-4b and the hub
    model), as `tiny.build` makes them, run as `colquant.load` runs a model."""
    from colquant.retriever.model import ColQwen3, ColQwen3Config
    from colquant.retriever.processing import ColQwen3Processor
    from colquant.retriever.tiny import build_tokenizer

    config = ColQwen3Config.tiny() if profile["model"]["id"] == "embedded-tiny" else ColQwen3Config.colqwen3_4b()  # 4B
    with torch.device(device):
        model = ColQwen3(config).to(getattr(torch, profile["model"]["dtype"])).eval()
    if device.type == "cuda":
        from colquant.kernels import accelerate_model

        accelerate_model(model)
    return model, ColQwen3Processor(build_tokenizer(), max_num_visual_tokens=profile["model"]["max_num_visual_tokens"])


def _pages(profile: dict[str, Any], workload: Workload, count: int) -> list[Any]:
    """The local corpus's own pages (rendered in memory), or blank pages of the workload's size."""
    from PIL import Image

    from colquant.evaluate.corpus_content import generate_contents
    from colquant.evaluate.page_render import render_page

    if workload.local_corpus:
        contents = generate_contents(random.Random(profile["corpus"]["seed"]), max(count, profile["corpus"]["n_pages"]))
        return [render_page(content, workload.page_size) for content in contents[:count]]
    return [Image.new("RGB", workload.page_size, "white")] * count


def _queries(profile: dict[str, Any], workload: Workload, count: int) -> list[str]:
    """The local corpus's queries, or questions of the workload's mean length."""
    from colquant.evaluate.corpus_content import generate_contents, make_queries

    if workload.local_corpus:
        rng = random.Random(profile["corpus"]["seed"])
        contents = generate_contents(rng, profile["corpus"]["n_pages"])
        texts = [query.text for query in make_queries(rng, contents, profile["corpus"]["n_queries"])]
        return (texts * (count // len(texts) + 1))[:count]
    chars = max(1, round(workload.query_chars or 0))
    return [("what was the total reported value in the table of this section " * (chars // 10 + 1))[:chars]] * count


def _vision_per_page(model: torch.nn.Module, processor: Any, pages: list[Any], device: torch.device) -> float:
    features = processor.process_images(pages)
    pixels, grid = features["pixel_values"].to(device), features["image_grid_thw"].to(device)
    with torch.inference_mode():
        if device.type == "cuda":
            model.vlm.model.get_image_features(pixels, grid, return_dict=True)
        seconds, _ = _per_item(lambda: model.vlm.model.get_image_features(pixels, grid, return_dict=True),
                               len(pages), device)
    return seconds


def _text_token_time(model: torch.nn.Module, profile: dict[str, Any], device: torch.device) -> float:
    """Seconds per token of one text forward of a calibration sample at the longest seqlen."""
    shape = (1, max(profile["calibration"]["seqlens"]))
    ids = torch.randint(0, 256, shape, device=device)  # byte tokens: every tokenizer here has them
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        if device.type == "cuda":
            model(input_ids=ids, attention_mask=mask)
        seconds, _ = _per_item(lambda: model(input_ids=ids, attention_mask=mask), ids.numel(), device)
    return seconds


def measure_in_subprocess(profile: dict[str, Any], workload: Workload) -> Rates:
    """`measure` in a child Python (this one never initialises the GPU); ValueError with its reason."""
    request = json.dumps({"profile": profile, "workload": asdict(workload)})
    child = subprocess.run([sys.executable, "-m", "colquant.research.warmup"], input=request, text=True,
                           capture_output=True, check=False)
    if child.returncode != 0:
        lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
        raise ValueError(lines[-1] if lines else f"the warm-up exited with status {child.returncode}")
    values = json.loads(child.stdout.strip().splitlines()[-1])
    return Rates(**{**values, "page_size": tuple(values["page_size"])})


def main() -> int:
    """The child's side: the profile and workload as JSON on stdin, the Rates as one JSON line on stdout."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    request = json.loads(sys.stdin.read())
    workload = Workload(**{**request["workload"], "page_size": tuple(request["workload"]["page_size"])})
    try:
        rates = measure(request["profile"], workload)
    except ValueError as error:
        print(f"ValueError: {error}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
