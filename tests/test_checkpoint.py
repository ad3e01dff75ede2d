import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import colquant
from colquant.checkpoint import CheckpointError


@pytest.fixture
def checkpoint_copy(tiny_path, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_path, tmp_path / "copy"))


def _edit_shard_holding(path: Path, tensor_name: str, edit) -> None:
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = path / index["weight_map"][tensor_name]
    tensors = load_file(str(shard))
    edit(tensors, index["weight_map"], shard.name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    model, processor = tiny_model
    model.save_pretrained(str(tmp_path / "saved"), max_shard_size="16MB")
    processor.save_pretrained(tmp_path / "saved")
    reloaded, _ = colquant.load(tmp_path / "saved")
    original, again = model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[name], again[name]) for name in original)


def test_tied_lm_head_in_the_checkpoint_is_accepted(checkpoint_copy):
    name = "vlm.model.language_model.embed_tokens.weight"

    def add_lm_head(tensors, weight_map, shard):
        tensors["vlm.lm_head.weight"] = tensors[name].clone()
        weight_map["vlm.lm_head.weight"] = shard

    _edit_shard_holding(checkpoint_copy, name, add_lm_head)
    model, _ = colquant.load(checkpoint_copy)
    assert not hasattr(model.vlm, "lm_head")


def test_missing_tensor_is_named(checkpoint_copy):
    name = "vlm.model.language_model.layers.1.mlp.up_proj.weight"

    def drop(tensors, weight_map, shard):
        del tensors[name]
        del weight_map[name]

    _edit_shard_holding(checkpoint_copy, name, drop)
    with pytest.raises(CheckpointError, match=r"missing keys: .*layers\.1\.mlp\.up_proj\.weight"):
        colquant.load(checkpoint_copy)


def test_unexpected_tensor_is_named(checkpoint_copy):
    name = "embedding_proj_layer.weight"

    def add(tensors, weight_map, shard):
        tensors["vlm.model.extra_head.weight"] = torch.zeros(3)
        weight_map["vlm.model.extra_head.weight"] = shard

    _edit_shard_holding(checkpoint_copy, name, add)
    with pytest.raises(CheckpointError, match=r"unexpected keys: vlm\.model\.extra_head\.weight"):
        colquant.load(checkpoint_copy)


def test_truncated_shard_is_reported_with_the_fix(checkpoint_copy):
    shard = sorted(checkpoint_copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name} in .* is truncated or corrupt.*download again"):
        colquant.load(checkpoint_copy)


def test_missing_shard_is_reported(checkpoint_copy):
    shard = sorted(checkpoint_copy.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is listed in the index but missing"):
        colquant.load(checkpoint_copy)


def test_unknown_hub_id_offline_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"hub is unreachable.*hf download nobody/no-such-model"):
        colquant.load("nobody/no-such-model")


def test_nonexistent_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        colquant.load(tmp_path / "nowhere" / "model")


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        colquant.load(tmp_path / "empty")


@torch.no_grad()
def test_accelerated_load_matches_the_plain_forward(tiny_path):
    """On CPU the fused tower runs its reference ops; it must compute the same embeddings."""
    plain, processor = colquant.load(tiny_path)
    fused, _ = colquant.load(tiny_path, accelerate=True)
    assert getattr(fused, "_colquant_acceleration")["backend"] == "reference"
    batch = processor.process_queries(["what was the revenue in 2019", "q"])
    expected, got = plain(**batch).embeddings.float(), fused(**batch).embeddings.float()
    assert torch.allclose(expected, got, atol=3e-2)
    assert got[~batch["attention_mask"].bool()].eq(0).all()
