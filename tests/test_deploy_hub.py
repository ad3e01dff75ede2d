"""Model cards and `colquant push`: checks run before anything is written or uploaded."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from colquant.__main__ import main
from colquant.hub import NOT_FOR_USE, PIPELINE_TAG, PushError, build_model_card, push, validate_card
from colquant.quantization import METADATA_FILE


@pytest.fixture
def variant(tiny_w4a16_path, tmp_path):
    return shutil.copytree(tiny_w4a16_path, tmp_path / "variant")


def real_weights(variant):
    metadata = json.loads((variant / METADATA_FILE).read_text())
    (variant / METADATA_FILE).write_text(json.dumps({**metadata, "random_weights": False, "license": "apache-2.0"}))
    return variant


def test_card_metadata_is_complete_and_random_weights_come_first(variant):
    card = ModelCard((variant / "README.md").read_text())
    data = card.data.to_dict()
    assert data["pipeline_tag"] == PIPELINE_TAG and data["library_name"] == "transformers"
    assert data["base_model_relation"] == "quantized" and data["quantization"]["bits"] == 4
    assert data["license"] and "not-for-use" in data["tags"]
    assert card.text.strip().splitlines()[0].startswith(NOT_FOR_USE)
    for usage in ("colquant.load(", "AutoModel.from_pretrained(", "trust_remote_code=True", "from vllm import LLM"):
        assert usage in card.text


def test_card_license_is_carried_from_the_base_models_card(variant, tiny_path, tmp_path):
    base = shutil.copytree(tiny_path, tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    metadata = {**json.loads((variant / METADATA_FILE).read_text()), "base_model": str(base)}
    assert build_model_card(metadata).data.license == "apache-2.0"


def test_validate_card_rejects_missing_metadata():
    with pytest.raises(PushError, match="lacks"):
        validate_card(ModelCard("---\nlibrary_name: transformers\n---\n# x\n"))


def test_push_refuses_random_weights_unless_forced(variant):
    with pytest.raises(PushError, match="--force"):
        push(variant, "org/name", dry_run=True)
    assert "README.md" in push(variant, "org/name", dry_run=True, force=True)


def test_dry_run_lists_weights_code_and_card_without_writing(variant, capsys):
    before = (variant / "README.md").read_text()
    assert main(["push", str(real_weights(variant)), "--repo-id", "org/name", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    for name in ("config.json", "modeling_colqwen3.py", "processing_colqwen3.py", METADATA_FILE, "README.md", ".safetensors"):
        assert name in listed
    assert (variant / "README.md").read_text() == before


def test_push_offline_fails_clearly_before_touching_anything(variant, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = (variant / "README.md").read_text()
    assert main(["push", str(real_weights(variant)), "--repo-id", "org/name"]) != 0
    assert "unreachable" in capsys.readouterr().err
    assert (variant / "README.md").read_text() == before


@pytest.mark.parametrize("bad", ["not-a-variant", "repo"])
def test_push_rejects_a_non_variant_or_a_bad_repo_id(bad, variant, tmp_path):
    target, repo_id = (tmp_path, "org/name") if bad == "not-a-variant" else (variant, "no-slash")
    with pytest.raises(PushError, match="variant directory|ORG/NAME"):
        push(target, repo_id, dry_run=True, force=True)


def test_variant_model_meta_is_complete_and_validated_by_mteb(variant):
    from colquant.hub import content_revision, variant_model_meta

    meta = variant_model_meta(variant, "org/tiny-w4a16")
    assert meta.name == "org/tiny-w4a16" and meta.revision == content_revision(variant) and len(meta.revision) == 40
    assert meta.embed_dim == 320 and meta.open_weights and meta.license
    assert meta.adapted_from == "TomoroAI/tomoro-colqwen3-embed-4b" and meta.similarity_fn_name.value == "MaxSim"
    assert meta.n_parameters > 0 and meta.memory_usage_mb >= 0 and meta.modalities == ["image", "text"]
    (variant / "config.json").write_text((variant / "config.json").read_text() + " ")
    assert content_revision(variant) != meta.revision


def test_card_states_the_saved_visual_token_budget_and_how_mteb_gets_it(variant, monkeypatch, tmp_path):
    """mteb's ColQwen3Wrapper hard-codes 1,280 visual tokens; the card's recipe gives it the variant's budget."""
    import re

    from mteb.models.model_implementations.colqwen_models import ColQwen3Wrapper

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    (variant / "colquant_processor.json").write_text(json.dumps({"max_num_visual_tokens": 64}))
    metadata = json.loads((variant / METADATA_FILE).read_text())
    card = build_model_card({**metadata, "variant": str(variant)}, variant).text
    prose = " ".join(card.split())
    assert "at most 64 visual tokens" in prose and "with 1,280 visual tokens whatever the checkpoint saved" in prose
    assert "max_num_visual_tokens=1280" not in card
    recipe = re.search(r"```python\n(from mteb.*?)```", card, re.DOTALL)[1]
    namespace = {"ColQwen3Wrapper": ColQwen3Wrapper}
    exec("from transformers import AutoProcessor\n" + recipe.replace("ColQwen3Wrapper(", "ColQwen3Wrapper(device='cpu', model_name="), namespace)
    assert namespace["encoder"].processor.max_num_visual_tokens == 64
