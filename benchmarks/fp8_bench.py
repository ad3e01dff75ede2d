"""FP8 in one run: the GEMM comparison and fused-producer sweep (CUDA), then a random-weight ColQwen3
of the profile's exact shapes encoding queries and pages in BF16, fp8-lm and fp8-all, with token cosine
and MaxSim rank agreement against BF16 (and W4A16 RTN's beside them).

    python benchmarks/fp8_bench.py --out DIR                          # synthetic-4b, a CUDA GPU (sm89+)
    python benchmarks/fp8_bench.py --out DIR --profile tiny --skip-gemm   # the same steps on CPU, tiny

Every precision runs the fused text tower (`accelerate_model`: fused q/k/v and gate/up, CUDA graphs
for queries), whose RMSNorm / silu·mul kernels hand FP8 layers pre-quantized rows; pages are timed
with transformers' eager vision tower and with the fast one (`--vision`), whose FP8 GEMMs (fp8-all)
get their inputs from LayerNorm+quant and GELU+quant kernels; the vision tower alone is timed beside
each page row, so a page's time splits into vision and language model.
H200 results and notes: benchmarks/results/fp8-bench-h200-*, benchmarks/fp8-notes.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from colquant.deploy import bench
from colquant.kernels import accelerate_model, find_text_model, fp8_dispatch, quantize_linears_rtn, reset_graphs
from colquant.kernels.checks import compare
from colquant.quantize.fp8_variants import quantize_fp8
from colquant.research import workspace
from colquant.research.params import load_profile
from colquant.retriever.model import ColQwen3, ColQwen3Config
from colquant.retriever.processing import ColQwen3Processor
from colquant.retriever.tiny import build_tokenizer

log = logging.getLogger("fp8_bench")
CONFIGS = {"synthetic-4b": ColQwen3Config.colqwen3_4b, "tiny": ColQwen3Config.tiny}


def build_model(profile_name: str, device: torch.device) -> nn.Module:
    """Random weights in memory (seed 0; normal(0, 0.02) matrices, unit norms: transformers' init)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = ColQwen3(CONFIGS[profile_name]()).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02)
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    return model


def rank_agreement(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean Kendall tau (pairs of pages ordered alike) per query."""
    top1 = (scores.argmax(1) == reference.argmax(1)).float().mean().item()
    a = torch.sign(scores[:, :, None] - scores[:, None, :])
    b = torch.sign(reference[:, :, None] - reference[:, None, :])
    n = scores.shape[1]
    return {"top1_agreement": top1, "kendall_tau": ((a * b).sum((1, 2)) / (n * (n - 1))).mean().item()}


class Fp8Bench:
    """Inputs made once by the processor; each method embeds or times the model it is given."""

    def __init__(self, profile: dict[str, Any], device: torch.device) -> None:
        self.settings, self.device = profile["bench"], device
        self.processor = ColQwen3Processor(build_tokenizer(), max_num_visual_tokens=profile["model"]["max_num_visual_tokens"])
        texts = bench.query_texts(self.processor.tokenizer, 64, self.settings["query_tokens"], ragged=True)
        self.fidelity_inputs = {
            "query": self.processor.process_queries(texts).to(device),
            "page": self.processor.process_images(bench.page_images(self.settings["page_size"], 8, seed=2)).to(device),
        }

    def embeddings(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {work: bench.embed(model, batch) for work, batch in self.fidelity_inputs.items()}

    def fidelity(self, model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
        from colquant.retriever.scoring import score

        found = self.embeddings(model)
        row = {}
        for work, batch in self.fidelity_inputs.items():
            row |= {f"{work}_{k}": v for k, v in compare(found[work], reference[work], batch["attention_mask"].cpu()).items()}
        return row | rank_agreement(score(found["query"], found["page"]), score(reference["query"], reference["page"]))

    def time(self, model: nn.Module, label: str, query_batches: list[int], vision_modes: list[str],
             page_batches: list[int]) -> list[dict]:
        from colquant.kernels.fast_vision import accelerate_vision, restore_vision

        rows = []
        for size in query_batches:
            texts = bench.query_texts(self.processor.tokenizer, size, self.settings["query_tokens"])
            batch = self.processor.process_queries(texts).to(self.device)
            rows.append(self._row(lambda: model(**batch), size, precision=label, work="query", batch=size))
            reset_graphs(model)
        for vision in vision_modes:
            if vision == "fast" and not accelerate_vision(model)["installed"]:
                continue
            if vision == "eager":
                restore_vision(model)
            for size in page_batches:
                pages = self.processor.process_images(bench.page_images(self.settings["page_size"], size)).to(self.device)
                rows.append(self._row(lambda: model(**pages), size, precision=label, work="page", vision=vision, batch=size))
                encode = model.vlm.model.get_image_features
                rows.append(self._row(lambda: encode(pages["pixel_values"], pages["image_grid_thw"]), size, precision=label,
                                      work="vision tower", vision=vision, batch=size))
        return rows

    def _row(self, fn, items: int, **labels: Any) -> dict:
        with torch.inference_mode():
            timing = bench.time_calls(fn, self.device, self.settings["reps"], self.settings["min_time_s"])
        row = dict(labels, **timing, items_per_s=items / timing["ms"] * 1e3)
        log.info("%s", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})
        return row


def w4a16_fidelity(profile_name: str, runner: Fp8Bench, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same random model with RTN W4 g128 decoder Linears (transformers' forward): W4A16's error beside FP8's."""
    model = build_model(profile_name, runner.device)
    quantize_linears_rtn(find_text_model(model), 128)
    row = runner.fidelity(model, reference)
    del model
    return row


def table(rows: list[dict], fidelity: dict[str, dict]) -> str:
    """Markdown: time per batch and ratio to BF16 for each work/vision/batch; then the fidelity table."""
    by = {(r["precision"], r["work"], r.get("vision", "-"), r["batch"]): r for r in rows}
    lines = ["| work | vision | batch | bf16 ms | fp8-lm ms (×) | fp8-all ms (×) | fp8-all items/s |", "|---|---|---|---|---|---|---|"]
    for (precision, work, vision, batch), base in by.items():
        if precision != "bf16":
            continue
        cells = []
        for label in ("fp8-lm", "fp8-all"):
            other = by.get((label, work, vision, batch))
            cells.append(f"{other['ms']:.2f} ({base['ms'] / other['ms']:.2f})" if other else "n/a")
        best = by.get(("fp8-all", work, vision, batch))
        lines.append(f"| {work} | {vision} | {batch} | {base['ms']:.2f} | {cells[0]} | {cells[1]} | "
                     f"{best['items_per_s']:.1f} |" if best else f"| {work} | {vision} | {batch} | {base['ms']:.2f} | "
                     f"{cells[0]} | {cells[1]} | n/a |")
    lines += ["", "| variant | query token cos mean / min | page token cos mean / min | MaxSim top-1 | Kendall tau |",
              "|---|---|---|---|---|"]
    for label, row in fidelity.items():
        lines.append(f"| {label} | {row['query_cos_mean']:.4f} / {row['query_cos_min']:.4f} | {row['page_cos_mean']:.4f} / "
                     f"{row['page_cos_min']:.4f} | {row['top1_agreement']:.3f} | {row['kendall_tau']:.3f} |")
    return "\n".join(lines)


def gemm_section(device: torch.device, config: ColQwen3Config) -> dict[str, Any]:
    from colquant.kernels.fp8_ops import gemm_comparison, lm_shapes, producer_sweep, summarize, vision_shapes

    rows = gemm_comparison(lm_shapes(config.text_config) + vision_shapes(config.vision_config), device)
    log.info("GEMM comparison\n%s", summarize(rows))
    producers = producer_sweep(device)
    log.info("fused producers (M=43008):\n%s", "\n".join(map(str, producers)))
    return {"gemm": rows, "producers": producers, "gemm_table": summarize(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--profile", choices=sorted(CONFIGS), default="synthetic-4b")
    parser.add_argument("--skip-gemm", action="store_true", help="skip the GEMM comparison and the producer sweep")
    parser.add_argument("--query-batches", type=int, nargs="*", default=[1, 64, 1024])
    parser.add_argument("--no-w4", action="store_true", help="skip W4A16 RTN's fidelity")
    parser.add_argument("--vision", nargs="+", choices=["eager", "fast"], default=["eager", "fast"])
    parser.add_argument("--page-batches", type=int, nargs="*", default=None,
                        help="default: the profile's bench.page_batches")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = load_profile(workspace.REPO_ROOT / "params" / f"{args.profile}.yaml", check_device=False)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "fp8_kernels": fp8_dispatch.fp8_unavailable_reason(device) or "yes"}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    if not args.skip_gemm:
        report |= gemm_section(device, CONFIGS[args.profile]())
    runner = Fp8Bench(profile, device)
    model = build_model(args.profile, device)
    reference = runner.embeddings(model)
    report["fidelity"] = {} if args.no_w4 else {"w4a16-rtn": w4a16_fidelity(args.profile, runner, reference)}
    accelerate_model(model)
    page_batches = profile["bench"]["page_batches"] if args.page_batches is None else args.page_batches
    rows = runner.time(model, "bf16", args.query_batches, args.vision, page_batches)
    for label, scope in (("fp8-lm", "lm"), ("fp8-all", "lm+vision")):
        quantize_fp8(model, scope)  # fp8-all adds the vision tower to fp8-lm's layers
        fp8_dispatch.attach(model)
        reset_graphs(model)
        report["fidelity"][label] = runner.fidelity(model, reference)
        log.info("%s fidelity: %s", label, report["fidelity"][label])
        rows += runner.time(model, label, args.query_batches, args.vision, page_batches)
    report["models"] = rows
    summary = table(rows, report["fidelity"]) + ("\n\n" + report["gemm_table"] if "gemm_table" in report else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8-bench.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "fp8-bench.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
