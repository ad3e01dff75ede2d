"""Interleaved A/B of page batches on one GPU: BF16 vs 4-bit with BF16 copies vs 4-bit without.

Why: in `python -m colquant bench` the three are timed one after the other, so a drift of the GPU
(clocks, power) between them reads as a kernel difference. Here the same page batch alternates
between the settings, round after round, with both models resident.
Usage (CUDA): `python benchmarks/page_ab.py [batches, e.g. 1,4] [rounds]`.
"""

from __future__ import annotations

import logging
import sys

import torch

from colquant import bench
from colquant.kernels import W4A16Linear, accelerate_model, find_text_model, prepare_dispatch

logger = logging.getLogger("colquant.page_ab")


def quantized_accelerated(cfg: dict, device: torch.device):
    """The bench's synthetic model, fused, then its text linears RTN-W4 (as `bench.run_bench` does)."""
    model = accelerate_model(bench.build_model(cfg, device))
    tm = find_text_model(model)
    with torch.no_grad():
        for layer in tm.layers:
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                setattr(parent, name, W4A16Linear.from_linear(getattr(parent, name), cfg["group_size"]))
    torch.cuda.empty_cache()
    logger.info("dispatch: %s", prepare_dispatch(tm, device))
    return model, [m for m in tm.modules() if isinstance(m, W4A16Linear)]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    batches = [int(b) for b in (argv[0] if argv else "1,4").split(",")]
    rounds = int(argv[1]) if len(argv) > 1 else 3
    cfg, dev = bench._resolve("synthetic-4b"), torch.device("cuda")
    bf16 = accelerate_model(bench.build_model(cfg, dev))
    w4, layers = quantized_accelerated(cfg, dev)
    copies = [m.bf16_weight for m in layers]
    settings = (("bf16", bf16, None), ("w4+bf16-copies", w4, True), ("w4 no copies", w4, False))
    times: dict[tuple[int, str], list[float]] = {}
    for batch_size in batches:
        batch = bench.page_batch(cfg, bf16, batch_size, dev)
        for _ in range(rounds):
            for label, model, with_copies in settings:
                if with_copies is not None:
                    for m, c in zip(layers, copies):
                        m.bf16_weight = c if with_copies else None
                sec, _, _ = bench.time_forward(model, batch, dev, 5, 0.0, warmup=1)
                times.setdefault((batch_size, label), []).append(sec * 1e3)
    lines = [f"{'pages':>5s}  {'setting':16s} {'ms per round':40s} ratio vs bf16 (best of rounds)"]
    for (b, label), ms in times.items():
        ratio = min(times[(b, 'bf16')]) / min(ms)
        lines.append(f"{b:5d}  {label:16s} {' '.join(f'{t:8.2f}' for t in ms):40s} {ratio:.3f}")
    logger.info("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
