"""The fused FP8 quantization kernels against their torch twins: on a GPU as compiled, on CPU through
Triton's interpreter (TRITON_INTERPRET=1, tiny shapes); skipped where Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, i.e. on import
pytest.importorskip("triton")

from colquant.kernels import fp8_dispatch, fp8_ops  # noqa: E402
from colquant.retriever.fp8 import FP8Linear, ReferenceProducers, add_rmsnorm_reference, quantize_rows_reference, silu_mul_reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
FP8_GPU = CUDA and fp8_dispatch.fp8_unavailable_reason("cuda") is None


def rows(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen) * torch.logspace(-3, 2, m).unsqueeze(1)
    x[0] = 0  # an all-zero row
    return x.to(torch.bfloat16).to(DEVICE)


def assert_same_quantization(q: torch.Tensor, scale: torch.Tensor, values: torch.Tensor, *, bf16_steps: int = 0) -> None:
    """The kernel's (q, scale) equal the torch twin's for ``values``: scales to fp32 rounding, the e4m3
    codes exactly except where the division rounds the other way at a tie (at most one e4m3 step).

    ``bf16_steps``: how many fp32 -> bf16 roundings the kernel makes before quantizing; Triton 3.6's
    interpreter truncates them instead of rounding to nearest, so on CPU the values may sit that many
    bf16 steps (up to 2^-7 relative each) lower, and the check is then their error bound instead."""
    ref_q, ref_scale = quantize_rows_reference(values)
    if CUDA or not bf16_steps:
        torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
        step = torch.maximum(ref_q.float().abs() * 2.0**-3, torch.full_like(ref_scale, 2.0**-9))
        assert torch.all((q.float() - ref_q.float()).abs() <= step)
        assert (q.float() == ref_q.float()).float().mean() > 0.99
        return
    slack = bf16_steps * 2.0**-7
    torch.testing.assert_close(scale, ref_scale, rtol=slack, atol=0)
    values = values.float()
    bound = values.abs() * (2.0**-4 + slack) + ref_scale * 2.0**-9
    assert torch.all((q.float() * scale - values).abs() <= bound)


def assert_bf16_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-equal on the GPU; through Triton 3.6's interpreter, which truncates fp32 -> bf16 instead of
    rounding to nearest, within one bf16 step."""
    if CUDA:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=2.0**-7, atol=0)


@pytest.mark.parametrize("m,n", [(5, 48), (3, 200), (2, 203)])  # segments 32+16; 128+64+8; 128+64+16 (masked)
def test_quantize_rows_matches_the_torch_twin(m, n):
    x = rows(m, n, seed=m * n)
    q, scale = fp8_ops.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (m, 1)
    assert_same_quantization(q, scale, x)
    assert torch.equal(q[0].float(), torch.zeros(n, device=DEVICE))


@pytest.mark.parametrize("emulate", [True, pytest.param(False, marks=pytest.mark.skipif(
    not CUDA, reason="the interpreter's own fp32 -> e4m3 cast drops the exponent carry"))])
def test_both_rounding_paths_give_torchs_e4m3_cast(emulate):
    """Every e4m3 value, every midpoint between neighbours (ties to even) and the fp32 values either
    side of each midpoint, with scale 1 (row absmax 448): the kernel's codes equal torch's cast, with
    the interpreter's rounding helper (``emulate``) and with the GPU's own cast alone."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()  # sorted, 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(448.0))])
    x = torch.cat([values, -values]).unsqueeze(0).to(DEVICE)
    m, n = x.shape
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=DEVICE)
    scale = torch.empty((m, 1), dtype=torch.float32, device=DEVICE)
    args = dict(fp8_ops._segment_args(n, None), EMULATE_ROUNDING=emulate)
    fp8_ops._quantize_rows_kernel[(m,)](x, q, scale, n, x.stride(0), **args)
    assert fp8_ops.INTERPRETED is not CUDA
    assert torch.equal(scale, torch.ones_like(scale))
    assert torch.equal(q.float(), x.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("n,segments", [(2560, (2048, 512, 0)), (4096, (4096, 0, 0)), (9728, (8192, 1024, 512)),
                                        (1, (1, 0, 0)), (203, (128, 64, 16))])
def test_row_segments_cover_the_row_with_powers_of_two(n, segments):
    assert fp8_ops._row_segments(n) == segments


def test_row_segments_waste_lanes_only_in_the_last_segment():
    for n in range(1, 5000):
        s0, s1, s2 = fp8_ops._row_segments(n)
        assert s0 + s1 <= n <= s0 + s1 + s2 or (s2 == 0 and s0 + s1 == n)
        assert all(s & (s - 1) == 0 for s in (s0, s1, s2))
        assert s2 < 2 * max(n - s0 - s1, 1)


def test_quantize_rows_rounds_values_near_a_power_of_two_up():
    """Rounding that carries into the exponent (7.99 -> 8) is where Triton's interpreter erred."""
    x = torch.tensor([[448.0, 7.99, 127.8, -3.99, 0.00390625, 1e-5]], dtype=torch.float32, device=DEVICE)
    q, scale = fp8_ops.quantize_rows(x.to(torch.bfloat16))
    expected, _ = quantize_rows_reference(x.to(torch.bfloat16))
    assert torch.equal(q.float(), expected.float())


@pytest.mark.parametrize("n", [80, 203])  # segments 64+16; 128+64+16, the last masked
def test_add_rmsnorm_quant_matches_the_torch_twin(n):
    residual, delta = rows(6, n, seed=1), rows(6, n, seed=2)
    weight = (torch.rand(n) + 0.5).to(torch.bfloat16).to(DEVICE)
    h, q, scale = fp8_ops.add_rmsnorm_quant(residual, delta, weight, 1e-6)
    ref_h, ref_normed = add_rmsnorm_reference(residual, delta, weight, 1e-6)
    assert_bf16_equal(h, ref_h)
    assert_same_quantization(q, scale, ref_normed, bf16_steps=3)
    same, q2, scale2 = fp8_ops.add_rmsnorm_quant(residual, None, weight, 1e-6)
    assert same is residual
    assert_same_quantization(q2, scale2, add_rmsnorm_reference(residual, None, weight, 1e-6)[1], bf16_steps=2)


@pytest.mark.parametrize("m,n", [(4, 48), (3, 200), (2, 203)])  # segments 32+16; 128+64+8; 128+64+16 (masked)
def test_silu_mul_quant_matches_the_torch_twin(m, n):
    gate_up = rows(m, 2 * n, seed=3)
    q, scale = fp8_ops.silu_mul_quant(gate_up)
    assert q.shape == (m, n)
    assert_same_quantization(q, scale, silu_mul_reference(gate_up), bf16_steps=2)


def test_gelu_tanh_quant_matches_the_torch_twin():
    x = rows(4, 160, seed=7)
    q, scale = fp8_ops.gelu_tanh_quant(x)
    assert_same_quantization(q, scale, torch.nn.functional.gelu(x, approximate="tanh"), bf16_steps=1)


def test_the_torch_twins_are_what_fp8_producers_gives_on_cpu():
    """Where FP8Linear runs its reference, the producers are the torch twins under the kernels' names."""
    twins = fp8_dispatch.producers("cpu")
    assert twins is ReferenceProducers
    assert all(hasattr(fp8_ops, name) for name in vars(twins) if not name.startswith("_"))


def test_quantize_rows_rejects_a_tensor_without_contiguous_rows():
    with pytest.raises(ValueError, match="contiguous rows"):
        fp8_ops.quantize_rows(rows(4, 32, seed=4).t())


def test_shapes_come_from_the_4b_config():
    from colquant.retriever.model import ColQwen3Config

    config = ColQwen3Config.colqwen3_4b()
    lm = {(r["layer"], r["K"], r["N"]) for r in fp8_ops.lm_shapes(config.text_config, tokens=[1408])}
    assert lm == {("qkv", 2560, 4096 + 2 * 1024), ("o", 4096, 2560), ("gate_up", 2560, 2 * 9728), ("down", 9728, 2560)}
    vision = {(r["layer"], r["K"], r["N"]) for r in fp8_ops.vision_shapes(config.vision_config, tokens=[5120])}
    assert vision == {("qkv", 1024, 3072), ("proj", 1024, 1024), ("fc1", 1024, 4096), ("fc2", 4096, 1024)}


@pytest.mark.parametrize("kernel", ["quantize_rows", "add_rmsnorm_quant", "silu_mul_quant"])
def test_producers_match_their_twins_at_the_4b_widths(kernel):
    """The widths the model runs (4,096; 2,560 = 2,048 + 512; 9,728 = 8,192 + 1,024 + 512)."""
    m = 64 if CUDA else 4
    if kernel == "silu_mul_quant":
        gate_up = rows(m, 2 * 9728, seed=8)
        assert_same_quantization(*fp8_ops.silu_mul_quant(gate_up), silu_mul_reference(gate_up), bf16_steps=2)
    elif kernel == "add_rmsnorm_quant":
        residual, delta = rows(m, 2560, seed=9), rows(m, 2560, seed=10)
        weight = (torch.rand(2560) + 0.5).to(torch.bfloat16).to(DEVICE)
        h, q, scale = fp8_ops.add_rmsnorm_quant(residual, delta, weight, 1e-6)
        ref_h, ref_normed = add_rmsnorm_reference(residual, delta, weight, 1e-6)
        assert_bf16_equal(h, ref_h)
        assert_same_quantization(q, scale, ref_normed, bf16_steps=3)
    else:
        x = rows(m, 4096, seed=11)
        q, scale = fp8_ops.quantize_rows(x)
        assert_same_quantization(q, scale, x)
        # bit for bit: an IEEE-rounded amax / 448 (div_rn) differed from the twin's in half the rows on
        # the H200 (benchmarks/producer-notes.md), main's kernel in none
        assert torch.equal(scale, quantize_rows_reference(x)[1])


@pytest.mark.skipif(not FP8_GPU, reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_fp8_linear_on_the_gpu_matches_its_reference():
    from colquant.kernels.linear import force_reference

    torch.manual_seed(0)
    linear = torch.nn.Linear(2560, 1024, bias=True, device="cuda", dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(linear)
    assert fp8_dispatch.attach(layer) == 1
    x = torch.randn(77, 2560, device="cuda", dtype=torch.bfloat16)
    fast = layer(x)
    with force_reference():
        ref = layer(x)
    assert ((fast.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    assert ((fast.float() - linear(x).float()).norm() / linear(x).float().norm()) < 0.05


@pytest.mark.skipif(not FP8_GPU, reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_gemm_comparison_times_every_column():
    row, = fp8_ops.gemm_comparison([dict(tower="lm", layer="down", M=256, K=1024, N=512, producer="silu_mul")],
                                   "cuda", reps=3)
    for key in ("bf16_us", "bf16_e2e_us", "fp8_gemm_us", "fp8_gemm_fast_accum_us", "fp8_torch_quant_us", "fp8_fused_us"):
        assert row[key] > 0
