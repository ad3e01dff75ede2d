import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import colquant
from colquant.basics.files import OutputError
from colquant.evaluate.corpus import build_corpus
from colquant.quantize.autoround import QuantizationSettings, decoder_linear_names, quantize_language_model
from colquant.quantize.calibration import build_text_calibration
from colquant.quantize.cards import update_model_card
from colquant.research.params import quantization_section
from colquant.research.variants import produce_variant
from colquant.retriever.checkpoint_files import METADATA_FILE
from colquant.retriever.checkpoint_files import checkpoint_fingerprint, read_variant_metadata
from safetensors import safe_open
from tiny_variants import build_tiny_w4a16

SETTINGS = QuantizationSettings(method="autoround", bits=4, group_size=128, sym=True, iters=2, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def quantized(tiny_w4a16, tiny_model):
    """(in-memory quantized model, processor, saved checkpoint dir, base model) for the tiny model."""
    model, processor, out = tiny_w4a16
    return model, processor, out, tiny_model[0]


def test_every_decoder_linear_is_4bit_group128_after_reload(quantized):
    _, _, out, base = quantized
    reloaded, _ = colquant.load(out)
    expected = decoder_linear_names(base.language_model)
    assert len(expected) == 4 * 7
    for name in expected:
        layer = reloaded.language_model.get_submodule(name)
        assert getattr(layer, "bits", None) == 4 and layer.group_size == 128, name
        assert layer.qweight.dtype == torch.int32
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4 and config["group_size"] == 128 and config["sym"] is True
    assert config["block_name_to_quantize"] == "vlm.model.language_model.layers"
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert "quantization_config" not in text_config  # one quantization config, the whole model's


def test_vision_projection_and_embeddings_are_untouched(quantized):
    _, _, out, base = quantized
    reloaded, _ = colquant.load(out)
    for module in ("vlm.model.visual", "embedding_proj_layer", "vlm.model.language_model.embed_tokens"):
        original = base.get_submodule(module).state_dict()
        again = reloaded.get_submodule(module).state_dict()
        assert original.keys() == again.keys()
        assert all(torch.equal(original[k], again[k]) for k in original), module
    assert all(isinstance(m, torch.nn.Linear) for m in reloaded.visual.modules() if "Linear" in type(m).__name__)


@torch.no_grad()
def test_reload_matches_the_in_memory_quantized_model(quantized):
    model, processor, out, _ = quantized
    reloaded, _ = colquant.load(out)
    batch = processor.process_queries(["what was the revenue of Norbright Labs in 2019?", "q"])
    expected, got = model(**batch).embeddings, reloaded(**batch).embeddings
    assert torch.equal(expected, got)
    mask = batch["attention_mask"].bool()
    norms = got.float().norm(dim=-1)[mask]
    assert torch.isfinite(got).all()
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)


def test_metadata_and_model_card_are_written(quantized, tmp_path):
    out = Path(shutil.copytree(quantized[2], tmp_path / "variant"))  # the shared variant stays as built
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["calibration"]["source_used"] == "embedded" and metadata["quantized_layers"] == 28
    assert metadata["size_on_disk_bytes"] > 0 and metadata["wall_time_s"] > 0
    card = (out / "README.md").read_text()
    assert "Random weights" in card and "tiny-w4a16" in card
    before = (out / METADATA_FILE).read_bytes()
    update_model_card(out, {"NDCG@5 (test)": 0.5, "top-5 overlap (test)": 0.25})
    card = (out / "README.md").read_text()
    assert "| NDCG@5 (test) | 0.5 |" in card and "| top-5 overlap (test) | 0.25 |" in card
    update_model_card(out, {"top-5 overlap (test)": 0.25})  # NDCG@5 went stale: it leaves the card
    assert "NDCG@5 (test)" not in (out / "README.md").read_text()
    assert (out / METADATA_FILE).read_bytes() == before  # finished metadata is never rewritten


def test_a_corrupt_metadata_file_is_reported_by_path_with_the_fix(tmp_path):
    (tmp_path / METADATA_FILE).write_text('{"variant": ')
    with pytest.raises(OutputError, match=rf"{METADATA_FILE} is not valid JSON .*delete the folder .*re-run notebooks/03"):
        read_variant_metadata(tmp_path)
    with pytest.raises(OutputError, match="delete the folder"):
        update_model_card(tmp_path, {"x": 1})


def test_group_size_that_does_not_divide_the_layers_is_rejected(tiny_model):
    model, processor = tiny_model
    bad = QuantizationSettings(method="rtn", bits=4, group_size=96, sym=True, iters=0, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="group_size=96 does not divide"):
        quantize_language_model(model, processor, None, bad)  # type: ignore[arg-type]


def test_extra_export_format_keeps_the_primary_checkpoint_auto_round(quantized):
    _, _, out, _ = quantized
    primary = json.loads((out / "config.json").read_text())["quantization_config"]
    gptq = json.loads((out / "exports" / "auto_gptq" / "config.json").read_text())["quantization_config"]
    assert primary["quant_method"] == "auto-round" and gptq["quant_method"] == "gptq"
    assert (out / "exports" / "auto_gptq" / "model.safetensors").exists()


def test_size_on_disk_matches_the_architecture_prediction(quantized):
    """Notebook 01's predicted W4A16 size is the size the saved checkpoint really has."""
    from colquant.retriever.architecture import meta_model, predicted_sizes
    from colquant.retriever.model import ColQwen3Config

    _, _, out, _ = quantized
    predicted = predicted_sizes(meta_model(ColQwen3Config.tiny())).set_index("scheme").loc["W4A16 (language model)", "bytes"]
    actual = json.loads((out / METADATA_FILE).read_text())["size_on_disk_bytes"]
    assert abs(actual - predicted) / predicted < 0.01


@pytest.fixture
def small_profile(tmp_path, monkeypatch):
    from colquant.research import workspace
    from colquant.research.params import load_profile

    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    profile = load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")
    profile["calibration"].update(seqlens=[64], nsamples=2)
    profile["quantization"].update(iters=0, batch_size=2, export_formats=["auto_round"], w4a8=True)
    return profile


def calibrate(profile, nsamples):
    """What notebook 02 does: build the profile's calibration set and save it where 03 reads it."""
    from colquant.research import workspace

    profile["calibration"]["nsamples"] = nsamples
    _, processor = colquant.load(workspace.base_model(profile))
    corpus = build_corpus(workspace.corpus_dir(profile), n_pages=6, n_queries=6, progress=False)
    calibration = build_text_calibration(processor.tokenizer, source="pile-10k", seqlen=64, nsamples=nsamples, seed=0,
                                         offline_fallback="embedded", corpus=corpus)
    calibration.save(workspace.calibration_file(profile, 64))


def test_requantizing_with_other_nsamples_makes_a_new_checkpoint_not_a_reused_one(small_profile, monkeypatch):
    """Issue 8's probe: nsamples 8 -> 4 must not keep the old checkpoint (and its cached scores)."""
    from colquant.research import workspace

    seen_scratch = []
    before = os.environ.get("AR_WORK_SPACE")  # the session's scratch (tests/conftest.py)
    original = colquant.research.variants.quantize_language_model

    def recording(*args, **kwargs):
        seen_scratch.append(os.environ.get("AR_WORK_SPACE"))
        return original(*args, **kwargs)

    monkeypatch.setattr(colquant.research.variants, "quantize_language_model", recording)
    calibrate(small_profile, 4)
    first = produce_variant(small_profile, 64)
    assert not first["reused"] and first["calibration"]["nsamples"] == 4
    fingerprint = checkpoint_fingerprint(workspace.variants_dir(small_profile) / first["variant"])
    assert produce_variant(small_profile, 64)["reused"]
    calibrate(small_profile, 2)
    second = produce_variant(small_profile, 64)
    assert not second["reused"] and second["calibration"]["nsamples"] == 2
    assert checkpoint_fingerprint(workspace.variants_dir(small_profile) / second["variant"]) != fingerprint
    # auto-round's scratch space goes under the output root, never the directory the process runs in
    assert seen_scratch == [str(workspace.output_dir(small_profile) / "ar_work_space")] * 2
    assert os.environ.get("AR_WORK_SPACE") == before  # restored after quantizing
    # the checkpoint and its W4A8 run (quantization.w4a8), made again for the new weights; no staging folder left
    w4a8_name = quantization_section(small_profile).w4a8_variant_name(64, calibration_source=second["calibration"]["source_used"])
    w4a8 = workspace.read_variant_metadata(workspace.variants_dir(small_profile) / w4a8_name)
    assert w4a8["loads"]["weights"] == workspace.checkpoint_fingerprint(workspace.variants_dir(small_profile) / second["variant"])
    assert sorted(p.name for p in workspace.variants_dir(small_profile).iterdir()) == [first["variant"], w4a8["variant"]]


def stored_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under `checkpoint` (exports included), by relative path."""
    tensors = {}
    for shard in sorted(checkpoint.rglob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors |= {f"{shard.relative_to(checkpoint)}:{name}": f.get_tensor(name) for name in f.keys()}
    return tensors


def test_the_variant_is_the_same_whether_or_not_the_cpu_has_bf16(tiny_w4a16_path, tiny_path, tmp_path):
    """auto-round's bf16 CPU branch (AVX512-BF16/AMX) and its no-bf16 branch (AVX2-only, the shared
    fixture) give one variant: the same tensors in the dtypes config.json declares, loading and
    embedding alike, on any CPU."""
    _, _, with_bf16 = build_tiny_w4a16(tiny_path, tmp_path, cpu_bf16=True)
    ours, theirs = stored_tensors(tiny_w4a16_path), stored_tensors(with_bf16)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    for variant in (tiny_w4a16_path, with_bf16):
        declared = json.loads((variant / "config.json").read_text())["dtype"]
        floating = {str(t.dtype) for k, t in stored_tensors(variant).items() if t.is_floating_point() and not k.endswith(".scales")}
        assert floating == {f"torch.{declared}"}, variant
    queries = ["what was the revenue of Norbright Labs in 2019?", "q"]
    first, second = (colquant.load(v)[0].encode_queries(queries) for v in (tiny_w4a16_path, with_bf16))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
def test_a_saved_variant_is_readable_as_the_umask_allows(quantized):
    """Its folders were tempfile's 0o700 and its shards safetensors' 0o600 whatever the umask: another
    user of a shared machine got PermissionError loading it. Now each has a plain open()/mkdir()'s mode."""
    out = quantized[2]
    mask = os.umask(0o022)  # read the session's umask (the fixture saved under it), then put it back
    os.umask(mask)
    wrong = {str(entry.relative_to(out)): oct(entry.stat().st_mode & 0o777) for entry in [out, *out.rglob("*")]
             if entry.stat().st_mode & 0o777 != (0o777 if entry.is_dir() else 0o666) & ~mask}
    assert not wrong, f"modes other than the umask's ({oct(mask)}) gives: {wrong}"
