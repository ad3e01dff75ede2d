"""Where notebook 05's page time goes (issue 26), on one GPU: the mteb path against `encode_pages` on the
same pages and batch, a breakdown of the page path, and the saving of evaluating LM-only variants together.

Pages: `--pages` document pages of the real size (`--size`, default the synthetic-4b bench's 2048x2560):
the local corpus's layouts rendered at that size, encoded (`--format`, default JPEG) into a `datasets`
Image column as a ViDoRe corpus stores them (`DISTINCT` distinct pages, repeated), handed to the
encoder as mteb hands a corpus (`create_dataloader` of a ViDoRe task). Model: synthetic-4b (random
weights, the 4B's exact shapes) made in memory, BF16, with the CUDA fast paths (`accelerate_model`:
fused text tower, fast vision tower). Batch 16 (`--batch-size`), the profile's evaluation batch.

Timed, `--rounds` rounds alternating, each path called once untimed first:
- `encode_pages`: the decoded PIL pages through `encode_pages` and a warm `PagePipeline` (as the
  README's 32.4 pages/s were measured: the pages reach the workers by their fork);
- `mteb/loader`: `ColQuantEncoder` reading mteb's dataloader (every page decoded in one thread of
  this process, then sent decoded to a page worker): the path before issue 26;
- `mteb/stored`: `ColQuantEncoder` as it is (each page sent stored, decoded in a worker).
Breakdown per page: datasets' decode of a stored page and the processor on a decoded page (one
thread each; the workers share them out), the bytes a worker receives for a decoded and a stored
page and the time to pickle a decoded one, the GPU forward of prepared batches (CUDA events: the
ceiling of every path) and the vision tower's share of it, reading mteb's dataloader (decodes) and
reading the stored rows; a torch.profiler trace of one `mteb/stored` call gives the GPU's busy
share (kernel time over wall time) and the main process's top CPU ops.
Joint: BF16, fp8-lm and a second BF16 language model (what a W4A16 variant multiplies pages with:
its BF16 weight copies) share BF16's vision tower (the models are made with one seed: their towers
are equal, checked). GPU seconds per page and variant, together (`shared_vision.launch_shared_vision`)
against one by one (`encode._launch`), with the issue's bound (1 + 0.6 N) / N.

    python benchmarks/eval_pages_profile.py --out DIR                   # CUDA GPU, synthetic-4b
    python benchmarks/eval_pages_profile.py --out DIR --profile tiny --pages 8 --batch-size 4 --size 448x576
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mteb
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_bench import build_model  # a sibling script

from colquant.basics.files import write_json
from colquant.deploy.bench import prepare_fp8
from colquant.evaluate import mteb_encoder
from colquant.evaluate.corpus_content import generate_contents
from colquant.evaluate.mteb_rows import encoded_pages, stored_image_feature
from colquant.evaluate.page_render import render_page
from colquant.evaluate.shared_vision import launch_shared_vision
from colquant.kernels import accelerate_model
from colquant.research.params import load_profile
from colquant.retriever.encode import PagePipeline, _launch, encode_pages
from colquant.retriever.processing import ColQwen3Processor
from colquant.retriever.tiny import build_tokenizer

log = logging.getLogger("eval_pages_profile")
REVISION = "0123abcd"
TASK = "VidoreArxivQARetrieval"  # any ViDoRe task: only its metadata (modalities) shapes the dataloader
DISTINCT = 8
SHARE_BOUND = 0.6  # the target: N variants together cost at most (1 + 0.6 N) / N of N alone


class LoaderEncoder(mteb_encoder.ColQuantEncoder):
    """The encoder reading pages through mteb's dataloader (decoded in this process): the old path."""

    def _page_batches(self, inputs: Any) -> Any:
        return inputs


def document_pages(size: tuple[int, int], image_format: str) -> list[bytes]:
    """`DISTINCT` corpus pages rendered at `size` (width, height) and encoded."""
    pages = []
    for content in generate_contents(random.Random(0), DISTINCT):
        buffer = io.BytesIO()
        render_page(content, size).save(buffer, format=image_format)
        pages.append(buffer.getvalue())
    return pages


def page_dataset(encoded: list[bytes], count: int) -> Dataset:
    rows = [{"bytes": encoded[i % len(encoded)], "path": None} for i in range(count)]
    return Dataset.from_dict({"id": [f"page-{i}" for i in range(count)], "image": rows},
                             features=Features({"id": Value("string"), "image": ImageFeature()}))


def synchronized(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(run: Callable[[], Any], device: torch.device) -> float:
    synchronized(device)
    start = time.perf_counter()
    run()
    synchronized(device)
    return time.perf_counter() - start


def per_page(run: Callable[[], Any], items: list[Any]) -> float:
    """Mean seconds per item of `run(item)`, one thread."""
    start = time.perf_counter()
    for item in items:
        run(item)
    return (time.perf_counter() - start) / len(items)


def breakdown(model: torch.nn.Module, processor: Any, dataset: Dataset, loader: Any, batch: int,
              device: torch.device) -> dict[str, Any]:
    """Each part of a page's way to the model, measured alone."""
    feature = stored_image_feature(dataset)
    stored = list(encoded_pages(dataset.select(range(DISTINCT))))
    decoded = [feature.decode_example(row) for row in stored]
    prepared = {key: value.to(device) for key, value in processor.process_images(decoded[:1] * batch).items()}
    with torch.inference_mode():
        model(**prepared)
        forward = seconds_of(lambda: [model(**prepared) for _ in range(3)], device) / (3 * batch)
        vision = seconds_of(lambda: [model.vlm.model.get_image_features(
            prepared["pixel_values"], prepared["image_grid_thw"], return_dict=True) for _ in range(3)], device) / (3 * batch)
    pages = len(dataset)
    return {
        "decode_s": per_page(feature.decode_example, stored),
        "processor_s": per_page(lambda page: processor.process_images([page]), decoded),
        "stored_bytes": statistics.mean(len(row["bytes"]) for row in stored),
        "decoded_pickle_bytes": statistics.mean(len(pickle.dumps(page)) for page in decoded),
        "pickle_decoded_s": per_page(lambda page: pickle.loads(pickle.dumps(page)), decoded),
        "gpu_forward_s": forward,
        "vision_s": vision,
        "vision_share": vision / forward,
        "read_loader_s": seconds_of(lambda: [None for _ in loader], device) / pages,
        "read_stored_s": seconds_of(lambda: [None for _ in mteb_encoder.mteb_page_batches(loader)], device) / pages,
    }


def profiled(encode: Callable[[], Any], device: torch.device, top: int = 12) -> dict[str, Any]:
    """One call under torch.profiler: the GPU's kernel time over wall time, the top CPU ops."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as trace:
        wall = seconds_of(encode, device)
    events = trace.key_averages()
    kernels = sum(event.self_device_time_total for event in events) / 1e6
    ranked = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:top]
    return {"wall_s": wall, "gpu_kernel_s": kernels, "gpu_busy": kernels / wall,
            "top_cpu_ops": [{"name": event.key, "calls": event.count, "self_cpu_ms": event.self_cpu_time_total / 1e3,
                             "self_device_ms": event.self_device_time_total / 1e3} for event in ranked]}


def joint_saving(profile_name: str, model: torch.nn.Module, processor: Any, page: Any, batch: int,
                 device: torch.device, batches: int) -> dict[str, Any]:
    """GPU seconds per page and variant: BF16, fp8-lm, a second BF16 language model, together and alone."""
    fp8_lm = build_model(profile_name, device)
    prepare_fp8(fp8_lm, scope="lm", accelerate=device.type == "cuda")
    second = build_model(profile_name, device)
    with torch.no_grad():
        for parameter in second.language_model.parameters():
            parameter.mul_(1.01)  # another language model; the same vision tower
    if device.type == "cuda":
        accelerate_model(second)
    models = [model, fp8_lm, second]
    towers_equal = all(torch.equal(a, b) for other in models[1:]
                       for a, b in zip(model.visual.state_dict().values(), other.visual.state_dict().values()))
    features = dict(processor.process_images([page] * batch))
    indices = list(range(batch))

    def alone(one: torch.nn.Module) -> None:
        for _ in range(batches):
            _launch(one, features, indices, device)

    def together() -> None:
        for _ in range(batches):
            launch_shared_vision(models, features, indices, device)

    for run in (lambda: alone(model), lambda: alone(fp8_lm), lambda: alone(second), together):
        run()  # untimed: kernel choice, grid plans
    alone_s = [seconds_of(lambda one=one: alone(one), device) / (batches * batch) for one in models]
    together_s = seconds_of(together, device) / (batches * batch)
    n = len(models)
    return {"variants": ["bf16", "fp8-lm", "bf16 (second LM)"], "vision_towers_equal": towers_equal,
            "alone_s_per_page": alone_s, "together_s_per_page": together_s,
            "together_over_alone": together_s / sum(alone_s), "bound": (1 + SHARE_BOUND * n) / n}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for eval-pages-profile.json")
    parser.add_argument("--profile", default="synthetic-4b", choices=["synthetic-4b", "tiny"])
    parser.add_argument("--pages", type=int, default=96, help="pages per timed call")
    parser.add_argument("--batch-size", type=int, default=16, help="mteb's batch size (encode_kwargs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default=None, help="page WIDTHxHEIGHT (default: the profile's bench page_size, "
                        "2048x2560 for synthetic-4b)")
    parser.add_argument("--format", dest="image_format", default="JPEG", choices=["JPEG", "PNG"])
    parser.add_argument("--joint-batches", type=int, default=4, help="page batches timed for the joint saving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = load_profile(Path(__file__).resolve().parents[1] / "params" / f"{args.profile}.yaml", check_device=False)
    height, width = profile["bench"]["page_size"]  # the bench's pages are (height, width)
    size = tuple(int(n) for n in args.size.split("x")) if args.size else (width, height)
    model = build_model(args.profile, device)
    if device.type == "cuda":
        accelerate_model(model)
    processor = ColQwen3Processor(build_tokenizer(), max_num_visual_tokens=profile["model"]["max_num_visual_tokens"])
    metadata = mteb.get_task(TASK).metadata
    encoded = document_pages(size, args.image_format)
    dataset = page_dataset(encoded, args.pages)
    loader = create_dataloader(dataset, task_metadata=metadata, prompt_type=PromptType.document, batch_size=args.batch_size)
    decoded = list(dataset["image"])
    arguments = {"task_metadata": metadata, "hf_split": "test", "hf_subset": "default",
                 "prompt_type": PromptType.document, "show_progress_bar": False}
    old = LoaderEncoder(model, processor, "bf16", REVISION, replicas=())
    new = mteb_encoder.ColQuantEncoder(model, processor, "bf16", REVISION, replicas=())
    seconds: dict[str, list[float]] = {"encode_pages": [], "mteb/loader": [], "mteb/stored": []}
    with PagePipeline.for_model(model, processor=processor) as pipeline, old, new:
        paths = {"encode_pages": lambda: encode_pages(model, decoded, batch_size=args.batch_size, pipeline=pipeline),
                 "mteb/loader": lambda: old.encode(loader, **arguments),
                 "mteb/stored": lambda: new.encode(loader, **arguments)}
        for name, run in paths.items():
            log.info("%s: untimed call %.2f s", name, seconds_of(run, device))
        for round_number in range(args.rounds):
            for name, run in paths.items():
                seconds[name].append(seconds_of(run, device))
                log.info("round %d %s: %.1f pages/s", round_number, name, args.pages / seconds[name][-1])
        trace = profiled(paths["mteb/stored"], device)
    rates = {name: args.pages / statistics.median(times) for name, times in seconds.items()}
    parts = breakdown(model, processor, dataset, loader, args.batch_size, device)
    joint = joint_saving(args.profile, model, processor, decoded[0], args.batch_size, device, args.joint_batches)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "profile": args.profile, "pages": args.pages, "batch_size": args.batch_size, "page_size": size,
              "image_format": args.image_format, "page_workers": mteb_encoder.workers_per_model(device, 1),
              "rounds": args.rounds, "seconds": seconds, "pages_per_s": rates,
              "over_encode_pages": {name: rate / rates["encode_pages"] for name, rate in rates.items()},
              "breakdown": parts, "profile_mteb_stored": trace, "joint": joint}
    write_json(args.out / "eval-pages-profile.json", report)
    print(table(report))
    return 0


def table(report: dict[str, Any]) -> str:
    rates, over, parts, joint = report["pages_per_s"], report["over_encode_pages"], report["breakdown"], report["joint"]
    lines = [f"{'path':14s} {'pages/s':>8s} {'x encode_pages':>15s}",
             *(f"{name:14s} {rate:8.1f} {over[name]:15.2f}" for name, rate in rates.items()),
             f"target mteb/stored >= 0.85 x encode_pages: {'met' if over['mteb/stored'] >= 0.85 else 'NOT met'}",
             (f"per page, ms: decode {parts['decode_s'] * 1e3:.1f}, processor {parts['processor_s'] * 1e3:.1f} (one "
              f"thread each), pickle decoded {parts['pickle_decoded_s'] * 1e3:.1f} ({parts['decoded_pickle_bytes'] / 2**20:.1f}"
              f" MiB vs {parts['stored_bytes'] / 2**20:.2f} MiB stored), GPU forward {parts['gpu_forward_s'] * 1e3:.1f} "
              f"(vision {parts['vision_share']:.0%}), read loader {parts['read_loader_s'] * 1e3:.1f}, read stored "
              f"{parts['read_stored_s'] * 1e3:.2f}; GPU busy in mteb/stored {report['profile_mteb_stored']['gpu_busy']:.0%}"),
             (f"joint, {len(joint['variants'])} LM-only variants: {joint['together_over_alone']:.2f} of one by one "
              f"(bound {joint['bound']:.2f}: {'met' if joint['together_over_alone'] <= joint['bound'] else 'NOT met'}); "
              f"towers equal {joint['vision_towers_equal']}"),
             (f"{report['device']}, synthetic {report['profile']}, {report['pages']} {report['image_format']} pages "
              f"{report['page_size'][0]}x{report['page_size'][1]}, batch {report['batch_size']}, "
              f"{report['page_workers']} page workers")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
