"""Model cards and `colquant push`: checks run before anything is written or uploaded."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from huggingface_hub import ModelCard

from colquant.__main__ import main
from colquant.deploy.hub import PushError, push, validate_card
from colquant.quantize.cards import NOT_FOR_USE, PIPELINE_TAG, build_model_card
from colquant.retriever.checkpoint_files import METADATA_FILE


@pytest.fixture
def variant(tiny_w4a16_path, tmp_path):
    return shutil.copytree(tiny_w4a16_path, tmp_path / "variant")


def real_weights(variant):
    """The tiny variant passed off as one of the real model (base model and flag changed together)."""
    metadata = json.loads((variant / METADATA_FILE).read_text())
    (variant / METADATA_FILE).write_text(json.dumps({**metadata, "random_weights": False, "license": "apache-2.0",
                                                     "base_model": "TomoroAI/tomoro-colqwen3-embed-4b"}))
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
    from colquant.deploy.hub import content_revision, variant_model_meta

    meta = variant_model_meta(variant, "org/tiny-w4a16")
    assert meta.name == "org/tiny-w4a16" and meta.revision == content_revision(variant) and len(meta.revision) == 40
    assert meta.embed_dim == 320 and meta.open_weights and meta.license
    assert meta.adapted_from == "TomoroAI/tomoro-colqwen3-embed-4b" and meta.similarity_fn_name.value == "MaxSim"
    assert meta.n_parameters > 0 and meta.memory_usage_mb >= 0 and meta.modalities == ["image", "text"]
    (variant / "config.json").write_text((variant / "config.json").read_text() + " ")
    assert content_revision(variant) != meta.revision


def test_dry_run_refuses_a_variant_that_does_not_load(variant):
    config = json.loads((variant / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] -= 1  # a lowered layer count: one layer's weights would be dropped
    (variant / "config.json").write_text(json.dumps(config))
    with pytest.raises(PushError, match="does not load as colquant.load loads it.*unexpected keys"):
        push(real_weights(variant), "org/name", dry_run=True)


@pytest.mark.parametrize("stray", [".env", ".git/config", "exports/.DS_Store", "link"])
def test_hidden_files_and_links_are_refused_by_push_and_dry_run_alike(variant, monkeypatch, stray):
    path = variant / stray
    path.parent.mkdir(parents=True, exist_ok=True)
    if stray == "link":
        path.symlink_to(variant.parent)  # would upload whatever it points at
    else:
        path.write_text("HF_TOKEN=hf_secret\n")
    real_weights(variant)
    monkeypatch.setattr("colquant.retriever.checkpoint.hub_offline", lambda: False)
    for dry_run in (True, False):
        with pytest.raises(PushError, match=rf"holds .*{stray.split('/')[0]}.*Move them out of the folder"):
            push(variant, "org/name", dry_run=dry_run)


def test_push_uploads_exactly_the_files_the_dry_run_lists(variant, monkeypatch):
    from huggingface_hub.utils import filter_repo_objects

    listed = push(real_weights(variant), "org/name", dry_run=True)
    sent = {}

    class Hub:
        def create_repo(self, *args, **kwargs):
            pass

        def upload_folder(self, *, folder_path, allow_patterns, **kwargs):
            everything = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
            sent["files"] = sorted(filter_repo_objects(everything, allow_patterns=allow_patterns))

    monkeypatch.setattr("colquant.retriever.checkpoint.hub_offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.HfApi", Hub)
    (variant / "notes.txt").write_text("not a hidden file: listed and sent")
    assert push(variant, "org/name") == sent["files"] == sorted([*listed, "notes.txt"])


@pytest.mark.parametrize("repo_id", ["org/bad name", "org/name--x", "org/..", "-org/name"])
def test_a_repo_id_the_hub_would_refuse_is_refused_before_anything_runs(variant, repo_id):
    with pytest.raises(PushError, match="is not a valid hub repo id"):
        push(real_weights(variant), repo_id, dry_run=True)


def test_a_random_weights_flag_edited_against_the_base_models_provenance_is_refused(variant):
    metadata = json.loads((variant / METADATA_FILE).read_text())  # base model: the tiny random build
    (variant / METADATA_FILE).write_text(json.dumps({**metadata, "random_weights": False}))
    for force in (False, True):
        with pytest.raises(PushError, match=r"says random_weights: false, but its base model .* random-weight build.*edited"):
            push(variant, "org/name", dry_run=True, force=force)


def test_push_refuses_results_measured_on_other_weights(variant):
    from colquant.quantize.cards import update_model_card

    update_model_card(real_weights(variant), {"NDCG@5, mean of 1 tasks": 0.5})
    assert "README.md" in push(variant, "org/name", dry_run=True)
    shard = next(variant.glob("*.safetensors"))
    tensors = load_file(str(shard))
    norm = next(name for name in tensors if name.endswith("norm.weight"))
    tensors[norm] = tensors[norm] * 2  # the weights were rewritten (re-quantized, say)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(PushError, match=r"results of other weights .* stale; recompute them with `colquant run"):
        push(variant, "org/name", dry_run=True)


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
