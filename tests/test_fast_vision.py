"""The fast vision tower against transformers' eager tower, on fresh random inputs.

On CPU the fused math runs with torch reference ops (and `accelerate_vision` installs nothing: the
eager tower is what CPU runs); on CUDA the Triton rotary kernel, cuBLASLt GELU epilogue and batched
flash attention run, on the 4B's vision shapes.
"""

from __future__ import annotations

import pytest
import torch

from colquant.kernels import fa3_ops, fast_vision, fp8_dispatch, vision_attention
from colquant.retriever.fp8 import FP8Linear
from colquant.retriever.model import ColQwen3, ColQwen3Config

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_tower(config: ColQwen3Config, device: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        visual = ColQwen3(config).to(torch.bfloat16).eval().visual
    with torch.no_grad():  # every term of the same order (unit-variance signals), so a wrong one shows
        for name, p in visual.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif "pos_embed" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return visual


def pages(visual: torch.nn.Module, grids: list[tuple[int, int, int]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cfg = visual.config
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    patches = sum(t * h * w for t, h, w in grids)
    device = next(visual.parameters()).device
    pixels = torch.randn(patches, width, generator=generator).to(device=device, dtype=torch.bfloat16)
    return pixels, torch.tensor(grids, device=device)


def token_cosine(a: torch.Tensor, b: torch.Tensor, reduce=torch.min) -> float:
    return reduce(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)).item()


def assert_matches_eager(visual, grids, seed, settings=None, floor=0.999, mean_floor=0.999):
    """Every output token within cosine ``floor`` of eager's, and their mean within ``mean_floor``."""
    pixels, grid = pages(visual, grids, seed)
    with torch.no_grad():
        eager = visual(pixels, grid_thw=grid, return_dict=True)
        fast = fast_vision.fast_vision_forward(visual, pixels, grid, settings)
    assert len(fast.deepstack_features) == len(eager.deepstack_features) == 3
    pairs = [(fast.last_hidden_state, eager.last_hidden_state), (fast.pooler_output, eager.pooler_output),
             *zip(fast.deepstack_features, eager.deepstack_features)]
    for a, b in pairs:
        assert a.shape == b.shape
        assert token_cosine(a, b) >= floor and token_cosine(a, b, torch.mean) >= mean_floor


# FP8 (e4m3, 3 mantissa bits) turns the fast tower's bf16-rounding differences from eager (one bf16
# step, 2^-8) into a different e4m3 code for about 1 element in 16 (2^-4 apart), at every quantized
# GEMM input; the mergers quantize twice more. Measured on the tiny CPU tower (seed 11): the last
# hidden state keeps 0.999 (mean 0.9996, worst token 0.9990), the merged outputs reach mean 0.9986,
# worst token 0.9976. Hence wider floors for FP8; the producers themselves are exact
# (test_fp8_producers_are_exact_on_cpu), so these differences are the bf16 fast tower's, amplified.
FP8_TOKEN_FLOOR, FP8_MEAN_FLOOR = 0.995, 0.998


@pytest.fixture(scope="module")
def tiny_tower():
    return random_tower(ColQwen3Config.tiny(), "cpu")


@pytest.mark.parametrize("grids", [[(1, 8, 8)], [(1, 8, 12), (1, 8, 12), (1, 4, 6), (1, 8, 12)], [(2, 4, 4)]])
def test_fused_math_matches_eager_on_cpu(tiny_tower, grids):
    """Mixed image sizes (equal ones batched, order kept) and a 2-frame grid (attention per frame)."""
    assert_matches_eager(tiny_tower, grids, seed=len(grids))


def test_plan_groups_equal_frames_and_is_cached(tiny_tower):
    settings = fast_vision.VisionSettings()
    grid = torch.tensor([(1, 8, 12), (1, 8, 12), (1, 4, 6), (2, 4, 4)])
    plan = fast_vision.grid_plan(tiny_tower, grid, settings)
    assert plan.segments == [(0, 2, 96), (192, 1, 24), (216, 2, 16)]
    assert plan.cu_seqlens.tolist() == [0, 96, 192, 216, 232, 248]
    assert fast_vision.grid_plan(tiny_tower, grid.clone(), settings) is plan


def test_pages_of_one_size_take_the_attention_output_without_a_copy(tiny_tower, monkeypatch):
    """One image size (a page batch): the attention result is SDPA's own output (token-major like q),
    not a copy of it into another buffer."""
    settings = fast_vision.VisionSettings()
    plan = fast_vision.grid_plan(tiny_tower, torch.tensor([(1, 8, 8), (1, 8, 8)]), settings)
    heads = tiny_tower.blocks[0].attn.num_heads
    dim = tiny_tower.config.hidden_size // heads
    q, k, v = torch.randn(3, 128, heads, dim, dtype=torch.bfloat16)
    made = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: made.append(sdpa(*args, **kwargs)) or made[-1])
    out = fast_vision.attention(q, k, v, plan, settings)
    assert len(made) == 1 and out.shape == (128, heads * dim)
    assert out.data_ptr() == made[0].data_ptr()


def test_unknown_attention_settings_are_refused_when_made():
    with pytest.raises(ValueError, match=r"unknown SDPA backend\(s\) \['fash'\]; use flash, cudnn"):
        fast_vision.VisionSettings(sdpa_backends=("cudnn", "fash"))
    with pytest.raises(ValueError, match="unknown vision attention 'flash'; use one of fa3-fp8, sdpa, varlen"):
        fast_vision.VisionSettings(attention="flash")


def test_cpu_keeps_the_eager_tower():
    model = ColQwen3(ColQwen3Config.tiny()).eval()
    info = fast_vision.accelerate_vision(model)
    assert info == dict(installed=False, reason="device is cpu, the fast vision tower needs a CUDA GPU")
    assert type(model.visual).__name__ == "Qwen3VLVisionModel"
    assert fast_vision.has_vision_tower(model) and not fast_vision.has_vision_tower(model.language_model)
    with pytest.raises(ValueError, match="no Qwen3-VL vision tower"):
        fast_vision.accelerate_vision(model.language_model)


def fp8_tower(visual: torch.nn.Module) -> torch.nn.Module:
    """`visual` with every Linear (blocks, merger, deepstack mergers) an FP8Linear, as in fp8-all, the FP8
    kernels attached as `colquant.load` attaches them (they run where the GPU has FP8 tensor cores)."""
    names = [name for name, module in visual.named_modules() if type(module) is torch.nn.Linear]
    for name in names:
        visual.set_submodule(name, FP8Linear.from_linear(visual.get_submodule(name)))
    fp8_dispatch.attach(visual)
    return visual


@pytest.fixture(scope="module")
def tiny_fp8_tower():
    return fp8_tower(random_tower(ColQwen3Config.tiny(), "cpu", seed=2))


@pytest.mark.parametrize("grids", [[(1, 8, 8)], [(1, 8, 12), (1, 4, 6), (1, 8, 12)]])
def test_fp8_tower_matches_eager_with_the_same_fp8_layers(tiny_fp8_tower, grids):
    """fp8-all: the fast tower's producers hand qkv, fc1 and fc2 quantized rows (LayerNorm+quant,
    GELU+quant; their torch twins on CPU); eager transformers calls the same FP8 layers on bf16 rows."""
    assert_matches_eager(tiny_fp8_tower, grids, seed=11, floor=FP8_TOKEN_FLOOR, mean_floor=FP8_MEAN_FLOOR)


# FP8 attention (fa3-fp8) quantizes q, k, v too (e4m3, one scale per frame and head): measured on the
# tiny CPU tower (seed 11, the twin's exact attention of the e4m3 inputs), the merged outputs' mean cosine
# to eager's drops from 0.9986 to 0.9982, the worst token from 0.9976 to 0.9967.
FP8_ATTENTION_MEAN_FLOOR = 0.997


@pytest.mark.parametrize("grids", [[(1, 8, 8)], [(1, 8, 12), (1, 4, 6), (1, 8, 12)]])
def test_fp8_attention_twin_matches_eager(tiny_fp8_tower, grids, monkeypatch):
    """fa3-fp8 on CPU: the rotary writes e4m3 q, k, v with per-(frame, head) scales (the twin of the
    Triton producer) and FA3's twin attends over them, once per block, within FP8's floors of eager."""
    calls = []
    twin = fa3_ops.varlen_attention_fp8_reference
    monkeypatch.setattr(fa3_ops, "varlen_attention_fp8_reference", lambda *args: calls.append(args) or twin(*args))
    settings = fast_vision.VisionSettings(attention="fa3-fp8")
    assert_matches_eager(tiny_fp8_tower, grids, seed=11, settings=settings, floor=FP8_TOKEN_FLOOR,
                         mean_floor=FP8_ATTENTION_MEAN_FLOOR)
    assert len(calls) == len(tiny_fp8_tower.blocks)
    assert calls[0][0].dtype == torch.float8_e4m3fn and calls[0][5].shape == (sum(t for t, _, _ in grids), 2)


def test_fp8_producers_are_exact_on_cpu(tiny_fp8_tower, monkeypatch):
    """add+LayerNorm+quant and GELU+quant give what the FP8 layers give when they quantize their own
    bf16 input (the torch twins on CPU): the fast tower's output is unchanged, bit for bit."""
    pixels, grid = pages(tiny_fp8_tower, [(1, 8, 8)], seed=5)
    with torch.no_grad():
        fused = fast_vision.fast_vision_forward(tiny_fp8_tower, pixels, grid)
        monkeypatch.setattr(fast_vision, "add_layernorm_into", lambda consumer, norm, x, delta: (x + delta, norm(x + delta)))
        monkeypatch.setattr(fast_vision, "fc1_activation", lambda mlp, h, tanh: mlp.act_fn(mlp.linear_fc1(h)))
        plain = fast_vision.fast_vision_forward(tiny_fp8_tower, pixels, grid)
    assert torch.equal(fused.last_hidden_state, plain.last_hidden_state)


def test_fp8_producers_feed_the_fp8_layers(tiny_fp8_tower, monkeypatch):
    seen: dict[str, set[type]] = {}
    original = FP8Linear.forward
    names = {id(m): "merger" if "merger" in name else name.split(".")[-1] for name, m in tiny_fp8_tower.named_modules()}

    def spy(self, x):
        seen.setdefault(names[id(self)], set()).add(type(x))
        return original(self, x)

    monkeypatch.setattr(FP8Linear, "forward", spy)
    pixels, grid = pages(tiny_fp8_tower, [(1, 8, 8)], seed=5)
    with torch.no_grad():
        fast_vision.fast_vision_forward(tiny_fp8_tower, pixels, grid)
    assert seen["qkv"] == seen["linear_fc1"] == seen["linear_fc2"] == {tuple}
    assert seen["proj"] == seen["merger"] == {torch.Tensor}  # attention output; the mergers' own forward


def test_other_quantized_vision_layers_keep_the_eager_tower(monkeypatch):
    """Only 16-bit and FP8 Linears are multiplied by the fast tower; another quantized layer (a 4-bit
    one here) would be read wrongly, so the eager forward stays, naming the layer type."""
    from colquant.kernels.linear import quantize_linears_rtn

    model = ColQwen3(ColQwen3Config.tiny()).eval()
    quantize_linears_rtn(model.visual.blocks[0])
    monkeypatch.setattr(fast_vision, "unavailable_reason", lambda device: None)
    info = fast_vision.accelerate_vision(model)
    assert not info["installed"] and "W4A16Linear" in info["reason"] and "16-bit or FP8" in info["reason"]
    assert type(model.visual).__name__ == "Qwen3VLVisionModel"


@CUDA
def test_rope_kernel_matches_the_float32_reference():
    for n, heads, dim in ((5120, 16, 64), (333, 2, 32)):
        qkv = torch.randn(n, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
        angles = torch.rand(n, dim // 2, device="cuda") * 50
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        for fast, ref in zip(fast_vision.rope_qk_triton(qkv, cos, sin, heads),
                             fast_vision.rope_qk_reference(qkv, cos, sin, heads)):
            torch.testing.assert_close(fast, ref, atol=1e-2, rtol=1e-2)


@CUDA
def test_cublaslt_gelu_epilogue_is_the_tanh_approximation():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) * 0.05
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
    pre = torch.addmm(b.float(), x.float(), w.float().t())
    tanh = torch.nn.functional.gelu(pre, approximate="tanh")
    assert (fused - tanh).norm() / tanh.norm() < 1e-2


@CUDA
@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_fast_tower_matches_eager_on_4b_shapes(attention):
    visual = random_tower(ColQwen3Config.colqwen3_4b(), "cuda", seed=1)
    settings = fast_vision.VisionSettings(attention=attention)
    assert_matches_eager(visual, [(1, 64, 80), (1, 64, 80), (1, 32, 48)], seed=7, settings=settings)


@CUDA
def test_fp8_tower_matches_eager_on_4b_shapes():
    """fp8-all on the GPU: the Triton producers and FP8 GEMMs against eager transformers calling the
    same FP8 layers (on a GPU without FP8 tensor cores both run the layers' reference)."""
    visual = fp8_tower(random_tower(ColQwen3Config.colqwen3_4b(), "cuda", seed=3))
    assert_matches_eager(visual, [(1, 64, 80), (1, 64, 80), (1, 32, 48)], seed=9, floor=FP8_TOKEN_FLOOR,
                         mean_floor=FP8_MEAN_FLOOR)


FA3_REASON = fa3_ops.unavailable_reason("cuda") if torch.cuda.is_available() else "needs a CUDA GPU"


@pytest.mark.skipif(FA3_REASON is not None, reason=f"FlashAttention-3's FP8 forward cannot run here: {FA3_REASON}")
def test_fp8_tower_with_fa3_attention_matches_eager_on_4b_shapes():
    """fp8-all with FA3's FP8 attention on Hopper (the tower's default there), against eager transformers
    calling the same FP8 layers with BF16 attention."""
    visual = fp8_tower(random_tower(ColQwen3Config.colqwen3_4b(), "cuda", seed=3))
    assert vision_attention.choose_attention(visual, "cuda") == ("fa3-fp8", {})
    assert_matches_eager(visual, [(1, 64, 80), (1, 64, 80), (1, 32, 48)], seed=9,
                         settings=fast_vision.VisionSettings(attention="fa3-fp8"), floor=FP8_TOKEN_FLOOR,
                         mean_floor=FP8_ATTENTION_MEAN_FLOOR)


@CUDA
def test_accelerate_vision_installs_and_restores():
    torch.manual_seed(0)
    model = ColQwen3(ColQwen3Config.tiny()).to("cuda", torch.bfloat16).eval()
    keys = list(model.state_dict())
    assert fast_vision.accelerate_vision(model)["installed"]
    assert type(model.visual).__name__ == "FastQwen3VLVisionModel" and list(model.state_dict()) == keys
    pixels, grid = pages(model.visual, [(1, 8, 8)], seed=3)
    with torch.no_grad():
        fast = model.vlm.model.get_image_features(pixels, grid)
    assert model.visual._colquant_vision.calls == 1
    fast_vision.restore_vision(model)
    assert type(model.visual).__name__ == "Qwen3VLVisionModel"
    with torch.no_grad():
        eager = model.vlm.model.get_image_features(pixels, grid)
    assert token_cosine(torch.cat(fast.pooler_output), torch.cat(eager.pooler_output)) >= 0.999
