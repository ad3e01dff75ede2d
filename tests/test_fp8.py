"""W8A8 FP8 variants on CPU: the arithmetic, the layer, the checkpoint format and the variant plumbing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import colquant
from colquant.kernels import fp8_dispatch
from colquant.quantize.fp8_variants import fp8_metadata, fp8_targets, quantize_fp8, save_fp8_model
from colquant.retriever import fp8
from colquant.retriever.checkpoint import CheckpointError
from colquant.retriever.fp8 import FP8Linear, quantize_rows_reference, quantize_weight


def e4m3_error_bound(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half a unit in the last place of e4m3 (3 mantissa bits) at each value, in the values' units:
    2^-4 of the value for normal numbers, half the subnormal step (2^-10 of the scale) below."""
    return torch.maximum(values.abs() * 2.0**-4, scale * 2.0**-10) * 1.0001


def random_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows whose magnitudes differ by orders of magnitude, one all-zero row, and outliers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 3, rows).unsqueeze(1)
    x[0] = 0
    x[1, 3] = 50 * x[1].abs().max()
    return x


def test_weight_round_trip_is_within_e4m3_precision_per_channel():
    w = random_rows(24, 96, seed=1)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (24, 1)
    back = q.float() * scale
    assert torch.all((back - w).abs() <= e4m3_error_bound(w, scale))
    assert torch.equal(back[0], torch.zeros(96))  # an all-zero channel stays zero, without NaN
    assert torch.allclose(back.abs().amax(1)[1:], w.abs().amax(1)[1:], rtol=1e-6)  # the absmax is exact


def test_per_token_activation_quantization_is_within_e4m3_precision():
    x = random_rows(16, 64, seed=2).to(torch.bfloat16)
    q, scale = quantize_rows_reference(x)
    assert scale.shape == (16, 1)
    back = q.float() * scale
    assert torch.all((back - x.float()).abs() <= e4m3_error_bound(x.float(), scale))


def make_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(torch.bfloat16)


def test_fp8_linear_matches_the_bf16_layer_within_w8a8_precision():
    linear = make_linear(128, 48)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    y, ref = layer(x), linear(x)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    assert ((y.float() - ref.float()).norm() / ref.float().norm()) < 0.05
    # the reference path is exactly dequantized activations times the dequantized weight
    q, scale = quantize_rows_reference(x.reshape(-1, 128))
    exact = ((q.float() * scale) @ layer.dequantize().t() + linear.bias.float()).to(torch.bfloat16)
    assert torch.equal(y.reshape(-1, 48), exact)


def test_a_pre_quantized_activation_gives_the_same_output():
    layer = FP8Linear.from_linear(make_linear(64, 32))
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(quantize_rows_reference(x)), layer(x))


def test_fused_projections_equal_the_separate_ones():
    parts = [FP8Linear.from_linear(make_linear(64, n, bias=b, seed=n)) for n, b in ((32, True), (16, False), (16, True))]
    fused = FP8Linear.concat(parts)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([part(x) for part in parts], dim=-1))


def test_cpu_says_once_that_it_runs_the_reference(caplog, monkeypatch):
    from colquant.kernels import backend

    monkeypatch.setattr(backend, "_WARNED", set())
    fp8_dispatch.kernels_run_on.cache_clear()
    layer = FP8Linear.from_linear(make_linear(64, 16))
    fp8_dispatch.attach(layer)
    with caplog.at_level(logging.INFO, logger="colquant.kernels"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    said = [r.getMessage() for r in caplog.records if "FP8Linear" in r.getMessage()]
    assert said == ["FP8Linear: running the dequantized reference (PyTorch) because device is cpu, the FP8 path needs a CUDA GPU"]


def test_scopes_cover_the_language_model_or_both_towers(tiny_path):
    for scope, towers in (("lm", {"language_model"}), ("lm+vision", {"language_model", "visual"})):
        model, _ = colquant.load(tiny_path, device="cpu")
        names = quantize_fp8(model, scope)
        assert {name.split(".")[2] for name in names} == towers
        assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in names)
        assert isinstance(model.embedding_proj_layer, nn.Linear)  # the 320-d projection stays 16-bit
    with pytest.raises(ValueError, match="scope='vision'"):
        quantize_fp8(model, "vision")


def embed(model, processor, texts, images):
    queries = model.encode_queries(texts, batch_size=4, processor=processor)
    pages = model.encode_pages(images, batch_size=2, processor=processor)
    return queries, pages


@pytest.fixture(scope="module")
def fp8_variant(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's fp8-all variant, saved as notebook 03 saves it."""
    from colquant.basics.measure import measure

    model, processor = colquant.load(tiny_path, device="cpu")
    with measure(model.device) as cost:
        layers = quantize_fp8(model, "lm+vision")
    metadata = fp8_metadata("fp8-all", "lm+vision", layers, cost, base_model="embedded-tiny",
                            base_model_revision="local build", random_weights=True)
    return save_fp8_model(model, processor, tmp_path_factory.mktemp("fp8") / "fp8-all", "lm+vision", metadata)


def test_the_variant_is_saved_in_the_compressed_tensors_fp8_layout(fp8_variant):
    config = json.loads((fp8_variant / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "float-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"] == {
        **group["input_activations"], "strategy": "token", "dynamic": True, "num_bits": 8, "type": "float"}
    tensors = {}
    for shard in fp8_variant.glob("*.safetensors"):
        tensors |= load_file(shard)
    name = "vlm.model.language_model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
    assert tensors[f"{name}.weight_scale"].shape == (tensors[f"{name}.weight"].shape[0], 1)
    assert tensors["vlm.model.visual.blocks.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert tensors["embedding_proj_layer.weight"].dtype == torch.bfloat16
    metadata = json.loads((fp8_variant / "quantization_metadata.json").read_text())
    assert metadata["calibration"]["needed"] is False and "no calibration" in metadata["calibration"]["note"]
    assert "W8A8 FP8" in (fp8_variant / "README.md").read_text()


def test_the_variant_reloads_and_embeds_close_to_bf16(fp8_variant, tiny_path):
    from PIL import Image

    texts = ["What was the 2019 revenue?", "Which table lists the staff?", "energy use per site"]
    images = [Image.new("RGB", (256, 320), colour) for colour in ("white", "navy")]
    base, processor = colquant.load(tiny_path, device="cpu")
    model, _ = colquant.load(fp8_variant, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == len(fp8_targets(base, "lm+vision"))
    assert all(layer.kernels is fp8_dispatch.KERNELS for layer in layers)  # attached, with accelerate off on CPU
    saved = load_file(next(fp8_variant.glob("*.safetensors")))
    some = next(k for k in saved if k.endswith(".weight_scale"))
    assert torch.equal(model.get_submodule(some.removesuffix(".weight_scale")).weight_scale, saved[some])
    (bq, bp), (fq, fp) = embed(base, processor, texts, images), embed(model, processor, texts, images)
    cosines = torch.cat([(a * b).sum(-1) for a, b in zip(bq + bp, fq + fp)])
    logging.getLogger(__name__).info("tiny fp8-all token cosine vs bf16: mean %.5f, min %.5f", cosines.mean(), cosines.min())
    assert cosines.mean() > 0.99 and cosines.min() > 0.95
    assert torch.equal(colquant.score(fq, fp).argmax(1), colquant.score(bq, bp).argmax(1))


def rewrite(variant: Path, target: Path, change) -> Path:
    """A copy of the variant with `change(tensors)` applied to its weights."""
    import shutil

    shutil.copytree(variant, target)
    for shard in target.glob("*.safetensors"):
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    index = target / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in _all_keys(target)}
        index.write_text(json.dumps(data))
    return target


def _all_keys(folder: Path) -> set[str]:
    return {key for shard in folder.glob("*.safetensors") for key in load_file(shard)}


def test_a_missing_weight_scale_is_a_checkpoint_error_naming_it(fp8_variant, tmp_path):
    name = "vlm.model.language_model.layers.1.mlp.down_proj.weight_scale"
    broken = rewrite(fp8_variant, tmp_path / "broken", lambda t: t.pop(name, None))
    with pytest.raises(CheckpointError, match=rf"lacks {name}.*re-create the variant"):
        colquant.load(broken, device="cpu")


def test_a_weight_in_the_wrong_dtype_is_a_checkpoint_error(fp8_variant, tmp_path):
    name = "vlm.model.language_model.layers.0.self_attn.k_proj.weight"

    def to_bf16(tensors):
        if name in tensors:
            tensors[name] = tensors[name].to(torch.bfloat16)

    broken = rewrite(fp8_variant, tmp_path / "broken", to_bf16)
    with pytest.raises(CheckpointError, match=rf"{name} is stored as bfloat16, expected float8_e4m3fn"):
        colquant.load(broken, device="cpu")


def test_a_scale_of_the_wrong_shape_is_a_checkpoint_error(fp8_variant, tmp_path):
    name = "vlm.model.visual.blocks.0.mlp.linear_fc1.weight_scale"

    def flatten(tensors):
        if name in tensors:
            tensors[name] = tensors[name].flatten()

    broken = rewrite(fp8_variant, tmp_path / "broken", flatten)
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[128\], the architecture needs \[128, 1\]"):
        colquant.load(broken, device="cpu")


def test_an_unsupported_fp8_scheme_is_a_checkpoint_error(fp8_variant, tmp_path):
    import shutil

    broken = tmp_path / "tensor-scales"
    shutil.copytree(fp8_variant, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights has {'strategy': 'tensor'}"):
        colquant.load(broken, device="cpu")


def test_profiles_select_fp8_kinds_and_reject_unknown_ones():
    from colquant.research import workspace
    from colquant.research.params import ProfileError, load_profile, validate_profile

    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    assert profile["quantization"]["fp8"] == ["lm", "all"]
    # after the auto-round and RTN variants; the tiny profile's W4A8 run (quantization.w4a8) comes next, the grid's last
    assert workspace.expected_variants(profile, grid=False)[-3:] == ["fp8-lm", "fp8-all", workspace.w4a8_variant(profile, 512)]
    profile["quantization"]["fp8"] = ["vision"]
    with pytest.raises(ProfileError, match=r"quantization\.fp8\[0\]='vision' is not allowed"):
        validate_profile(profile)
    del profile["quantization"]["fp8"]
    assert validate_profile(profile)["quantization"]["fp8"] == []


def test_notebook_03_makes_the_fp8_variant_once(tmp_path, monkeypatch):
    from colquant.research import workspace
    from colquant.research.params import load_profile
    from colquant.research.variants import produce_fp8_variant

    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    first = produce_fp8_variant(profile, "lm")
    assert not first["reused"] and first["variant"] == "fp8-lm" and first["settings"]["method"] == fp8.METHOD
    assert first["quantized_layers"] == 4 * 7  # the tiny model's 4 decoder layers x 7 projections
    assert produce_fp8_variant(profile, "lm")["reused"]
    assert list(workspace.quantized_variants(profile)) == ["fp8-lm"]
    with pytest.raises(ValueError, match="kind 'half'"):
        produce_fp8_variant(profile, "half")


def test_the_fused_text_tower_runs_fp8_layers_like_transformers_forward(fp8_variant):
    """`load(..., accelerate=True)` fuses the FP8 q/k/v and gate/up (exact: per-channel scales) and
    installs the fused tower; on CPU its reference ops give what transformers' forward gives."""
    texts = ["What was the 2019 revenue?", "Which table lists the staff?"]
    plain, processor = colquant.load(fp8_variant, device="cpu", accelerate=False)
    fused, _ = colquant.load(fp8_variant, device="cpu", accelerate=True)
    attn = fused.language_model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, FP8Linear) and not hasattr(attn, "q_proj")
    assert isinstance(fused.language_model.layers[0].mlp.gate_up_proj, FP8Linear)
    a = plain.encode_queries(texts, processor=processor)
    b = fused.encode_queries(texts, processor=processor)
    assert all(torch.allclose(x, y, atol=2e-2) for x, y in zip(a, b))


def test_prepare_fp8_gives_the_bench_an_fp8_model(tiny_path):
    from colquant.deploy.bench import prepare_fp8

    model, processor = colquant.load(tiny_path, device="cpu", accelerate=False)
    reference = model.encode_queries(["energy use per site"], processor=processor)[0]
    info = prepare_fp8(model, {}, scope="lm")
    assert info["fp8_layers"] == 4 * 7 and info["fused_projections"] == 4 * 2
    assert getattr(model, "_colquant_acceleration")["unfused"] == 0
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 4 * 4  # qkv, o, gate_up, down per layer
    cosine = (model.encode_queries(["energy use per site"], processor=processor)[0] * reference).sum(-1)
    assert cosine.min() > 0.95


def test_a_gpu_layer_that_cannot_use_fp8_kernels_says_why(monkeypatch, caplog):
    """On an FP8 GPU, fp16 activations (rowwise _scaled_mm outputs bf16 only) run the reference and
    say so; checked here with the device check answered as a GPU would."""
    from colquant.kernels import backend

    monkeypatch.setattr(backend, "_WARNED", set())
    monkeypatch.setattr(fp8_dispatch, "kernels_run_on", lambda device: True)
    layer = FP8Linear.from_linear(make_linear(64, 16).to(torch.float16))
    fp8_dispatch.attach(layer)
    with caplog.at_level(logging.WARNING, logger="colquant.kernels"):
        y = layer(torch.randn(2, 64, dtype=torch.float16))
    assert y.dtype == torch.float16
    assert any("torch.float16 (rowwise torch._scaled_mm outputs bfloat16 only" in r.getMessage() for r in caplog.records)


def test_fp8_vision_layers_run_in_the_fast_vision_tower(fp8_variant, monkeypatch):
    """fp8-all's vision tower takes the fast path (installed by accelerate_model on CUDA), its GEMMs
    through the FP8 layers. Forced available here on CPU, where the fast tower runs its torch
    equivalents: the page embeddings match transformers' eager tower with the same layers."""
    from PIL import Image

    from colquant.kernels import fast_vision

    monkeypatch.setattr(fast_vision, "unavailable_reason", lambda device: None)
    image = Image.new("RGB", (256, 320), "white")
    model, processor = colquant.load(fp8_variant, device="cpu", accelerate=True)
    visual = fast_vision.find_vision_tower(model)
    assert getattr(type(visual), "_colquant_fast", False) and isinstance(visual.blocks[0].attn.qkv, FP8Linear)
    fast = model.encode_pages([image], processor=processor)[0]
    fast_vision.restore_vision(model)
    eager = model.encode_pages([image], processor=processor)[0]
    assert torch.nn.functional.cosine_similarity(fast.float(), eager.float(), dim=-1).mean() > 0.998


def test_notebook_03s_layer_check_names_the_fp8_layers(fp8_variant):
    from colquant.quantize.autoround import layer_types
    from colquant.research import interpret

    model, _ = colquant.load(fp8_variant, device="cpu", accelerate=False)
    said = interpret.layer_check({"fp8-all": layer_types(model)})
    expected = sum(isinstance(m, FP8Linear) for m in model.modules())
    assert f"{expected:,} FP8 (e4m3) layers, in " in said and "vision" in said and "4-bit" not in said


# --------------------------------------------------------------------------------------------
# accumulation (fast, as vLLM's Hopper FP8 GEMMs; or precise)


class RecordingKernels:
    """Stands in for the attached FP8 kernels on CPU: they serve every call with the reference arithmetic,
    recording how each GEMM was asked to accumulate."""

    def __init__(self) -> None:
        self.fast_accum: list[bool] = []

    def serves(self, layer: FP8Linear, rows: torch.Tensor, out_dtype: torch.dtype) -> bool:
        return True

    def quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows_reference(x)

    def scaled_mm(self, q, scale, weight, weight_scale, bias, out_dtype, *, fast_accum: bool = False) -> torch.Tensor:
        self.fast_accum.append(fast_accum)
        y = fp8.dequantize(q, scale) @ fp8.dequantize(weight, weight_scale).t()
        return (y if bias is None else y + bias.float()).to(out_dtype)


def test_fp8_gemms_accumulate_fast_by_default_and_precisely_when_asked():
    kernels = RecordingKernels()
    model = nn.Sequential(FP8Linear.from_linear(make_linear(64, 32)), FP8Linear.from_linear(make_linear(32, 16)))
    for layer in model:
        layer.kernels = kernels
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    model(x)
    model[1](quantize_rows_reference(torch.randn(3, 32, dtype=torch.bfloat16)))  # a producer's pre-quantized rows
    assert kernels.fast_accum == [True, True, True]
    assert fp8.set_accumulation(model, "precise") == 2
    model(x)
    assert kernels.fast_accum[3:] == [False, False]
    assert "accumulation=precise" in repr(model[0])
    fused = FP8Linear.concat([model[0], FP8Linear.from_linear(make_linear(64, 16))])
    assert fused.accumulation == "precise" and fused.kernels is kernels  # as the layers it replaces


def test_a_bad_accumulation_or_a_model_without_fp8_layers_is_refused():
    model = nn.Sequential(FP8Linear.from_linear(make_linear(64, 32)))
    with pytest.raises(ValueError, match="'fastest' is not one of 'fast', 'precise'"):
        fp8.set_accumulation(model, "fastest")
    with pytest.raises(ValueError, match="has no FP8 layers.*load an FP8 variant"):
        fp8.set_accumulation(nn.Sequential(make_linear(64, 32)), "precise")


def test_load_sets_the_fp8_accumulation_and_refuses_it_for_other_checkpoints(fp8_variant, tiny_path, monkeypatch):
    model, _ = colquant.load(fp8_variant, device="cpu", fp8_accumulation="precise")
    assert {m.accumulation for m in model.modules() if isinstance(m, FP8Linear)} == {"precise"}
    model, _ = colquant.load(fp8_variant, device="cpu")
    assert {m.accumulation for m in model.modules() if isinstance(m, FP8Linear)} == {fp8.DEFAULT_ACCUMULATION}
    from colquant.retriever.model import ColQwen3

    monkeypatch.setattr(ColQwen3, "from_pretrained", None)  # refused before any weight is read
    with pytest.raises(ValueError, match="applies to FP8 variants only"):
        colquant.load(tiny_path, device="cpu", fp8_accumulation="fast")
    with pytest.raises(ValueError, match="'exact' is not one of"):
        colquant.load(fp8_variant, device="cpu", fp8_accumulation="exact")


def test_the_bench_times_each_fp8_variant_with_both_accumulations():
    from colquant.deploy import bench

    for variant in ("fp8-lm", "fp8-all"):
        assert bench.PREPARE[variant].keywords.get("accumulation", fp8.DEFAULT_ACCUMULATION) == "fast"
        assert bench.PREPARE[f"{variant}-precise"].keywords["accumulation"] == "precise"


def test_query_graphs_are_keyed_by_the_fp8_accumulation():
    """A graph replays the GEMMs it captured: one captured with the old accumulation is never replayed
    after set_accumulation changed it."""
    from colquant.kernels.fast_text import QueryGraphs

    model = nn.Sequential(FP8Linear.from_linear(make_linear(64, 32)))
    graphs = QueryGraphs(model)
    fast = graphs.key(8, 64)
    fp8.set_accumulation(model, "precise")
    assert graphs.key(8, 64) != fast
    fp8.set_accumulation(model, "fast")
    assert graphs.key(8, 64) == fast
