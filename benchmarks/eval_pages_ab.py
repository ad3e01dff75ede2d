"""ViDoRe page encoding through mteb's encoder, A/B: main's `ColQuantEncoder` (each mteb batch through
the processor in the thread that runs the model) against this checkout's (a `PagePipeline` per model:
pages prepared in worker processes while the GPU encodes, mteb's dataloader read ahead by a thread).

The pages are a `datasets.Dataset` with an "image" column of encoded random pages (JPEG, or PNG with
`--format PNG`), given to the encoder as mteb gives a corpus: `mteb`'s `create_dataloader` for a
ViDoRe task, so decoding happens in the dataloader as in an evaluation. The model has random
weights at the profile's exact shapes (`fp8_bench.build_model`: synthetic-4b is ColQwen3-4B), BF16,
with the project's CUDA fast paths (`accelerate_model`: fused text tower and fast vision tower).
`--batches-per-call 4,8` times one new encoder per value beside the old one. Each encoder encodes
once to warm up (CUDA graphs, kernel tuning, the new one's worker start), then
they alternate, `--rounds` times each, so a drift of the GPU does not read as a difference.

    python benchmarks/eval_pages_ab.py --out DIR                      # synthetic-4b on CUDA
    python benchmarks/eval_pages_ab.py --out DIR --profile tiny --pages 12 --batch-size 4   # CPU check

The old encoder is `git show main:lib/colquant/mteb_encoder.py` (`--old-ref` names another commit:
after this branch is merged, the one before the merge), written to a temporary file at run time;
where there is no git (a device copy), pass that file with `--old FILE`.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import mteb
import numpy as np
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from mteb._create_dataloaders import create_dataloader
from mteb.types import PromptType
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_bench import build_model  # a sibling script

from colquant import mteb_encoder
from colquant.files import write_json
from colquant.kernels import accelerate_model
from colquant.params import load_profile
from colquant.processing import ColQwen3Processor
from colquant.tiny import build_tokenizer
from old_source import import_old

log = logging.getLogger("eval_pages_ab")
REVISION = "0123abcd"
TASK = "VidoreArxivQARetrieval"  # any ViDoRe task: only its metadata (modalities) shapes the dataloader
DISTINCT_PAGES = 8  # encoded once each and repeated: decoding and preparing cost the same for every copy


def page_dataset(size: list[int], count: int, image_format: str) -> Dataset:
    """`count` random (height, width) pages, encoded as `image_format`, in a datasets image column."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(min(count, DISTINCT_PAGES)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, format=image_format)
        encoded.append(buffer.getvalue())
    images = [{"bytes": encoded[i % len(encoded)], "path": None} for i in range(count)]
    return Dataset.from_dict({"id": [f"page-{i}" for i in range(count)], "image": images},
                             features=Features({"id": Value("string"), "image": ImageFeature()}))


def time_encode(encoder: Any, loader: Any, device: torch.device) -> float:
    """Seconds for one `encode` of the loader's pages, as mteb calls it."""
    metadata = mteb.get_task(TASK).metadata
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    encoder.encode(loader, task_metadata=metadata, hf_split="test", hf_subset="default",
                   prompt_type=PromptType.document, show_progress_bar=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for eval-pages-ab.json")
    parser.add_argument("--profile", default="synthetic-4b", choices=["synthetic-4b", "tiny"])
    parser.add_argument("--pages", type=int, default=192, help="pages per timed encode call")
    parser.add_argument("--batch-size", type=int, default=16, help="mteb's batch size (encode_kwargs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="page workers of the new encoder (default: its own)")
    parser.add_argument("--batches-per-call", type=lambda text: [int(n) for n in text.split(",")],
                        default=[mteb_encoder.BATCHES_PER_CALL], help="the new encoder's, e.g. 4,8: one encoder each")
    parser.add_argument("--format", dest="image_format", default="JPEG", choices=["JPEG", "PNG"])
    parser.add_argument("--old", type=Path, default=None, help="the old lib/colquant/mteb_encoder.py (without git)")
    parser.add_argument("--old-ref", default="main", help="git commit whose mteb_encoder.py is the old one "
                        "(once this branch is merged, main's is the new one: name the commit before the merge)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    old = import_old("lib/colquant/mteb_encoder.py", ref=args.old_ref, file=args.old)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = load_profile(Path(__file__).resolve().parents[1] / "params" / f"{args.profile}.yaml")
    model = build_model(args.profile, device)
    if device.type == "cuda":
        accelerate_model(model)
    processor = ColQwen3Processor(build_tokenizer(), max_num_visual_tokens=profile["model"]["max_num_visual_tokens"])
    metadata = mteb.get_task(TASK).metadata

    def loader(count: int) -> Any:
        return create_dataloader(page_dataset(profile["bench"]["page_size"], count, args.image_format),
                                 task_metadata=metadata, prompt_type=PromptType.document, batch_size=args.batch_size)

    timed, warm = loader(args.pages), loader(2 * args.batch_size)
    encoders = {"old": old.ColQuantEncoder(model, processor, "bf16", REVISION, replicas=())}
    for per_call in args.batches_per_call:
        encoders[f"new/{per_call}"] = mteb_encoder.ColQuantEncoder(
            model, processor, "bf16", REVISION, replicas=(), page_workers=args.workers, batches_per_call=per_call)
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    try:
        for name, encoder in encoders.items():
            log.info("%s: warm-up %.2f s", name, time_encode(encoder, warm, device))
        for round_number in range(args.rounds):
            for name, encoder in encoders.items():
                seconds[name].append(time_encode(encoder, timed, device))
                log.info("round %d %s: %.2f s, %.1f pages/s", round_number, name, seconds[name][-1],
                         args.pages / seconds[name][-1])
    finally:
        for name, encoder in encoders.items():
            if name != "old":
                encoder.close()
    rates = {name: args.pages / statistics.median(times) for name, times in seconds.items()}
    pipeline_workers = mteb_encoder.workers_per_model(device, 1) if args.workers is None else args.workers
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "profile": args.profile, "pages": args.pages, "batch_size": args.batch_size,
              "page_size": profile["bench"]["page_size"], "image_format": args.image_format,
              "rounds": args.rounds, "page_workers": pipeline_workers,
              "seconds": seconds, "pages_per_s": rates,
              "over_old": {name: rate / rates["old"] for name, rate in rates.items() if name != "old"}}
    write_json(args.out / "eval-pages-ab.json", report)
    table = "\n".join([f"{'encoder':8s} {'pages/s (median)':>17s} {'x old':>6s}  per round (s)",
                       *(f"{name:8s} {rate:17.1f} {rate / rates['old']:6.2f}  "
                         f"{' '.join(f'{s:.2f}' for s in seconds[name])}" for name, rate in rates.items()),
                       (f"new/N: N mteb batches per pipeline call; {report['device']}, {args.pages} pages "
                        f"{profile['bench']['page_size']} {args.image_format}, batch {args.batch_size}, "
                        f"{pipeline_workers} page workers")])
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
