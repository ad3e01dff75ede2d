import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import colquant
from colquant.evaluate.corpus import build_corpus
from colquant.quantize.calibration import build_text_calibration
from colquant.retriever import checkpoint
from colquant.retriever.checkpoint import CheckpointError, resolve_device
from colquant.quantize.autoround import (
    QuantizationSettings,
    decoder_linear_names,
    quantization_metadata,
    quantize_language_model,
    save_quantized_model,
)

UP_PROJ = "vlm.model.language_model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def checkpoint_copy(tiny_path, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_path, tmp_path / "copy"))


@pytest.fixture(scope="module")
def rtn_checkpoint(tiny_path, tmp_path_factory) -> Path:
    """A real 4-bit (RTN, group 128) checkpoint of the tiny model, as the pipeline writes it."""
    model, processor = colquant.load(tiny_path)
    corpus = build_corpus(tmp_path_factory.mktemp("corpus"), n_pages=4, n_queries=4, progress=False)
    calibration = build_text_calibration(
        processor.tokenizer, source="pile-10k", seqlen=32, nsamples=2, seed=0, offline_fallback="embedded", corpus=corpus
    )
    settings = QuantizationSettings(method="rtn", bits=4, group_size=128, sym=True, iters=0, batch_size=2, seed=0)
    autoround, cost = quantize_language_model(model, processor, calibration, settings)
    metadata = quantization_metadata("rtn-test", settings, calibration, cost, base_model=str(tiny_path), base_model_revision="local build",
                                     random_weights=True, quantized_layers=decoder_linear_names(model.language_model))
    return save_quantized_model(model, processor, autoround, tmp_path_factory.mktemp("q") / "rtn", metadata=metadata)


@pytest.fixture
def rtn_copy(rtn_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(rtn_checkpoint, tmp_path / "rtn"))


def _edit_shard_holding(path: Path, tensor_name: str, edit) -> None:
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {"weight_map": {tensor_name: "model.safetensors"}}
    shard = path / index["weight_map"][tensor_name]
    tensors = load_file(str(shard))
    edit(tensors, index["weight_map"], shard.name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if index_file.exists():
        index_file.write_text(json.dumps(index))


def _replace_tensor(path: Path, name: str, change) -> None:
    _edit_shard_holding(path, name, lambda tensors, weight_map, shard: tensors.__setitem__(name, change(tensors[name])))


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


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


def test_missing_local_folder_shaped_like_a_hub_id_is_reported_as_a_missing_folder(tmp_path, monkeypatch):
    (tmp_path / "outputs" / "base-model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint directory at .*outputs/base-modl: the local folder "
                                              r"does not exist \(outputs holds: base-model\)"):
        colquant.load("outputs/base-modl")


def test_config_that_is_not_json_names_the_file_and_the_fix(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text('{"model_type": "colqwen3",')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON \(.*line 1.*\); re-download"):
        colquant.load(checkpoint_copy)


def test_config_that_is_not_an_object_names_the_file_and_the_fix(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text('["colqwen3"]')
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON list, not an object of settings; re-download"):
        colquant.load(checkpoint_copy)


def test_missing_index_and_missing_shard_are_both_named(checkpoint_copy):
    (checkpoint_copy / "model.safetensors.index.json").unlink()
    (checkpoint_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json; shard\(s\) 2 of 2 are missing"):
        colquant.load(checkpoint_copy)


def test_missing_index_alone_is_named(checkpoint_copy):
    (checkpoint_copy / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"sharded weights .* but no model\.safetensors\.index\.json\. Re-download"):
        colquant.load(checkpoint_copy)


def test_tensor_of_the_wrong_dtype_is_not_cast_silently(checkpoint_copy):
    _replace_tensor(checkpoint_copy, UP_PROJ, lambda tensor: tensor.float())
    with pytest.raises(CheckpointError, match=rf"{UP_PROJ} is stored as float32, expected bfloat16\. config\.json "
                                              "declares dtype bfloat16 and loading would cast silently"):
        colquant.load(checkpoint_copy)


def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(checkpoint_copy):
    _replace_tensor(checkpoint_copy, UP_PROJ, lambda tensor: tensor.t().contiguous())
    with pytest.raises(CheckpointError, match=rf"model-0000\d-of-00002\.safetensors: {UP_PROJ} has shape \[128, 256\], "
                                              r"the architecture needs \[256, 128\]"):
        colquant.load(checkpoint_copy)


def test_rtn_checkpoint_passes_the_tensor_checks(rtn_checkpoint):
    checkpoint.verify_checkpoint(rtn_checkpoint)


@pytest.mark.parametrize(
    ("setting", "value", "tensor"),
    [("group_size", 64, r"mlp\.down_proj\.qzeros has shape \[2, 16\], the architecture needs \[4, 16\]"),
     ("bits", 8, r"mlp\.down_proj\.qweight has shape \[32, 128\], the architecture needs \[64, 128\]")],
)
def test_4bit_config_that_disagrees_with_its_tensors_is_named(rtn_copy, setting, value, tensor):
    _edit_config(rtn_copy, lambda config: config["quantization_config"].__setitem__(setting, value))
    with pytest.raises(CheckpointError, match=rf"{tensor}; .*\. config\.json's quantization_config says .*{setting}={value}"):
        colquant.load(rtn_copy)


@pytest.mark.parametrize("missing", ["tokenizer.json", "preprocessor_config.json"])
def test_missing_processor_files_are_found_before_the_model_loads(checkpoint_copy, monkeypatch, missing):
    (checkpoint_copy / missing).unlink()

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the processor files were checked")

    monkeypatch.setattr(checkpoint.ColQwen3, "from_pretrained", must_not_load)
    with pytest.raises(CheckpointError, match=rf"lacks {missing}: the processor cannot be built"):
        colquant.load(checkpoint_copy)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor(checkpoint_copy, bad_value):
    _replace_tensor(checkpoint_copy, UP_PROJ, lambda tensor: tensor.index_fill(0, torch.tensor([3]), bad_value))
    with pytest.raises(CheckpointError, match=rf"tensor {UP_PROJ} holds 128 NaN/Inf value\(s\)"):
        colquant.load(checkpoint_copy)


def test_non_finite_scales_of_a_4bit_checkpoint_are_named(rtn_copy):
    name = "vlm.model.language_model.layers.0.self_attn.o_proj.scales"
    _replace_tensor(rtn_copy, name, lambda tensor: tensor.index_fill(1, torch.tensor([0]), float("nan")))
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds 1 NaN/Inf"):
        colquant.load(rtn_copy)


def test_device_auto_picks_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("option, value, allowed", [
    ("bf16_copy", "no", "True or False, or None"),
    ("accelerate", "no", "True or False, or None"),
    ("trust_remote_code", "no", "True or False"),
    ("bf16_copy", 0, "True or False, or None"),
])
def test_a_flag_that_is_no_boolean_is_refused_before_loading(tiny_path, option, value, allowed):
    """`bf16_copy="no"` was truthy: a BF16 copy was kept, the opposite of what was asked."""
    with pytest.raises(TypeError, match=rf"{option}={value!r} is not a boolean: pass {allowed}"):
        colquant.load(tiny_path, **{option: value})


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_a_cuda_device_without_a_gpu_is_refused_naming_the_fix(tiny_path, monkeypatch, device):
    """It raised torch's AssertionError "Torch not compiled with CUDA enabled" after reading the weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"this machine has no CUDA device .*pass device='auto' .* or 'cpu'"):
        colquant.load(tiny_path, device=device)


def test_a_cuda_device_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="has 2 CUDA device\\(s\\), so cuda:2 does not exist"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_load_with_device_auto(tiny_path):
    model, _ = colquant.load(tiny_path, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected


def test_unknown_dtype_is_named(tiny_path):
    with pytest.raises(CheckpointError, match=r"dtype='bfloat61' is not a weight dtype; use one of bfloat16"):
        colquant.load(tiny_path, dtype="bfloat61")


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
