"""SDPA backends side by side at a page batch's two attention shapes, in one process.

    python benchmarks/attention_backends.py --out DIR          # a CUDA GPU

torch's `scaled_dot_product_attention` picks a backend itself (on the H200 with torch 2.11 it picked
cuDNN for both of a page batch's attentions, `kernel_breakdown.py`). The fast vision tower can ask
for others (`VisionSettings.sdpa_backends`); whether it should is a measurement: each backend that
accepts the shape is timed (`colquant.basics.measure.call_times`, median) at the vision tower's
attention (frames × 16 heads × 5,120 patches × 64, bidirectional) and the language model's page
attention (pages × 32 query heads over 8 key/value heads × 1,309 tokens × 128, causal), with its
throughput in TFLOP/s (4·T²·D per head, halved when causal) and its largest difference from the
math backend on a slice.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from colquant.basics import measure

log = logging.getLogger("attention_backends")
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def shapes(pages: int) -> dict[str, dict]:
    """The two attentions of a batch of `pages` 1,280-token pages on the 4B (configs' head counts)."""
    return {"vision": dict(batch=pages, heads=16, kv_heads=16, tokens=5120, dim=64, causal=False),
            "lm-page": dict(batch=pages, heads=32, kv_heads=8, tokens=1309, dim=128, causal=True)}


def inputs(shape: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the towers hand them to SDPA: (batch, heads, tokens, dim) views of token-major rows."""
    b, h, hk, t, d = (shape[k] for k in ("batch", "heads", "kv_heads", "tokens", "dim"))
    q = torch.randn(b, t, h, d, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(b, t, hk, d, device=device, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    return q, k, v


def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: dict, backend: SDPBackend) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=shape["causal"],
                                              enable_gqa=shape["heads"] != shape["kv_heads"])


def time_backend(shape: dict, name: str, device: torch.device) -> dict:
    """One backend at one shape: median ms, TFLOP/s, and max |difference| from math on batch item 0."""
    q, k, v = inputs(shape, device)
    try:
        out = call(q, k, v, shape, BACKENDS[name])
    except RuntimeError as error:  # the backend refuses this shape/dtype/GPU
        return dict(backend=name, error=str(error).splitlines()[0][:200])
    want = call(q[:1], k[:1], v[:1], shape, SDPBackend.MATH)
    times = measure.call_times(lambda: call(q, k, v, shape, BACKENDS[name]), device, calls=10, min_time_s=0.5)
    ms = statistics.median(times) * 1e3
    flop = 4 * shape["batch"] * shape["heads"] * shape["tokens"] ** 2 * shape["dim"] / (2 if shape["causal"] else 1)
    return dict(backend=name, ms=ms, tflops=flop / ms / 1e9, max_abs_diff=(out[:1] - want).abs().max().item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pages", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        parser.error("attention_backends times CUDA kernels: run it on a CUDA GPU")
    device = torch.device("cuda")
    rows = [dict(attention=label, **shape, **time_backend(shape, name, device))
            for label, shape in shapes(args.pages).items() for name in BACKENDS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention-backends.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))
    lines = ["| attention | backend | ms | TFLOP/s | max abs diff vs math |", "|---|---|---|---|---|"]
    lines += [f"| {r['attention']} | {r['backend']} | " + (f"{r['ms']:.2f} | {r['tflops']:.0f} | {r['max_abs_diff']:.2e} |"
              if "ms" in r else f"refused: {r['error']} | | |") for r in rows]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
