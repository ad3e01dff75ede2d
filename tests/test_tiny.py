import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from colquant.retriever import tiny
from colquant.retriever.model import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID, ColQwen3Config


def test_tiny_checkpoint_has_the_hub_layout(tiny_path):
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "colqwen3" and config["embed_dim"] == 320
    assert {"text_config", "vision_config"} <= config.keys()
    index = json.loads((tiny_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((tiny_path / shard).exists() for shard in shards)
    prefixes = {name.split(".")[0] + "." + name.split(".")[1] for name in index["weight_map"]}
    assert prefixes == {"vlm.model", "embedding_proj_layer.weight", "embedding_proj_layer.bias"}
    assert (tiny_path / "tokenizer.json").exists() and (tiny_path / "preprocessor_config.json").exists()


def test_tokenizer_keeps_qwen_special_token_ids():
    tokenizer = tiny.build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>"])
    assert ids == [IMAGE_TOKEN_ID, VISION_START_TOKEN_ID, VISION_END_TOKEN_ID, PAD_TOKEN_ID]
    config = ColQwen3Config.colqwen3_4b()  # Qwen3-VL's own ids, which the model's forward pass looks for
    assert [config.image_token_id, config.vision_start_token_id, config.vision_end_token_id] == ids[:3]
    text = "Revenue 2019: 412 M€ <|image_pad|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_build_is_deterministic(tmp_path):
    first, second = tiny.build(tmp_path / "a", seed=3), tiny.build(tmp_path / "b", seed=3)
    for shard in sorted(first.glob("*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(second / shard.name))
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_build_reuses_a_finished_checkpoint(tiny_path):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_path.iterdir()}
    tiny.build(tiny_path)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_path.iterdir()} == before


def test_tiny_checkpoint_carries_qwen3_vl_preprocessor_config(tiny_path):
    """The real checkpoint's image settings (Qwen3-VL: 65,536 px floor, patch 16, merge 2, mean/std
    0.5), so the tiny model's pages are sized by the same rules as the 4B's."""
    config = json.loads((tiny_path / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 65_536, "longest_edge": 16_777_216}
    assert (config["patch_size"], config["merge_size"], config["temporal_patch_size"]) == (16, 2, 2)
    assert config["image_mean"] == config["image_std"] == [0.5, 0.5, 0.5]


def test_a_checkpoint_built_by_an_older_format_is_rebuilt(tmp_path):
    path = tiny.build(tmp_path / "model")
    marker = path / tiny.TINY_MARKER
    stale = {key: value for key, value in json.loads(marker.read_text()).items() if key != "format"}
    marker.write_text(json.dumps(stale))
    (path / "preprocessor_config.json").write_text("{}")
    tiny.build(path)
    assert json.loads((path / "preprocessor_config.json").read_text())["size"]["shortest_edge"] == 65_536


def test_build_refuses_a_folder_of_other_files_instead_of_replacing_it(tmp_path):
    """`tiny.build("outputs/tiny")` must not swap a folder of results for the checkpoint."""
    (tmp_path / "REPORT.md").write_text("# results")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "ndcg.csv").write_text("variant,ndcg_at_5\n")
    with pytest.raises(ValueError, match=r"is not a tiny ColQuant model build \(no colquant_tiny\.json\); pass a new or empty"):
        tiny.build(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md", "results"]
    assert (tmp_path / "results" / "ndcg.csv").exists()
    with pytest.raises(ValueError, match="not a tiny ColQuant model build"):
        tiny.build(tmp_path / "REPORT.md")  # a file
    assert tiny.build(tmp_path / "empty").is_dir()  # a new folder is fine
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_saved_checkpoint_is_readable_as_the_umask_allows(tmp_path, mask):
    """Its folder was tempfile's 0o700 and colquant_processor.json 0o600 whatever the umask: another
    user of a shared machine got PermissionError loading it. Now every file and folder has the mode
    a plain open()/mkdir() gives under the umask, as the files transformers writes into it do."""
    previous = os.umask(mask)
    try:
        path = tiny.build(tmp_path / "model")
    finally:
        os.umask(previous)
    for entry in [path, *path.rglob("*")]:
        expected = (0o777 if entry.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(entry.stat().st_mode) == expected, entry


@pytest.mark.parametrize("arguments, refusal", [
    ({"seed": 1.5}, (TypeError, r"seed must be an int >= 0, got 1.5")),
    ({"seed": "1"}, (TypeError, r"seed must be an int >= 0, got '1'")),
    ({"seed": True}, (TypeError, r"seed must be an int >= 0, got True")),
    ({"dtype": "bfloat16"}, (TypeError, r"dtype='bfloat16' is not a floating torch dtype: pass e.g. torch.bfloat16")),
    ({"dtype": torch.int8}, (TypeError, r"dtype=torch.int8 is not a floating torch dtype")),
])
def test_build_refuses_a_seed_or_dtype_of_the_wrong_type(tmp_path, arguments, refusal):
    """seed=1.5 built seed 1's weights under a marker saying 1.5 (torch.manual_seed truncates), and
    dtype='bfloat16' failed as 'Invalid device string'."""
    error, message = refusal
    with pytest.raises(error, match=message):
        tiny.build(tmp_path / "tiny", **arguments)
    assert not (tmp_path / "tiny").exists()
