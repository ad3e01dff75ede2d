"""GPU scoring benchmark: 1,000 queries against 100,000 compressed pages, per compression setting.

Builds a random index of unit vectors directly in each storage format of `colquant.inference.compress`
(page lengths drawn uniformly in [--min-tokens, --max-tokens], as ColQwen3 pages of up to 1,280
visual tokens; pooled settings store tokens // N vectors per page, random too: this measures
scoring and memory, not the pooling itself, which runs once at indexing time), scores all queries
against all pages with `score_compressed`, and writes pages/s and memory per setting as JSON.
The `none` setting (bf16 vectors as the model gives them) is the float baseline.

    PYTHONPATH=$PWD/lib python3 benchmarks/score_compressed.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from colquant.inference.compress import (
    BinaryPages,
    CompressedPages,
    CompressionSetting,
    FloatPages,
    Int8Pages,
    pack_signs,
    parse_setting,
    quantize_int8,
    score_compressed,
)

log = logging.getLogger("score_compressed")
ROWS_PER_CHUNK = 4_000_000


def random_index(setting: CompressionSetting, lengths: torch.Tensor, dim: int, device: torch.device,
                 generator: torch.Generator) -> CompressedPages:
    """Unit vectors stored as `setting` says, generated chunk by chunk into preallocated tensors on `device`."""
    stored = lengths // setting.pool_factor if setting.pool_factor else lengths
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), stored.clamp(min=1).cumsum(0)]).to(device)
    rows = int(offsets[-1])
    if setting.quantization == "int8":
        index: CompressedPages = Int8Pages(offsets=offsets, dim=dim, codes=torch.empty(rows, dim, dtype=torch.int8, device=device),
                                           scales=torch.empty(rows, device=device))
    elif setting.quantization == "binary":
        index = BinaryPages(offsets=offsets, dim=dim, bits=torch.empty(rows, (dim + 7) // 8, dtype=torch.uint8, device=device))
    else:
        index = FloatPages(offsets=offsets, dim=dim, vectors=torch.empty(rows, dim, dtype=torch.bfloat16, device=device))
    for start in range(0, rows, ROWS_PER_CHUNK):
        stop = min(rows, start + ROWS_PER_CHUNK)
        vectors = torch.nn.functional.normalize(torch.randn(stop - start, dim, device=device, generator=generator), dim=-1)
        if isinstance(index, Int8Pages):
            index.codes[start:stop], index.scales[start:stop] = quantize_int8(vectors)
        elif isinstance(index, BinaryPages):
            index.bits[start:stop] = pack_signs(vectors)
        else:
            index.vectors[start:stop] = vectors
        del vectors
    return index


def time_scoring(queries: torch.Tensor, index: CompressedPages, similarity_elements: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    scores = score_compressed(queries, index, compute_dtype=torch.bfloat16, similarity_elements=similarity_elements)
    torch.cuda.synchronize()
    return time.perf_counter() - start, scores


def measure(setting: CompressionSetting, queries: torch.Tensor, lengths: torch.Tensor, dim: int,
            similarity_elements: int, seed: int) -> dict[str, Any]:
    device = queries.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    index = random_index(setting, lengths, dim, device, torch.Generator(device).manual_seed(seed))
    torch.cuda.reset_peak_memory_stats(device)
    warmup = min(len(index), 2_000)
    sample = type(index)(**{**{k: getattr(index, k) for k in index.__dataclass_fields__},
                            "offsets": index.offsets[: warmup + 1]})
    time_scoring(queries, sample, similarity_elements)
    seconds, scores = time_scoring(queries, index, similarity_elements)
    result = {
        "setting": setting.name,
        "pages": len(index),
        "stored_vectors": int(index.offsets[-1]),
        "index_bytes": index.nbytes,
        "bytes_per_page": index.bytes_per_page,
        "score_seconds": seconds,
        "pages_per_s": len(index) / seconds,
        "query_page_pairs_per_s": len(index) * queries.shape[0] / seconds,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) - before,
        "scores_finite": bool(torch.isfinite(scores).all()),
    }
    del index, sample, scores
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--min-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=1_280)
    parser.add_argument("--dim", type=int, default=320)
    parser.add_argument("--settings", default="none,binary,int8,pool3+binary,pool3")
    parser.add_argument("--similarity-elements", type=int, default=500_000_000)
    parser.add_argument("--time-budget-s", type=float, default=150.0, help="settings not started by then are skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark measures GPU scoring: no CUDA device is visible")
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(args.seed)
    queries = torch.nn.functional.normalize(
        torch.randn(args.queries, args.query_tokens, args.dim, device=device, generator=generator), dim=-1)
    lengths = torch.randint(args.min_tokens, args.max_tokens + 1, (args.pages,),
                            generator=torch.Generator().manual_seed(args.seed))
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "compute_dtype": "bfloat16",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mean_page_tokens": float(lengths.float().mean()),
        "results": [],
        "skipped": [],
    }
    started = time.perf_counter()
    for name in args.settings.split(","):
        if time.perf_counter() - started > args.time_budget_s:
            report["skipped"].append(name)
            continue
        result = measure(parse_setting(name), queries, lengths, args.dim, args.similarity_elements, args.seed + 1)
        log.info("%s", json.dumps(result))
        report["results"].append(result)
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        partial.replace(args.out)


if __name__ == "__main__":
    main()
