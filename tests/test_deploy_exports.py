"""GPTQ exports are whole ColQwen3 retrievers (vision tower, projection, processor, config)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from colquant.quantize.exports import TOWER_PREFIX, complete_export
from colquant.retriever.remote_code import REMOTE_CODE_FILES


def tensors(directory):
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_gptq_export_is_a_whole_colqwen3_checkpoint(tiny_w4a16_path):
    export = tiny_w4a16_path / "exports" / "auto_gptq"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["ColQwen3"] and config["model_type"] == "colqwen3"
    assert config["quantization_config"]["quant_method"] == "gptq" and config["embed_dim"] == 320
    for name in ("preprocessor_config.json", "tokenizer.json", "colquant_processor.json", *REMOTE_CODE_FILES):
        assert (export / name).is_file(), name
    exported, variant = tensors(export), tensors(tiny_w4a16_path)
    outside_tower = [name for name in variant if not name.startswith(TOWER_PREFIX)]
    assert any(name.startswith("vlm.model.visual.") for name in outside_tower) and "embedding_proj_layer.bias" in outside_tower
    assert all(torch.equal(exported[name], variant[name]) for name in outside_tower)
    qweights = [name for name in exported if name.endswith(".qweight")]
    assert len(qweights) == 4 * 7 and all(name.startswith(TOWER_PREFIX + "layers.") for name in qweights)
    assert all(exported[name].dtype == torch.int32 for name in qweights)


def test_complete_export_refuses_an_export_without_weights(tiny_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        complete_export(tiny_path, tmp_path)
