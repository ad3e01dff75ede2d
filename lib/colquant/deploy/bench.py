"""`python -m colquant bench <profile>`: queries and pages per second, BF16 beside 4-bit.

A short client of the real code, as nanoGPT's bench.py is of its model. It builds (or reuses) the
profile's model through `workspace.base_model` (random weights for the synthetic profiles: speed
and memory are real, quality is not), loads it with `colquant.load`, makes its inputs with the
model's own processor, and reads what to time from the profile's `bench:` section. On CUDA the
kernel checks of `colquant.kernels.checks` run first. Then for each precision (`PREPARE`) the model
is loaded afresh, prepared, checked against transformers' BF16 forward, and timed on queries and
on pages twice: from ready tensors (with transformers' eager vision tower and with the fast one)
and end to end from PIL images through `encode_pages` with a warm `PagePipeline` (the steady state
of an indexing run; the first call, starting the workers, is reported beside it), which says
whether the GPU or the preprocessing bounds it. One table, one JSON.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from colquant.basics import measure
from colquant.basics.files import write_text
from colquant.deploy.bench_report import check_targets, format_report, summary, targets_met
from colquant.inference.loading import load
from colquant.kernels import checks
from colquant.kernels.fp8_dispatch import attach as attach_fp8_kernels
from colquant.quantize.fp8_variants import quantize_fp8
from colquant.research import workspace
from colquant.retriever import encode, fp8

logger = logging.getLogger("colquant.deploy.bench")
QUERY_SOURCE = "Unit {i}, year {y}: what were the revenue, operating margin and headcount of this business unit?"


def prepare_eager(model: nn.Module, profile: dict) -> dict:
    return dict(forward="transformers eager")  # the baseline


def prepare_bf16(model: nn.Module, profile: dict) -> dict:
    """The fused text tower (q/k/v and gate/up fused, Triton ops, CUDA-graph queries)."""
    from colquant.kernels import accelerate_model

    return dict(accelerate_model(model)._colquant_acceleration)


def prepare_w4a16(model: nn.Module, profile: dict) -> dict:
    """The text tower's linears RTN W4 (auto-round's rounding, symmetric), then the fused tower."""
    from colquant.kernels import find_text_model, quantize_linears_rtn

    quantized = quantize_linears_rtn(find_text_model(model), profile["quantization"]["group_size"])
    return dict(prepare_bf16(model, profile), rtn_linears=quantized)


def memory_first_weights(model: nn.Module, profile: dict) -> dict:
    """The memory-first 4-bit model's weights, in place: the text tower's linears RTN W4 (as `w4a16`)
    and the token embeddings int8 per row (`colquant.load(..., embeddings="int8")`)."""
    from colquant.kernels import find_text_model, quantize_linears_rtn
    from colquant.kernels.embedding import quantize_embeddings

    quantized = quantize_linears_rtn(find_text_model(model), profile["quantization"]["group_size"])
    return dict(rtn_linears=quantized, int8_embeddings_freed_mib=round(quantize_embeddings(model) / 2**20, 1))


def prepare_w4a16_memory_first(model: nn.Module, profile: dict) -> dict:
    """The memory-first 4-bit model: as `w4a16`, keeping no BF16 copy of any layer, with the token
    embeddings in int8 per row (`colquant.load(..., bf16_copy=False, embeddings="int8")`)."""
    from colquant.kernels import accelerate_model

    weights = memory_first_weights(model, profile)
    return dict(accelerate_model(model, bf16_copy=False)._colquant_acceleration, **weights)


def prepare_w4a8(model: nn.Module, profile: dict) -> dict:
    """The memory-first 4-bit model run as W4A8 (`colquant.load(..., activations="fp8", embeddings="int8")`):
    the weights of `w4a16-memory`, every 4-bit layer on its one W4A8 copy (no BF16 copy), fed e4m3 rows
    by the fused tower's producers: vLLM's CUTLASS W4A8 on CUDA, refused where it cannot run, and its
    dequantized reference on CPU (`info["w4a8"]["runs"]` says which)."""
    from colquant.kernels import accelerate_model
    from colquant.kernels.w4a8 import GROUP_SIZE, convert_model, device_problem

    group_size = profile["quantization"]["group_size"]
    problem = device_problem(next(model.parameters()).device, model.dtype)
    if problem is None and group_size != GROUP_SIZE:
        problem = f"quantization.group_size is {group_size}; CUTLASS W4A8 takes group size {GROUP_SIZE} only"
    if problem:
        raise RuntimeError(f"bench precision w4a8 cannot run: {problem}")
    weights = memory_first_weights(model, profile)
    w4a8 = convert_model(model, fuse=True)
    return dict(accelerate_model(model)._colquant_acceleration, **weights, w4a8=w4a8)


def prepare_fp8(model: nn.Module, profile: dict[str, Any] | None = None, *, scope: str = "lm",
                accelerate: bool = True, accumulation: str = fp8.DEFAULT_ACCUMULATION) -> dict[str, Any]:
    """The FP8 precisions: quantize ``scope`` of a loaded BF16 model in place, its GEMMs on the fused FP8
    kernels (where they run) accumulating ``accumulation``-ly and, where ``accelerate``, the fused text
    tower (its FP8 q/k/v and gate/up fused; CUDA graphs for queries) and, on CUDA, the fast vision tower
    (whose GEMMs call the FP8 vision layers in fp8-all)."""
    fp8.check_accumulation(accumulation)
    names = quantize_fp8(model, scope)
    fp8.set_accumulation(model, accumulation)
    attach_fp8_kernels(model)
    info: dict[str, Any] = dict(scope=scope, fp8_layers=len(names), calibration=fp8.NO_CALIBRATION,
                                accumulation=accumulation)
    if accelerate:
        from colquant.kernels import accelerate_model

        acceleration = accelerate_model(model)._colquant_acceleration
        info["fused_projections"] = acceleration["qkv"] + acceleration["gate_up"]
    return info


PREPARE: dict[str, Callable[[nn.Module, dict], dict]] = {
    "bf16-eager": prepare_eager, "bf16": prepare_bf16, "w4a16": prepare_w4a16,
    "w4a16-memory": prepare_w4a16_memory_first, "w4a8": prepare_w4a8,
    "fp8-lm": partial(prepare_fp8, scope="lm"), "fp8-all": partial(prepare_fp8, scope="lm+vision"),
    # the FP8 variants with fp32-promoted accumulation, beside the default fast one (fp8.ACCUMULATIONS)
    "fp8-lm-precise": partial(prepare_fp8, scope="lm", accumulation="precise"),
    "fp8-all-precise": partial(prepare_fp8, scope="lm+vision", accumulation="precise"),
}


def load_model(profile: dict, device: torch.device) -> tuple[nn.Module, Any]:
    """The profile's model and processor, built on first use by `workspace.base_model`."""
    path = workspace.base_model(profile)
    return load(path, device=device, accelerate=False, max_num_visual_tokens=profile["model"]["max_num_visual_tokens"])


def query_texts(tokenizer: Any, count: int, tokens: int, ragged: bool = False) -> list[str]:
    """`count` distinct query texts of `tokens` tokens (fewer, down to half, when `ragged`)."""
    texts = []
    for i in range(count):
        ids = tokenizer(" ".join(QUERY_SOURCE.format(i=i + j, y=2000 + i % 25) for j in range(8)))["input_ids"]
        keep = tokens - (i * 7) % max(1, tokens // 2) if ragged else tokens
        texts.append(tokenizer.decode(ids[:keep]).strip())
    return texts


def page_images(size: list[int], count: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB pages of (height, width) pixels: resizing costs what a real page's does."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).embeddings.float().cpu()


def forward(model: nn.Module, batch: dict) -> Any:
    """One timed forward, under torch.inference_mode as `colquant.encode_*` runs it (no autograd
    bookkeeping in transformers' eager layers)."""
    with torch.inference_mode():
        return model(**batch)


def time_calls(fn: Callable[[], Any], device: torch.device, reps: int, min_time_s: float) -> dict:
    """Median wall time of `fn` (after one warm-up call) and the peak memory while timing it."""
    fn()
    measure.synchronize(device)
    measure.reset_peak_memory(device)
    times = measure.call_times(fn, device, calls=reps, min_time_s=min_time_s)
    peak = measure.peak_memory(device)[0] / measure.MIB
    return dict(ms=statistics.median(times) * 1e3, ms_min=min(times) * 1e3, ms_max=max(times) * 1e3,
                peak_mib=peak, reps=len(times))


class Bench:
    """One run: settings, device, rows; each method times one kind of work for the loaded model."""

    def __init__(self, profile: dict, device: torch.device) -> None:
        self.profile, self.settings, self.device = profile, profile["bench"], device
        self.rows: list[dict] = []

    def timed(self, fn: Callable[[], Any], items: int, **labels: Any) -> dict | None:
        """Time `fn` and add a row; out of memory becomes a row saying so."""
        try:
            timing = time_calls(fn, self.device, self.settings["reps"], self.settings["min_time_s"])
        except torch.OutOfMemoryError as error:
            self.rows.append(dict(labels, error=f"out of memory: {str(error)[:200]}"))
            logger.warning("%s: out of memory", labels)
            torch.cuda.empty_cache()
            return None
        row = dict(labels, **timing, items_per_s=items / timing["ms"] * 1e3)
        self.rows.append(row)
        logger.info("%-10s %-6s %-9s B=%-5d %9.2f ms %9.1f /s  peak %8.0f MiB", labels["precision"],
                    labels.get("vision", "-"), labels["work"], labels["batch"], row["ms"], row["items_per_s"],
                    row["peak_mib"])
        return row

    def queries(self, model: nn.Module, processor: Any, precision: str) -> None:
        key = "eager_query_batches" if precision == "bf16-eager" else "query_batches"
        for size in self.settings[key]:
            texts = query_texts(processor.tokenizer, size, self.settings["query_tokens"])
            batch = processor.process_queries(texts).to(self.device)
            self.timed(lambda: forward(model, batch), size, precision=precision, work="query", batch=size,
                       tokens_per_item=batch["input_ids"].shape[1])

    def pages(self, model: nn.Module, processor: Any, precision: str) -> None:
        from colquant.kernels.fast_vision import accelerate_vision, restore_vision

        for vision in ["eager"] if precision == "bf16-eager" else self.settings["vision"]:
            if vision == "fast" and not accelerate_vision(model)["installed"]:
                self.rows.append(dict(precision=precision, vision=vision, work="page",
                                      error="fast vision tower unavailable here (see log)"))
                continue
            if vision == "eager":
                restore_vision(model)
            for size in self.settings["page_batches"]:
                self.page_batch(model, processor, precision, vision, size)

    def page_batch(self, model: nn.Module, processor: Any, precision: str, vision: str, size: int) -> None:
        """Pages from ready tensors, then end to end from PIL images through `encode_pages`, then the
        page preparation alone; the end-to-end row says which of the two bounds it."""
        labels = dict(precision=precision, vision=vision, batch=size)
        ready = processor.process_images(page_images(self.settings["page_size"], size)).to(self.device)
        tensors = self.timed(lambda: forward(model, ready), size, work="page", **labels,
                             tokens_per_item=ready["input_ids"].shape[1])
        if tensors is not None and self.settings["end_to_end_batches"] > 0:
            self.pages_from_pil(model, processor, labels, tensors)

    def pages_from_pil(self, model: nn.Module, processor: Any, labels: dict, tensors: dict) -> None:
        """The steady state of an indexing run: a `PagePipeline` kept across calls (as an indexer
        keeps it), each timed call `end_to_end_batches` batches of `batch` distinct PIL pages (the
        same pages each batch: every page is still decoded, resized and encoded). The first call,
        which also starts the workers, is reported beside it as `first_call_ms`."""
        size, batches = labels["batch"], self.settings["end_to_end_batches"]
        images = page_images(self.settings["page_size"], size, seed=1) * batches
        workers = self.settings["workers"]
        with encode.PagePipeline.for_model(model, processor=processor, num_workers=workers) as pipeline:
            run = partial(encode.encode_pages, model, images, batch_size=size, pipeline=pipeline)
            [first_call_s] = measure.call_times(run, self.device, calls=1)
            end_to_end = self.timed(run, len(images), work="page-e2e", **labels)
            positions = list(range(len(images)))
            prepare_only = [positions[start : start + size] for start in range(0, len(images), size)]
            cpu = self.timed(lambda: collections.deque(pipeline.prepared(images, prepare_only), maxlen=0),
                             len(images), work="preprocess", **labels)
        if end_to_end is not None and cpu is not None:
            bound = "GPU" if tensors["items_per_s"] <= cpu["items_per_s"] else "CPU preprocessing"
            end_to_end.update(over_tensors=end_to_end["items_per_s"] / tensors["items_per_s"], bound=bound,
                              workers=workers, pages_per_call=len(images), first_call_ms=first_call_s * 1e3)

    def precision(self, precision: str, reference: dict) -> dict:
        """Load, prepare, check against transformers' forward, time; returns the checks."""
        if precision not in PREPARE:
            raise ValueError(f"bench.precisions: unknown precision {precision!r}; known: {', '.join(PREPARE)}")
        model, processor = load_model(self.profile, self.device)
        info = PREPARE[precision](model, self.profile)
        if precision != "bf16-eager" and "fast" in self.settings["vision"]:  # checked with the tower it times
            from colquant.kernels.fast_vision import accelerate_vision

            info["vision"] = accelerate_vision(model)
        logger.info("%s: %s", precision, info)
        found = {f"{precision}_vs_transformers_{work}": checks.compare(embed(model, batch), reference[work][1],
                                                                        batch["attention_mask"].cpu())
                 for work, (batch, _) in reference.items()}
        if precision.startswith(("w4a16", "w4a8")):  # the 4-bit kernels against their torch references
            from colquant.kernels import force_reference

            with force_reference():
                dequantized = {work: embed(model, batch) for work, (batch, _) in reference.items()}
            found.update({f"{precision}_vs_dequant_reference_{work}": checks.compare(
                embed(model, batch), dequantized[work], batch["attention_mask"].cpu()) for work, (batch, _)
                in reference.items()})
        self.queries(model, processor, precision)
        self.pages(model, processor, precision)
        del model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return found

    def reference(self) -> tuple[dict, Any]:
        """Ragged queries and one page, embedded by transformers' eager BF16 forward; the text config."""
        model, processor = load_model(self.profile, self.device)
        texts = query_texts(processor.tokenizer, 4, self.settings["query_tokens"], ragged=True)
        batches = dict(queries=processor.process_queries(texts).to(self.device),
                       page=processor.process_images(page_images(self.settings["page_size"], 1, seed=2)).to(self.device))
        return {work: (batch, embed(model, batch)) for work, batch in batches.items()}, model.config.text_config


def run_bench(profile: dict, out_json: str | Path | None = None, *, device: str | None = None):
    """Run the profile's benchmark; returns the BF16/4-bit summary table and writes the JSON."""
    from colquant.kernels import backend_report

    check_targets(profile["bench"]["targets"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = Bench(profile, dev)
    report: dict[str, Any] = dict(profile=profile["profile"], settings=profile["bench"], env=backend_report(dev))
    report["env"].update(memory_kind=measure.memory_kind(dev), cpus=os.cpu_count())
    reference, text_config = bench.reference()
    if dev.type == "cuda" and profile["bench"]["kernel_checks"] and report["env"]["backend"] == "triton":
        torch.backends.cuda.matmul.allow_tf32 = False
        report.update(checks.kernel_checks(text_config, profile["quantization"]["group_size"], dev,
                                           profile["bench"]["check_ms"]))
    report["model_checks"] = {}
    for precision in profile["bench"]["precisions"]:
        report["model_checks"].update(bench.precision(precision, reference))
    table = summary(bench.rows)
    report.update(results=bench.rows, table=table.to_dict(orient="records"),
                  targets_met=targets_met(bench.rows, profile["bench"]["targets"]))
    if out_json:
        write_text(Path(out_json), json.dumps(report, indent=1, default=str) + "\n")
    logger.info("\n%s", format_report(table, bench.rows, report["targets_met"]))
    return table


def build_parser() -> argparse.ArgumentParser:
    """`colquant bench`'s options (the command line resolves the profile and calls `run_with_options`)."""
    parser = argparse.ArgumentParser(prog="colquant bench", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="synthetic-4b", help="a profile name from params/ or a YAML path")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench-<profile>.json)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--query-batches", default=None, help="comma list, overrides bench.query_batches")
    parser.add_argument("--page-batches", default=None, help="comma list, overrides bench.page_batches")
    parser.add_argument("--precisions", default=None, help="comma list, overrides bench.precisions")
    parser.add_argument("--vision", default=None, help="comma list (eager,fast), overrides bench.vision")
    parser.add_argument("--no-kernel-checks", action="store_true", help="skip the GEMM and fused-op checks")
    return parser


def run_with_options(profile: dict, options: argparse.Namespace):
    """`run_bench` on `profile` with the command line's overrides of its `bench:` section applied."""
    for option, key in ((options.query_batches, "query_batches"), (options.page_batches, "page_batches")):
        if option is not None:
            profile["bench"][key] = [int(x) for x in option.split(",") if x]
    for option, key in ((options.precisions, "precisions"), (options.vision, "vision")):
        if option:
            profile["bench"][key] = option.split(",")
    if options.no_kernel_checks:
        profile["bench"]["kernel_checks"] = False
    return run_bench(profile, options.out or f"benchmarks/results/bench-{profile['profile']}.json", device=options.device)
