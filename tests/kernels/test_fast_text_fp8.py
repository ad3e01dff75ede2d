"""The fused text tower's producers: which kernel makes each GEMM's input for each layer type, and
that FP8 layers fed pre-quantized rows give what they give when they quantize their own input.

On CPU the tower runs its torch reference ops and the FP8 producers their torch twins (the same
arithmetic as the Triton kernels, checked against them in tests/test_fp8_ops.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from colquant.kernels import fast_text, fp8_dispatch
from colquant.kernels import reference as ref
from colquant.kernels.linear import W4A16Linear, quantize_linears_rtn
from colquant.retriever.fp8 import FP8Linear, ReferenceProducers
from colquant.retriever.model import ColQwen3, ColQwen3Config


@pytest.fixture(scope="module")
def text_model() -> nn.Module:
    """The tiny model's text tower, fused, with FP8 layers in layer 0, bf16 in layer 1, W4A16 in layer 2."""
    torch.manual_seed(0)
    tm = ColQwen3(ColQwen3Config.tiny()).to(torch.bfloat16).eval().language_model
    fast_text.fuse_text_model(tm)
    layer0 = tm.layers[0]
    for module, name in ((layer0.self_attn, "qkv_proj"), (layer0.self_attn, "o_proj"),
                         (layer0.mlp, "gate_up_proj"), (layer0.mlp, "down_proj")):
        setattr(module, name, FP8Linear.from_linear(getattr(module, name)))
    quantize_linears_rtn(tm.layers[2])
    return tm


def test_each_layer_type_gets_its_producer(text_model):
    fp8_layer, bf16_layer, w4_layer = fast_text.layer_producers(text_model, ref)[:3]
    assert isinstance(text_model.layers[2].mlp.down_proj, W4A16Linear)
    for producer in (fp8_layer.attn_in, fp8_layer.mlp_in):
        assert producer.func is fast_text._norm_then_quantize
        assert producer.args == (ReferenceProducers.add_rmsnorm_quant,)
    assert fp8_layer.down_in is ReferenceProducers.silu_mul_quant
    for layer in (bf16_layer, w4_layer):
        assert layer.attn_in is ref.add_rmsnorm and layer.mlp_in is ref.add_rmsnorm and layer.down_in is ref.silu_mul


def test_the_triton_tower_takes_the_fused_kernels_only_where_fp8_kernels_run(text_model, monkeypatch):
    """With the Triton ops (stood in for by a namespace) the FP8 producers are `fp8_dispatch.producers`' choice:
    the Triton kernels on an FP8 GPU, the torch twins on CPU (here) or a GPU without FP8."""
    triton_ops = type("TritonOps", (), {"add_rmsnorm": object(), "silu_mul": object()})
    assert fast_text.layer_producers(text_model, triton_ops)[0].down_in is ReferenceProducers.silu_mul_quant
    kernels = type("Kernels", (), {"silu_mul_quant": object(), "add_rmsnorm_quant": object()})
    monkeypatch.setattr(fp8_dispatch, "producers", lambda device: kernels)
    first, second = fast_text.layer_producers(text_model, triton_ops)[:2]
    assert first.down_in is kernels.silu_mul_quant and first.mlp_in.args == (kernels.add_rmsnorm_quant,)
    assert second.down_in is triton_ops.silu_mul and second.attn_in is triton_ops.add_rmsnorm


def run_tower(text_model: nn.Module, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn(2, 9, text_model.config.hidden_size, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        return fast_text.fused_core(text_model, emb, fast_text._positions(None, 2, 9, "cpu"), None, all_valid=True)


def test_fp8_layers_take_pre_quantized_rows_and_give_what_they_gave_before(text_model, monkeypatch):
    """qkv, gate_up and down receive (e4m3, scale) pairs from their producers, o_proj its bf16 input
    (attention has no quantizing producer); the output equals the tower whose FP8 layers quantize
    their own bf16 input (the same torch arithmetic in another order of calls), bit for bit."""
    inputs: dict[str, list[type]] = {}
    original = FP8Linear.forward

    def spy(self, x):
        inputs.setdefault(self.name, []).append(type(x))
        return original(self, x)

    layer0 = text_model.layers[0]
    for module, name in ((layer0.self_attn, "qkv_proj"), (layer0.self_attn, "o_proj"),
                         (layer0.mlp, "gate_up_proj"), (layer0.mlp, "down_proj")):
        getattr(module, name).name = name
    monkeypatch.setattr(FP8Linear, "forward", spy)
    fused = run_tower(text_model, seed=1)
    assert inputs == {"qkv_proj": [tuple], "o_proj": [torch.Tensor], "gate_up_proj": [tuple], "down_proj": [tuple]}

    monkeypatch.setattr(fast_text, "norm_producer", lambda consumer, ops: ops.add_rmsnorm)
    monkeypatch.setattr(fast_text, "act_producer", lambda consumer, ops: ops.silu_mul)
    inputs.clear()
    unfused = run_tower(text_model, seed=1)
    assert inputs["qkv_proj"] == [torch.Tensor] and inputs["down_proj"] == [torch.Tensor]
    assert torch.equal(fused, unfused)
