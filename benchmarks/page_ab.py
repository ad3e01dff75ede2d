"""The vision tower alone, interleaved A/B: transformers' eager tower against the fast one's variants.

Why interleaved: timed one after the other, a drift of the GPU (clocks, power) reads as a difference
between settings; here every round times each setting once, on the same page batch. The fast
tower's attention variants are timed side by side (batched SDPA with torch's default backend, with
cuDNN first, torch's varlen flash attention) so the default can be chosen from a measurement.
Usage (CUDA): `python benchmarks/page_ab.py [profile] [page batches, e.g. 1,4,16] [rounds]`.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import torch

from colquant import bench
from colquant.__main__ import profile_file, show_package_logs
from colquant.kernels import fast_vision
from colquant.params import load_profile

logger = logging.getLogger("colquant.page_ab")
SETTINGS = {
    "eager": None,
    "fast sdpa": fast_vision.VisionSettings(),
    "fast sdpa cudnn": fast_vision.VisionSettings(sdpa_backends=("cudnn", "flash")),
    "fast varlen": fast_vision.VisionSettings(attention="varlen"),
}


def time_tower(model: torch.nn.Module, batch: dict, setting: fast_vision.VisionSettings | None, reps: int) -> float:
    """Median ms of the vision tower (`get_image_features`) on one page batch under one setting."""
    if setting is None:
        fast_vision.restore_vision(model)
    else:
        fast_vision.accelerate_vision(model, setting)
    features = model.vlm.model.get_image_features
    times = []
    with torch.inference_mode():
        for index in range(reps + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            features(batch["pixel_values"], batch["image_grid_thw"])
            torch.cuda.synchronize()
            if index:  # the first call warms up (kernel compilation, grid plan)
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    show_package_logs()
    profile = load_profile(profile_file(argv[0] if argv else "synthetic-4b"))
    batches = [int(b) for b in (argv[1] if len(argv) > 1 else "1,4,16").split(",")]
    rounds = int(argv[2]) if len(argv) > 2 else 3
    device = torch.device("cuda")
    model, processor = bench.load_model(profile, device)
    times: dict[tuple[int, str], list[float]] = {}
    for size in batches:
        batch = processor.process_images(bench.page_images(profile["bench"]["page_size"], size)).to(device)
        for _ in range(rounds):
            for label, setting in SETTINGS.items():
                times.setdefault((size, label), []).append(time_tower(model, batch, setting, reps=3))
    lines = [f"{'pages':>5s}  {'vision tower':16s} {'ms (median of 3) per round':34s} {'ms/page':>8s} "
             f"{'x eager':>8s}"]
    for (size, label), ms in times.items():
        best = min(ms)
        lines.append(f"{size:5d}  {label:16s} {' '.join(f'{t:8.2f}' for t in ms):34s} {best / size:8.2f} "
                     f"{min(times[(size, 'eager')]) / best:8.2f}")
    logger.info("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
