"""Why did notebook 06's sweep time a 4-bit page 25% slower than the bench (sweep_vs_bench, H200)?
One model per precision; its page timed by both methods (bench.time_calls, sweep.measure) on both
pages (the bench's random-noise page, the sweep's blank page), interleaved twice. Prints a table."""

from __future__ import annotations

import argparse
import json
import logging

import torch

from colquant import bench, sweep
from colquant.params import load_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="params/synthetic-4b.yaml")
    parser.add_argument("--out", default="page-timing-ab.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    profile = load_profile(args.profile, check_device=False)
    device = torch.device("cuda")
    rows = []
    for precision in ("bf16", "w4a16"):
        model, processor = bench.load_model(profile, device)
        bench.PREPARE[precision](model, profile)
        pages = {"noise": bench.page_images(profile["bench"]["page_size"], 1)[0],
                 "blank": sweep.synthetic_page(profile["model"]["max_num_visual_tokens"])}
        batches = {name: processor.process_images([page]).to(device) for name, page in pages.items()}
        for round_ in range(2):
            for name, batch in batches.items():
                timed = bench.time_calls(lambda: bench.forward(model, batch), device, 5, 0.5)
                swept = sweep.measure(model, batch, repeats=3, warmup=1, device=device, min_time_s=0.5)
                rows.append(dict(precision=precision, page=name, round=round_, bench_ms=timed["ms"],
                                 sweep_ms=swept["latency_p50_ms"], tokens=int(batch["attention_mask"].sum())))
                print(rows[-1], flush=True)
        sweep.release_model(model)
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=1)
    print("precision page  round bench_ms sweep_ms")
    for r in rows:
        print(f"{r['precision']:9s} {r['page']:5s} {r['round']:5d} {r['bench_ms']:8.2f} {r['sweep_ms']:8.2f}")


if __name__ == "__main__":
    main()
