"""A profile's variants beyond the seeds' one (colquant.research.variants): the W4A8 run (`produce_w4a8_variant`: a
folder naming a 4-bit checkpoint and the activations it runs with, loaded through workspace.load_variant, made again
and refused meanwhile when that checkpoint changes), and the frontier grid's variants as notebook 03 makes them
(names, metadata, AutoScheme's per-layer widths read back from the checkpoint, and the loaders that must take
widths other than 4 bits)."""

import json
import shutil

import pytest
import torch

import colquant
from colquant.evaluate.corpus import build_corpus
from colquant.kernels import w4a8
from colquant.quantize import autoscheme
from colquant.quantize.calibration import CalibrationSet, build_text_calibration
from colquant.quantize.cards import update_model_card
from colquant.research import variants, workspace
from colquant.research.params import load_profile, validate_profile
from colquant.retriever.checkpoint import CheckpointError
from colquant.retriever.checkpoint_files import read_reported_results


@pytest.fixture
def profile(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["model"]["max_num_visual_tokens"] = 64
    assert profile["quantization"]["w4a8"] == 512  # the tiny profile runs its seqlen-512 checkpoint as W4A8
    return profile


@pytest.fixture
def checkpoint(profile, tiny_w4a16_path):
    """The tiny W4A16 variant as the profile's auto-round variant of its W4A8 run's seqlen."""
    seqlen = workspace.w4a8_seqlen(profile)
    return shutil.copytree(tiny_w4a16_path, workspace.variants_dir(profile) / workspace.autoround_variant(profile, seqlen))


def _produce(profile) -> dict:
    seqlen = workspace.w4a8_seqlen(profile)
    return variants.produce_w4a8_variant(profile, seqlen, workspace.calibration_source_used(profile, seqlen))


def test_the_w4a8_run_names_its_checkpoint_and_loads_it_with_fp8_activations(profile, checkpoint):
    seqlen = workspace.w4a8_seqlen(profile)
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


def test_only_the_named_seqlens_auto_round_variant_gets_a_w4a8_run(profile, checkpoint):
    named = workspace.w4a8_seqlen(profile)
    produced = {"calibration": {"source_used": workspace.calibration_source_used(profile, named)}}
    for seqlen, method in ((max(profile["calibration"]["seqlens"]), "autoround"), (named, "rtn")):
        assert variants._with_w4a8_run(profile, seqlen, method, produced) == produced
        assert not (workspace.variants_dir(profile) / workspace.w4a8_variant(profile, seqlen)).exists()
    assert variants._with_w4a8_run(profile, named, "autoround", produced) == produced
    assert (workspace.variants_dir(profile) / workspace.w4a8_variant(profile, named)).is_dir()
    profile["quantization"]["w4a8"] = False
    assert workspace.w4a8_seqlen(profile) is None and workspace.expected_variants(profile, grid=False)[-1] == "fp8-all"


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


def test_the_frontier_measures_a_w4a8_run_as_its_checkpoint_loaded_with_fp8_activations(profile, checkpoint):
    """Notebook 08 loads every compared variant for its bytes: a W4A8 run holds no weights of its own."""
    from colquant.research import frontier

    out = workspace.variants_dir(profile) / _produce(profile)["variant"]
    row = frontier.model_bytes_table(profile, {out.name: out}).iloc[0]
    assert row["weights"] == "W4A8 g128 (FP8 activations)" and bool(row["fast_kernel"])
    assert row["checkpoint_bytes"] == frontier.model_bytes_table(profile, {checkpoint.name: checkpoint}).iloc[0]["checkpoint_bytes"] > 0
    assert row["model_bytes"] > 0


# --------------------------------------------------------------------------------------------
# The frontier grid


GRID = {"seqlen": 64, "bits": [], "group_sizes": [128], "rtn": False,
        "autoscheme": {"avg_bits": [3.5], "options": [3, 4], "group_size": 128, "nsamples": 1}}
MIXED = "autoscheme-w3w4a16-avg3.5-g128-sym-embedded-seqlen64-iters1"


@pytest.fixture(scope="module")
def grid_profile(tmp_path_factory):
    """The tiny profile at seqlen 64 with a small grid, its calibration set saved as notebook 02 saves it."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path_factory.mktemp("outputs")))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["calibration"].update(seqlens=[64], nsamples=2)
    profile["quantization"].update(iters=1, batch_size=2, export_formats=["auto_round"], grid=GRID, w4a8=True)
    profile = validate_profile(profile)
    _, processor = colquant.load(workspace.base_model(profile))
    corpus = build_corpus(workspace.corpus_dir(profile), n_pages=4, n_queries=4, progress=False)
    calibration = build_text_calibration(processor.tokenizer, source="pile-10k", seqlen=64, nsamples=2, seed=0,
                                         offline_fallback="embedded", corpus=corpus)
    calibration.save(workspace.calibration_file(profile, 64))
    workspace.write_json(workspace.results_dir(profile) / "calibration__seqlen64.json", {"source_used": calibration.source_used})
    yield profile
    monkeypatch.undo()


@pytest.fixture(scope="module")
def grid_runs(grid_profile):
    """(the runs notebook 03 gets, the per-layer widths AutoScheme's selection returned to the producer)."""
    chosen = []
    original = variants.choose_layer_bits

    def recording(*args, **kwargs):
        chosen.append(original(*args, **kwargs))
        return chosen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(variants, "choose_layer_bits", recording)
        runs = variants.produce_grid_variants(grid_profile, 64)
    return runs, chosen


def test_the_grid_is_made_at_its_seqlen_once_each_with_metadata_saying_what_it_is(grid_profile, grid_runs):
    runs, _ = grid_runs
    (mixed,) = runs
    assert mixed["variant"] == MIXED and mixed["weights"] == "AutoScheme W3/W4A16 g128, 3.5 bits on average"
    assert mixed["settings"]["avg_bits"] == 3.5 and mixed["settings"]["options"] == [3, 4]
    assert mixed["kernel"]["fast"] is False and "dequantized" in mixed["kernel"]["path"]
    assert mixed["autoscheme"]["achieved_avg_bits"] <= 3.5 and "next-token loss" in mixed["autoscheme"]["selection"]
    assert mixed["wall_time_s"] >= mixed["autoscheme"]["selection_wall_time_s"] > 0
    assert variants.produce_grid_variants(grid_profile, 256) == []  # other seqlens make none
    assert variants.produce_grid_variants(grid_profile, 64, made=[MIXED]) == []  # made already: not twice
    assert [run["reused"] for run in variants.produce_grid_variants(grid_profile, 64)] == [True]
    assert MIXED in workspace.quantized_variants(grid_profile)
    assert MIXED not in workspace.quantized_variants(grid_profile, grid=False)  # 04-06 compare the seeds' variants


def test_uniform_grid_points_are_described_by_their_width_and_what_runs_them():
    uniform = variants.describe_weights({"method": "autoround", "bits": 3, "group_size": 64}, None, None, None)
    assert uniform == {"weights": "W3A16 g64", "kernel": {"fast": False, "path": uniform["kernel"]["path"]}}
    assert "dequantized" in uniform["kernel"]["path"]
    assert variants.describe_weights({"method": "rtn", "bits": 4, "group_size": 128}, None, None, None)["kernel"]["fast"]


def test_autoschemes_widths_are_read_back_from_the_checkpoint_as_the_library_chose(grid_profile, grid_runs):
    runs, chosen = grid_runs
    (library,) = chosen
    assert set(library.values()) == {3, 4}  # a 3.5-bit budget between W3 and W4 mixes both
    path = workspace.variants_dir(grid_profile) / MIXED
    assert workspace.read_variant_metadata(path)["autoscheme"]["layer_bits"] == library
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert all(name.startswith("vlm.model.language_model.layers.") for name in config["extra_config"])
    model, _ = colquant.load(path)
    loaded = {name: module.bits for name, module in model.language_model.named_modules() if hasattr(module, "qweight")}
    assert loaded == library


def test_a_mixed_width_checkpoint_is_the_size_its_widths_predict(grid_profile, grid_runs, tiny_model):
    """Each decoder layer's packed tensors on disk within 2% of `packed_layer_bytes` at its own width."""
    from safetensors import safe_open

    from colquant.quantize.weight_grid import packed_layer_bytes

    path = workspace.variants_dir(grid_profile) / MIXED
    layer_bits = workspace.read_variant_metadata(path)["autoscheme"]["layer_bits"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as tensors:
        stored = {name: tensors.get_slice(name).get_shape() for name in tensors.keys()}
    for name, bits in layer_bits.items():
        layer = tiny_model[0].language_model.get_submodule(name)
        predicted = packed_layer_bytes(layer.in_features, layer.out_features, bits, 128)
        saved = sum(shape[0] * shape[1] * (2 if key.endswith(".scales") else 4) for key, shape in stored.items()
                    if key.startswith(f"vlm.model.language_model.{name}."))
        assert abs(saved - predicted) / predicted < 0.02, (name, bits, saved, predicted)


def test_a_checkpoint_whose_per_layer_widths_lie_is_refused_naming_the_layer(grid_profile, grid_runs, tmp_path):
    source = workspace.variants_dir(grid_profile) / MIXED
    copy = shutil.copytree(source, tmp_path / "lying")
    config = json.loads((copy / "config.json").read_text())
    layer, width = next(iter(config["quantization_config"]["extra_config"].items()))
    config["quantization_config"]["extra_config"][layer] = {"bits": 8 if width["bits"] != 8 else 2}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{layer}\.qweight has shape .* for this layer"):
        colquant.load(copy)


def test_the_fast_path_converts_only_4bit_layers_and_leaves_the_others_dequantized(grid_profile, grid_runs):
    """On a GPU `colquant.load` swaps QuantLinears for the 4-bit kernels; a 3-bit layer stays auto-round's."""
    from colquant.kernels import W4A16Linear, replace_quant_linears

    model, processor = colquant.load(workspace.variants_dir(grid_profile) / MIXED, accelerate=False)
    widths = [module.bits for module in model.modules() if hasattr(module, "qweight")]
    before = model.encode_queries(["what changed in 2019?"], processor=processor)[0]
    assert replace_quant_linears(model) == widths.count(4)
    assert sum(isinstance(module, W4A16Linear) for module in model.modules()) == widths.count(4)
    assert [module.bits for module in model.modules() if hasattr(module, "qweight") and not isinstance(module, W4A16Linear)] \
        == [3] * widths.count(3)
    after = model.encode_queries(["what changed in 2019?"], processor=processor)[0]
    assert torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1).min() > 0.99


def test_a_mixed_width_checkpoint_counts_its_parameters_as_trained(grid_profile, grid_runs, tiny_model):
    from colquant.deploy.hub import logical_parameters

    base = sum(parameter.numel() for parameter in tiny_model[0].parameters())
    assert logical_parameters(workspace.variants_dir(grid_profile) / MIXED) == base


def test_autoscheme_refuses_page_calibration_and_leaves_no_cache_behind(grid_profile, grid_runs):
    calibration = CalibrationSet.load(workspace.calibration_file(grid_profile, 64))
    pages = CalibrationSet(calibration.source, "pages", 64, [{"colquant_inputs_embeds": torch.zeros(1, 64, 8),
                                                              "attention_mask": torch.ones(1, 64)}])
    with pytest.raises(ValueError, match="calibrate on pile-10k or colpali-train"):
        autoscheme.calibration_texts(pages, None)
    import os

    assert "AR_AUTO_SCHEME_CACHE" not in os.environ and "AR_DISABLE_DATASET_SUBPROCESS" not in os.environ
