"""A profile's W4A8 run (variants.produce_w4a8_variant): a folder naming a 4-bit checkpoint and the activations it
runs with, loaded through workspace.load_variant, made again (and refused meanwhile) when that checkpoint changes."""

import shutil

import pytest

from colquant.kernels import w4a8
from colquant.quantize.cards import update_model_card
from colquant.research import variants, workspace
from colquant.research.params import load_profile
from colquant.retriever.checkpoint_files import read_reported_results


@pytest.fixture
def profile(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["model"]["max_num_visual_tokens"] = 64
    assert profile["quantization"]["w4a8"]  # the tiny profile runs its largest seqlen's checkpoint as W4A8
    return profile


@pytest.fixture
def checkpoint(profile, tiny_w4a16_path):
    """The tiny W4A16 variant as the profile's auto-round variant of the largest seqlen."""
    seqlen = workspace.w4a8_seqlen(profile)
    return shutil.copytree(tiny_w4a16_path, workspace.variants_dir(profile) / workspace.autoround_variant(profile, seqlen))


def _produce(profile) -> dict:
    seqlen = workspace.w4a8_seqlen(profile)
    return variants.produce_w4a8_variant(profile, seqlen, workspace.calibration_source_used(profile, seqlen))


def test_the_w4a8_run_names_its_checkpoint_and_loads_it_with_fp8_activations(profile, checkpoint):
    seqlen = max(profile["calibration"]["seqlens"])
    made = _produce(profile)
    name = workspace.w4a8_variant(profile, seqlen)
    out = workspace.variants_dir(profile) / name
    assert made["variant"] == name == checkpoint.name.replace("w4a16-", "w4a8-", 1) and not made["reused"]
    assert made["loads"] == dict(checkpoint=checkpoint.name, weights=workspace.checkpoint_fingerprint(checkpoint),
                                 activations="fp8")
    assert made["runs"] == dict(cuda=w4a8.KERNEL, cpu=w4a8.REFERENCE)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", workspace.METADATA_FILE]  # no second copy of weights
    card = (out / "README.md").read_text()
    assert f'colquant.load("{checkpoint.name}", activations="fp8")' in card and w4a8.REFERENCE in card
    assert list(workspace.quantized_variants(profile)) == [checkpoint.name, name]
    model, _ = workspace.load_variant(profile, out)
    assert model._colquant_w4a8["runs"] == w4a8.REFERENCE  # this machine runs the tiny profile on CPU
    assert workspace.evaluation_fingerprint(profile, out) != workspace.evaluation_fingerprint(profile, checkpoint)
    assert _produce(profile)["reused"]


def test_a_w4a8_run_of_a_changed_checkpoint_is_refused_until_made_again(profile, checkpoint):
    out = workspace.variants_dir(profile) / _produce(profile)["variant"]
    (checkpoint / "added_by_a_requantization.json").write_text("{}")  # other checkpoint content
    with pytest.raises(workspace.OutputError, match="holds other weights than it was made for: re-run notebooks/03"):
        workspace.variant_checkpoint(out)
    again = _produce(profile)
    assert not again["reused"] and again["loads"]["weights"] == workspace.checkpoint_fingerprint(checkpoint)
    assert workspace.variant_checkpoint(out) == (checkpoint, {"activations": "fp8"})


def test_only_the_largest_seqlens_auto_round_variant_gets_a_w4a8_run(profile, checkpoint):
    largest = workspace.w4a8_seqlen(profile)
    produced = {"calibration": {"source_used": workspace.calibration_source_used(profile, largest)}}
    for seqlen, method in ((min(profile["calibration"]["seqlens"]), "autoround"), (largest, "rtn")):
        assert variants._with_w4a8_run(profile, seqlen, method, produced) == produced
        assert not (workspace.variants_dir(profile) / workspace.w4a8_variant(profile, seqlen)).exists()
    assert variants._with_w4a8_run(profile, largest, "autoround", produced) == produced
    assert (workspace.variants_dir(profile) / workspace.w4a8_variant(profile, largest)).is_dir()
    profile["quantization"]["w4a8"] = False
    assert workspace.w4a8_seqlen(profile) is None and workspace.expected_variants(profile)[-1] == "fp8-all"


def test_the_report_records_results_on_the_w4a8_runs_card(profile, checkpoint):
    out = workspace.variants_dir(profile) / _produce(profile)["variant"]
    update_model_card(out, {"top-5 page overlap with BF16": 0.875})
    assert "| top-5 page overlap with BF16 | 0.875 |" in (out / "README.md").read_text()
    assert read_reported_results(out) == {"top-5 page overlap with BF16": 0.875}


def test_pushing_a_w4a8_run_names_the_checkpoint_to_push_instead(profile, checkpoint):
    from colquant.deploy.hub import PushError, push

    out = workspace.variants_dir(profile) / _produce(profile)["variant"]
    with pytest.raises(PushError, match=rf"(?s)W4A8 run of {checkpoint.name}.*no weights of its own.*push {checkpoint.name}"
                                        r".*activations=\"fp8\""):
        push(out, "me/colqwen3-w4a8", dry_run=True)


def test_a_w4a8_run_shares_the_vision_tower_and_weight_bytes_of_its_checkpoint(profile, checkpoint):
    from colquant.evaluate import shared_vision

    out = workspace.variants_dir(profile) / _produce(profile)["variant"]
    assert shared_vision.sharing_groups({"w4a16": checkpoint, "w4a8": out}) == [["w4a16", "w4a8"]]
    assert shared_vision.checkpoint_bytes(out) == shared_vision.checkpoint_bytes(checkpoint) > 0
