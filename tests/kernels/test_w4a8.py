"""W4A8 (kernels/w4a8.py): the re-encoding and the kernel's table weights exactly, the CPU reference against an
independent computation, `colquant.load(activations="fp8")` on the tiny W4A16 variant and its refusals; where
vLLM's library and a Hopper GPU are, CUTLASS W4A8 against the reference's numbers on the same inputs."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import colquant
from colquant.kernels import force_reference, vllm_ops, w4a8
from colquant.kernels.linear import W4A16Linear, is_quant_linear
from colquant.kernels.packing import unpack_kblocked
from colquant.retriever import fp8
from colquant.retriever.weight_checks import CheckpointError
from e4m3_rounding import round_e4m3

G = w4a8.GROUP_SIZE


def _w4a16(k: int = 256, n: int = 128, seed: int = 0, bias: bool = False, device="cpu") -> W4A16Linear:
    torch.manual_seed(seed)
    return W4A16Linear.from_linear(torch.nn.Linear(k, n, bias=bias).to(device, torch.bfloat16))


def _values(lin: W4A16Linear) -> torch.Tensor:
    """The layer's signed int4 values [K, N], read straight off its kernel layout."""
    return unpack_kblocked(lin.qweight_k.cpu()).double() - 8


# ------------------------------------------------------------------ the encoding and the table (exact, CPU)


def test_encode_gives_q_minus_8_and_the_vllm_scales():
    lin = _w4a16(seed=1)
    words, scales, chan = w4a8.encode(*lin.kernel_tensors())
    assert words.dtype == torch.int32 and words.shape == lin.qweight_k.shape
    assert torch.equal(w4a8.signed_int4(words).double(), _values(lin))
    want_scales, want_chan = vllm_ops.fp8_group_scales(lin.scales)  # exact on its own (test_vllm_ops)
    assert torch.equal(scales.view(torch.uint8), want_scales.view(torch.uint8)) and torch.equal(chan, want_chan)


def test_encode_refuses_asymmetric_zero_points():
    lin = _w4a16()
    zeros = lin.zeros_u8.clone()
    zeros[1, 3] = 7
    with pytest.raises(ValueError, match="asymmetric zero points"):
        w4a8.encode(lin.qweight_k, zeros, lin.scales)


def test_table_weight_rounds_each_int4_times_scale_once_to_e4m3():
    """CUTLASS multiplies through a table of e4m3(s * q) (cutlass::packed_scale_t): one more rounding per weight."""
    lin = _w4a16(256, 256, seed=2)
    words, scales, _ = w4a8.encode(*lin.kernel_tensors())
    exact = _values(lin) * scales.double().repeat_interleave(G, 0)
    got = w4a8.table_weight(words, scales, G)
    assert got.dtype == torch.float32 and torch.equal(got.double(), round_e4m3(exact))
    assert not torch.equal(got.double(), exact)  # the rounding is real: 3, 5, 6 and 7 times a scale often leave e4m3


def test_dequantize_is_the_table_weight_times_the_channel_scale():
    lin = _w4a16(seed=3)
    layer = w4a8.W4A8Linear.from_w4a16(lin)
    want = round_e4m3(_values(lin) * layer.group_scales.double().repeat_interleave(G, 0)) * layer.channel_scales.double().t()
    assert torch.equal(layer.dequantize().double(), want.t().float().double())
    err = (layer.dequantize().double() - lin.dequantize(torch.float64)).norm() / lin.dequantize(torch.float64).norm()
    assert err < vllm_ops.W4A8_CHECK_REL_ERR  # e4m3 scales and products: within the tuner's W4A8 bound of W4A16


# ------------------------------------------------------------------ the CPU reference


def _independent_w4a8(lin: W4A16Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact float64 result before the bf16 write, the magnitude sum bounding fp32 accumulation error), computed
    from the W4A16 layer and the rules alone: rows e4m3 per token (scale amax/448 in fp32), weights e4m3(q * s)
    with the vLLM scales, times the token and channel scales."""
    token = (x.float().abs().amax(-1, keepdim=True) / 448).clamp_min(fp8.SCALE_FLOOR)
    rows = round_e4m3((x.float() / token).clamp(-448, 448))
    scales, chan = vllm_ops.fp8_group_scales(lin.scales)
    weight = round_e4m3(_values(lin) * scales.double().repeat_interleave(G, 0))
    outer = token.double() * chan.double().t()
    return (rows @ weight) * outer, (rows.abs() @ weight.abs()) * outer


@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_reference_is_w4a8_arithmetic(m, bias):
    lin = _w4a16(256, 128, seed=m, bias=bias)
    if bias:
        lin.bias.normal_()
    layer = w4a8.W4A8Linear.from_w4a16(lin)
    x = torch.randn(m, 256, dtype=torch.bfloat16) * 4
    got = layer(x)
    exact, magnitude = _independent_w4a8(lin, x)
    y = exact.to(torch.bfloat16)
    want = y + lin.bias if bias else y  # the kernel adds the bias to its bf16 output, in bf16
    assert got.dtype == torch.bfloat16 and got.shape == (m, 128)
    # fp32 accumulation (<= 2^-20 of the magnitude sum at K = 256) can move a value across a bf16 rounding
    # boundary: one bf16 step (2^-7 relative) of the product, one more of the sum with the bias
    bound = 2**-7 * (exact.abs() + want.double().abs()) + 2**-20 * magnitude
    assert bool(((got.double() - want.double()).abs() <= bound).all())
    assert (got == want).float().mean() > 0.9


def test_a_pre_quantized_pair_and_3d_activations_give_the_same_rows():
    layer = w4a8.W4A8Linear.from_w4a16(_w4a16(seed=4))
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    plain = layer(x)
    assert plain.shape == (2, 5, 128)
    assert torch.equal(layer(fp8.quantize_rows_reference(x.reshape(10, 256))), plain.reshape(10, 128))


def test_a_layer_the_kernel_cannot_take_is_refused_not_run_another_way():
    """The tiny model's k_proj (128 -> 64) on a GPU: CUTLASS W4A8 needs N % 128 == 0; refused before any CUDA call."""
    layer = w4a8.W4A8Linear.from_w4a16(_w4a16(128, 64))
    with pytest.raises(ValueError, match="cannot run this layer.*multiples of 128"):
        layer._attach_kernel(torch.device("cuda"))


def test_activations_on_another_device_are_refused():
    layer = w4a8.W4A8Linear.from_w4a16(_w4a16())
    with pytest.raises(RuntimeError, match="computes on cpu and got activations on meta"):
        layer(torch.zeros(3, 256, dtype=torch.bfloat16, device="meta"))


# ------------------------------------------------------------------ what may run as W4A8


def _autoround(**change):
    return {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True, **change}


@pytest.mark.parametrize("config, problem", [
    (None, "no quantization_config"),
    (fp8.quantization_config("lm"), "FP8 \\(W8A8\\) checkpoint"),
    (_autoround(quant_method="awq"), "quant_method='awq'"),
    (_autoround(bits=8), "bits=8"),
    (_autoround(sym=False), "asymmetric"),
    (_autoround(group_size=64), "group size is 64"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": True}, "act-order"),
])
def test_checkpoints_that_are_not_4bit_symmetric_group_128_are_named_why(config, problem):
    assert re.search(problem, w4a8.checkpoint_problem(config))


@pytest.mark.parametrize("config", [_autoround(packing_format="auto_round:auto_gptq"),
                                    {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                     "desc_act": False}])
def test_auto_round_and_gptq_symmetric_checkpoints_may(config):
    assert w4a8.checkpoint_problem(config) is None


def test_devices_cpu_runs_the_reference_cuda_only_the_kernel():
    assert w4a8.device_problem(torch.device("cpu"), torch.bfloat16) is None
    assert "bfloat16" in w4a8.device_problem(torch.device("cpu"), torch.float16)
    cuda = torch.device("cuda:0")
    reason = vllm_ops.unavailable_reason(cuda, "w4a8")
    problem = w4a8.device_problem(cuda, torch.bfloat16)
    assert problem is None if reason is None else reason in problem


# ------------------------------------------------------------------ colquant.load(activations="fp8")


def _page() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))


TEXTS = ["What was the 2019 revenue of the energy unit?", "Which table lists the staff per site?"]


def _embed(model, processor) -> list[torch.Tensor]:
    return model.encode_queries(TEXTS, processor=processor) + model.encode_pages([_page()], processor=processor)


def test_load_fp8_runs_every_4bit_text_layer_as_w4a8_close_to_w4a16(tiny_w4a16_path):
    model, processor = colquant.load(tiny_w4a16_path, activations="fp8", max_num_visual_tokens=64)
    w4a16, _ = colquant.load(tiny_w4a16_path, max_num_visual_tokens=64)
    layers = [m for m in model.modules() if isinstance(m, w4a8.W4A8Linear)]
    per_layer = 7  # q, k, v, o, gate, up, down: transformers' decoder layers (accelerate is off on CPU)
    assert model._colquant_w4a8 == dict(activations="fp8", layers=per_layer * model.config.text_config.num_hidden_layers,
                                        device="cpu", runs=w4a8.REFERENCE)
    assert len(layers) == model._colquant_w4a8["layers"]
    assert not any(isinstance(m, W4A16Linear) or is_quant_linear(m) for m in model.modules())  # one 4-bit copy
    got, want = _embed(model, processor), _embed(w4a16, processor)
    cosines = torch.cat([(a * b).sum(-1) for a, b in zip(got, want)])  # unit-norm token vectors
    # W4A8 adds e4m3 rounding to W4A16's arithmetic: activations (<= 2^-4 relative per value), scales and products
    # (the same once more), about 4% in norm per GEMM (the tuner's bound is 6e-2). Four layers of four GEMMs in
    # quadrature give token cosines above 1 - 16 * 0.06^2 / 2 ~ 0.97; a wrong sign, scale or row is far below.
    assert cosines.min() > 0.97
    assert not all(torch.equal(a, b) for a, b in zip(got, want))  # the activations really are FP8


def test_load_fp8_with_the_fused_tower_feeds_w4a8_layers_quantized_rows(tiny_w4a16_path):
    fused, processor = colquant.load(tiny_w4a16_path, activations="fp8", accelerate=True)
    plain, _ = colquant.load(tiny_w4a16_path, activations="fp8")
    layers = {name: m for name, m in fused.named_modules() if isinstance(m, w4a8.W4A8Linear)}
    assert len(layers) == 4 * fused.config.text_config.num_hidden_layers  # qkv, o, gate_up, down
    inputs = {name: set() for name in layers}
    hooks = [m.register_forward_pre_hook(lambda module, args, name=name: inputs[name].add(type(args[0])))
             for name, m in layers.items()]
    got = fused.encode_queries(TEXTS, processor=processor)
    for hook in hooks:
        hook.remove()
    # every GEMM but o (fed by attention: quantized inside the layer) gets e4m3 rows from its fused producer
    assert {name.rsplit(".", 1)[1]: kinds for name, kinds in inputs.items()} == {
        "qkv_proj": {tuple}, "o_proj": {torch.Tensor}, "gate_up_proj": {tuple}, "down_proj": {tuple}}
    want = plain.encode_queries(TEXTS, processor=processor)
    assert all(torch.allclose(a, b, atol=2e-2) for a, b in zip(got, want))


def test_load_refuses_bad_activations_before_loading(tiny_w4a16_path):
    with pytest.raises(ValueError, match="activations='int8'.*'bf16', 'fp8'"):
        colquant.load(tiny_w4a16_path, activations="int8")
    with pytest.raises(ValueError, match="trust_remote_code"):
        colquant.load(tiny_w4a16_path, activations="fp8", trust_remote_code=True)
    with pytest.raises(ValueError, match="bf16_copy"):
        colquant.load(tiny_w4a16_path, activations="fp8", bf16_copy=True)
    with pytest.raises(RuntimeError, match="bfloat16"):
        colquant.load(tiny_w4a16_path, activations="fp8", dtype="float16")


def test_load_fp8_of_a_16bit_checkpoint_is_refused_naming_why(tiny_path):
    with pytest.raises(CheckpointError, match="not one: it has no quantization_config"):
        colquant.load(tiny_path, activations="fp8")


def test_load_fp8_of_an_asymmetric_checkpoint_is_refused_naming_why(tiny_w4a16_path, tmp_path):
    copy = shutil.copytree(tiny_w4a16_path, tmp_path / "asym")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["sym"] = False
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="asymmetric"):
        colquant.load(copy, activations="fp8")


def test_load_fp8_without_the_kernel_on_the_gpu_is_refused_not_replaced(tiny_w4a16_path, monkeypatch):
    """A CUDA device without vLLM's library (or not Hopper): refused with vllm_ops' reason, never W4A16 instead."""
    from colquant.inference import loading

    monkeypatch.setattr(loading, "resolve_device", lambda device: torch.device("cuda:0"))
    monkeypatch.setattr(vllm_ops, "unavailable_reason", lambda device, kind: f"no {kind} library (test)")
    with pytest.raises(RuntimeError, match="cannot run on cuda:0: no w4a8 library \\(test\\).*activations='bf16'"):
        colquant.load(tiny_w4a16_path, activations="fp8")


# ------------------------------------------------------------------ CUTLASS W4A8 (CUDA, library present)

CUDA = torch.device("cuda") if torch.cuda.is_available() else None
_WHY = vllm_ops.unavailable_reason(CUDA, "w4a8") if CUDA is not None else "no CUDA"
needs_kernel = pytest.mark.skipif(_WHY is not None, reason=f"needs vLLM's CUTLASS W4A8 here: {_WHY}")


@needs_kernel
def test_the_kernels_scale_table_is_the_references():
    """cutlass_pack_scale_fp8 writes e4m3(s * q) for q = -8 .. -1 per scale: the products table_weight rounds."""
    lin = _w4a16(2560, 1024, seed=5, device=CUDA)
    _, scales, _ = w4a8.encode(*lin.kernel_tensors("cpu"))
    packed = torch.ops._C.cutlass_pack_scale_fp8(scales.to(CUDA).contiguous()).cpu().reshape(-1, 8).double()
    q = torch.arange(-8, 0, dtype=torch.float64)
    want = round_e4m3(scales.double().reshape(-1, 1) * q)
    assert torch.equal(packed.sort(dim=1).values, want.sort(dim=1).values)


@needs_kernel
@pytest.mark.parametrize("m", [1, 42, 1344])
def test_cutlass_w4a8_gives_the_reference_numbers(m):
    """The same e4m3 rows and table weights, summed in another order: below a bf16 step apart in norm."""
    lin = _w4a16(2560, 1024, seed=m, bias=True, device=CUDA)
    layer = w4a8.W4A8Linear.from_w4a16(lin)
    assert layer._packed is not None and layer.int4_words.device.type == "cpu"  # one 4-bit copy on the GPU
    x = torch.randn(m, 2560, device=CUDA, dtype=torch.bfloat16)
    pair = fp8.quantize_rows_reference(x)
    want = w4a8.reference_matmul(pair, layer.int4_words, layer.group_scales, layer.channel_scales, G, layer.bias)
    for got in (layer(pair), layer(x)):  # pre-quantized rows; rows quantized by the fused producer
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2**-8
    with force_reference():
        assert torch.equal(layer(pair), want)


@needs_kernel
def test_load_fp8_on_cuda_routes_every_4bit_text_layer_to_cutlass(tiny_w4a16_path):
    model, processor = colquant.load(tiny_w4a16_path, device="cuda", activations="fp8", max_num_visual_tokens=64)
    assert model._colquant_w4a8["runs"] == w4a8.KERNEL
    layers = [m for m in model.modules() if isinstance(m, w4a8.W4A8Linear)]
    assert layers and all(m._packed is not None for m in layers)
    assert not any(isinstance(m, W4A16Linear) or is_quant_linear(m) for m in model.modules())
    got = _embed(model, processor)  # queries through the CUDA graphs, a page eagerly
    with force_reference():
        want = _embed(model, processor)
    reference_on_cpu = _embed(*colquant.load(tiny_w4a16_path, activations="fp8", max_num_visual_tokens=64))
    for a, b, c in zip(got, want, reference_on_cpu):
        a, b, c = (t.float().cpu() for t in (a, b, c))
        assert torch.allclose(a, b, atol=2e-2) and torch.allclose(a, c, atol=2e-2)
