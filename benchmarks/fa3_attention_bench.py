"""The vision tower's attention per layer: BF16 rope + SDPA (cuDNN, torch's pick) against FlashAttention-3's FP8.

    COLQUANT_VLLM_FA3_LIB=.../_vllm_fa3_C.abi3.so python benchmarks/fa3_attention_bench.py --out DIR   # Hopper

One block's attention of a batch of pages at the 4B's shapes (heads and head dim from
`ColQwen3Config.colqwen3_4b()`, patches per page from the profile's `max_num_visual_tokens` x merge^2),
from the qkv GEMM's bf16 rows to the attention output, as the fast vision tower runs it:

* ``bf16 rope + sdpa (cudnn)`` / ``(torch's pick)``: the Triton rope kernel, then one batched SDPA call;
* ``sdpa (cudnn) alone``: the attention on ready rotated q/k/v;
* ``fp8 producer``: `vision_ops.rope_quant_qkv` alone (the absmax pass and the rope+quantization pass);
* ``fa3 fp8 alone``: `fa3_ops.varlen_attention_fp8` on ready e4m3 q/k/v;
* ``fp8 producer + fa3 fp8``: the fa3-fp8 row of the tower, end to end;
* ``fa3 bf16 alone``: FA3 on the bf16 rotated q/k/v (a control: FA3's own speed, without FP8).

Each is timed with CUDA events (median µs of ``--reps`` calls after warm-up); each output's error is
its relative (Frobenius) difference and worst token cosine against the cuDNN BF16 result, and both
against float32 attention of the same bf16 inputs on the first page.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from colquant.__main__ import profile_file
from colquant.kernels import fa3_ops, fast_vision, vision_ops
from colquant.kernels.vision_attention import attention, attention_fp8
from colquant.research.params import load_profile
from colquant.retriever.model import ColQwen3Config


def page_shape(profile: str) -> dict:
    """Heads, head dim and patches per page of the 4B's vision tower at the profile's page size."""
    vision = ColQwen3Config.colqwen3_4b().vision_config
    tokens = load_profile(profile_file(profile), check_device=False)["model"]["max_num_visual_tokens"]
    return dict(heads=vision.num_heads, dim=vision.hidden_size // vision.num_heads,
                patches=tokens * vision.spatial_merge_size ** 2)


def make_inputs(pages: int, shape: dict, device: torch.device) -> tuple[torch.Tensor, fast_vision.GridPlan]:
    """Random qkv rows (unit variance, the scale of the GEMM's output) and a plan of `pages` equal pages
    with rotary tables of the tower's angle range."""
    heads, dim, patches = shape["heads"], shape["dim"], shape["patches"]
    gen = torch.Generator(device=device).manual_seed(pages)
    qkv = torch.randn(pages * patches, 3 * heads * dim, device=device, generator=gen).to(torch.bfloat16)
    angles = torch.rand(pages * patches, dim // 2, device=device, generator=gen) * 64
    emb = torch.cat((angles, angles), dim=-1)
    cu = torch.arange(pages + 1, device=device, dtype=torch.int32) * patches
    plan = fast_vision.GridPlan(pos_embeds=qkv[:0], cos=emb.cos().contiguous(), sin=emb.sin().contiguous(),
                                segments=[(0, pages, patches)], cu_seqlens=cu, max_seqlen=patches)
    return qkv, plan


def event_us(fn: Callable[[], torch.Tensor], reps: int) -> float:
    """Median µs of ``fn`` between CUDA events, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    """Relative Frobenius difference and worst per-token cosine of (patches, heads * dim) outputs."""
    got, want = got.float(), want.float()
    cosine = F.cosine_similarity(got, want, dim=-1).min().item()
    return dict(rel_err=((got - want).norm() / want.norm()).item(), min_token_cosine=cosine)


def runs(qkv: torch.Tensor, plan: fast_vision.GridPlan, shape: dict) -> dict[str, Callable[[], object]]:
    """The timed rows, each a call from the qkv rows (or ready operands) to its output."""
    heads, dim = shape["heads"], shape["dim"]
    q, k = fast_vision.rope_qk_triton(qkv, plan.cos, plan.sin, heads)
    v = qkv.view(qkv.shape[0], 3, heads, dim)[:, 2]
    v_rows = v.contiguous()  # FA3 reads (tokens, heads, dim) with a token stride of heads * dim
    qkv8, descale = vision_ops.rope_quant_qkv(qkv, plan.cos, plan.sin, heads, plan.cu_seqlens, plan.max_seqlen)
    cudnn = fast_vision.VisionSettings(attention="sdpa", sdpa_backends=("cudnn",))
    default = fast_vision.VisionSettings(attention="sdpa")

    def bf16(settings: fast_vision.VisionSettings) -> torch.Tensor:
        rq, rk = fast_vision.rope_qk_triton(qkv, plan.cos, plan.sin, heads)
        return attention(rq, rk, v, plan, settings)

    def producer() -> tuple[torch.Tensor, torch.Tensor]:
        return vision_ops.rope_quant_qkv(qkv, plan.cos, plan.sin, heads, plan.cu_seqlens, plan.max_seqlen)

    return {"bf16 rope + sdpa (cudnn)": lambda: bf16(cudnn), "bf16 rope + sdpa (torch's pick)": lambda: bf16(default),
            "sdpa (cudnn) alone": lambda: attention(q, k, v, plan, cudnn),
            "fp8 producer": producer, "fa3 fp8 alone": lambda: attention_fp8(qkv8, descale, plan),
            "fp8 producer + fa3 fp8": lambda: attention_fp8(*producer(), plan),
            "fa3 bf16 alone": lambda: fa3_ops.varlen_attention_bf16(q, k, v_rows, plan.cu_seqlens, plan.max_seqlen,
                                                              dim ** -0.5).reshape(q.shape[0], heads * dim)}


def measure_pages(pages: int, shape: dict, device: torch.device, reps: int) -> list[dict]:
    qkv, plan = make_inputs(pages, shape, device)
    table = runs(qkv, plan, shape)
    outputs = {name: fn() for name, fn in table.items()}
    reference = outputs["bf16 rope + sdpa (cudnn)"]
    first = slice(0, shape["patches"])
    q, k = fast_vision.rope_qk_reference(qkv[first], plan.cos[first], plan.sin[first], shape["heads"])
    v = qkv[first].view(-1, 3, shape["heads"], shape["dim"])[:, 2]
    exact = F.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
    exact = exact.reshape(shape["patches"], -1)
    rows = []
    for name, fn in table.items():
        row = dict(pages=pages, run=name, us=round(event_us(fn, reps), 1))
        out = outputs[name]
        if isinstance(out, torch.Tensor) and out.dim() == 2:  # an attention output
            row.update({f"vs_cudnn_bf16_{key}": value for key, value in errors(out, reference).items()})
            row.update({f"vs_fp32_page0_{key}": value for key, value in errors(out[first], exact).items()})
        rows.append(row)
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| pages | run | µs per layer | rel err vs cuDNN BF16 | worst token cos | rel err vs fp32 (page 0) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        err = (f"{r['vs_cudnn_bf16_rel_err']:.2e} | {r['vs_cudnn_bf16_min_token_cosine']:.4f} | "
               f"{r['vs_fp32_page0_rel_err']:.2e}" if "vs_cudnn_bf16_rel_err" in r else " | | ")
        lines.append(f"| {r['pages']} | {r['run']} | {r['us']:.0f} | {err} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pages", default="4,16", help="comma list of page batch sizes")
    parser.add_argument("--profile", default="synthetic-4b", help="params/<profile>.yaml gives the page size")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    reason = fa3_ops.unavailable_reason(device) if torch.cuda.is_available() else "needs a CUDA GPU"
    if reason:
        parser.error(f"FlashAttention-3's FP8 forward cannot run here: {reason}")
    shape = page_shape(args.profile)
    rows = [row for pages in map(int, args.pages.split(",")) for row in measure_pages(pages, shape, device, args.reps)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fa3-attention.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=shape, rows=rows), indent=1) + "\n")
    print("\n".join(table_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
