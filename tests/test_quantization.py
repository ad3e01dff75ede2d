import json

import pytest
import torch

import colquant
from colquant.calibration import build_text_calibration
from colquant.corpus import build_corpus
from colquant.quantization import (
    METADATA_FILE,
    QuantizationSettings,
    decoder_linear_names,
    quantization_metadata,
    quantize_language_model,
    save_quantized_model,
    update_model_card,
)

SETTINGS = QuantizationSettings(method="autoround", bits=4, group_size=128, sym=True, iters=2, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def quantized(tiny_path, tmp_path_factory):
    """(in-memory quantized model, processor, saved checkpoint dir, base model) for the tiny model."""
    base, _ = colquant.load(tiny_path)
    model, processor = colquant.load(tiny_path)
    corpus = build_corpus(tmp_path_factory.mktemp("corpus"), n_pages=6, n_queries=6, progress=False)
    calibration = build_text_calibration(
        processor.tokenizer, source="pile-10k", seqlen=64, nsamples=2, seed=0, offline_fallback="embedded", corpus=corpus
    )
    autoround, cost = quantize_language_model(model, processor, calibration, SETTINGS)
    layers = decoder_linear_names(model.language_model)
    metadata = quantization_metadata(
        "tiny-test", SETTINGS, calibration, cost, base_model=str(tiny_path), base_model_revision="local build", random_weights=True, quantized_layers=layers
    )
    out = save_quantized_model(
        model, processor, autoround, tmp_path_factory.mktemp("q") / "variant", metadata=metadata,
        export_formats=("auto_round", "auto_gptq"),
    )
    return model, processor, out, base


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


def test_metadata_and_model_card_are_written(quantized):
    _, _, out, _ = quantized
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["calibration"]["source_used"] == "embedded" and metadata["quantized_layers"] == 28
    assert metadata["size_on_disk_bytes"] > 0 and metadata["wall_time_s"] > 0
    card = (out / "README.md").read_text()
    assert "Random weights" in card and "tiny-test" in card
    update_model_card(out, {"NDCG@5 (test)": 0.5})
    assert "| NDCG@5 (test) | 0.5 |" in (out / "README.md").read_text()


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
    from colquant.architecture import meta_model, predicted_sizes
    from colquant.model import ColQwen3Config

    _, _, out, _ = quantized
    predicted = predicted_sizes(meta_model(ColQwen3Config.tiny())).set_index("scheme").loc["W4A16 (language model)", "bytes"]
    actual = json.loads((out / METADATA_FILE).read_text())["size_on_disk_bytes"]
    assert abs(actual - predicted) / predicted < 0.01
