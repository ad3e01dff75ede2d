"""The frontier's weight settings: grid points, names, the bits AutoScheme counts, packed sizes on disk."""

import json

import pytest
import torch
from safetensors import safe_open

import colquant
from colquant.evaluate.corpus import build_corpus
from colquant.quantize.calibration import build_text_calibration
from colquant.research import workspace
from colquant.research.params import load_profile, quantization_section
from colquant.quantize.autoround import (
    QuantizationSettings,
    decoder_linear_names,
    quantization_metadata,
    quantize_language_model,
    save_quantized_model,
)
from colquant.quantize.weight_formats import average_bits, kernel_path, weight_format
from colquant.quantize.weight_grid import WeightSetting, grid_settings, grid_variants, packed_layer_bytes

PREFIX = "vlm.model.language_model."


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))  # no notebook 02 record: the requested source
    return load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")


def test_the_grid_names_each_point_by_its_settings_and_the_seeds_variant_once(tiny):
    tiny["quantization"]["grid"]["rtn"] = True  # the shipped tiny grid leaves RTN out (time); every kind here
    assert grid_settings(tiny) == [
        WeightSetting("autoround", 3, 128), WeightSetting("autoround", 4, 128),
        WeightSetting("rtn", 3, 128), WeightSetting("rtn", 4, 128),
        WeightSetting("autoscheme", 3, 128, 3.5, (3, 4)),
    ]
    names = list(grid_variants(tiny, "embedded"))
    assert names == ["w3a16-g128-sym-embedded-seqlen512-iters20", "w4a16-g128-sym-embedded-seqlen512-iters20",
                     "w3a16-g128-sym-rtn", "w4a16-g128-sym-rtn",
                     "autoscheme-w3w4a16-avg3.5-g128-sym-embedded-seqlen512-iters20"]
    seeds = quantization_section(tiny)
    assert seeds.variant_name(512, calibration_source="embedded") in names and seeds.variant_name(0, "rtn") in names
    planned = list(grid_variants(tiny, workspace.calibration_source_used(tiny, 512)))  # before notebook 02: pile-10k
    expected = workspace.expected_variants(tiny)
    assert len(expected) == len(set(expected)) and set(planned) <= set(expected)
    assert not set(workspace.expected_variants(tiny, grid=False)) & {planned[0], planned[2], planned[4]}


def test_grid_points_quantize_with_their_own_settings(tiny):
    rtn = WeightSetting("rtn", 3, 64).settings(tiny)
    assert (rtn.method, rtn.bits, rtn.group_size, rtn.iters) == ("rtn", 3, 64, 0)
    mixed = WeightSetting("autoscheme", 3, 128, 3.5, (3, 4)).settings(tiny)
    assert (mixed.method, mixed.bits, mixed.iters, mixed.avg_bits, mixed.options) == ("autoscheme", 3, 20, 3.5, (3, 4))
    assert mixed.selection_samples == tiny["quantization"]["grid"]["autoscheme"]["nsamples"]


@pytest.mark.parametrize(("bits", "group_size"), [(2, 32), (3, 128), (4, 64), (8, 128)])
def test_average_bits_is_what_autoscheme_counts(tiny_model, bits, group_size):
    """The profile's budget range (params) is computed as AutoScheme computes it, scales and zeros included."""
    from auto_round.auto_scheme.utils import compute_avg_bits_for_scheme
    from auto_round.schemes import QuantizationScheme

    language_model = tiny_model[0].language_model
    scheme = QuantizationScheme.from_dict({"bits": bits, "group_size": group_size, "sym": True, "data_type": "int",
                                           "act_bits": 16})
    counted, _ = compute_avg_bits_for_scheme(language_model, decoder_linear_names(language_model), {}, scheme)
    assert counted == pytest.approx(average_bits(bits, group_size))


def test_weights_are_described_and_marked_by_what_runs_them():
    uniform = {"method": "autoround", "bits": 3, "group_size": 64}
    mixed = {"method": "autoscheme", "bits": 3, "group_size": 128, "options": [3, 4], "avg_bits": 3.5}
    assert weight_format(uniform) == "W3A16 g64" and kernel_path(uniform)[0] is False
    assert "dequantized" in kernel_path(uniform)[1] and "W3A16" in kernel_path(uniform)[1]
    assert weight_format(mixed) == "AutoScheme W3/W4A16 g128, 3.5 bits on average" and kernel_path(mixed)[0] is False
    assert kernel_path({"method": "rtn", "bits": 4, "group_size": 32})[0] is True
    assert kernel_path({"method": "fp8-dynamic", "bits": 8, "group_size": None})[0] is True
    w4a8 = {"method": "autoround", "bits": 4, "group_size": 128, "activations": "fp8 (e4m3, dynamic per token)"}
    assert weight_format(w4a8) == "W4A8 g128 (FP8 activations)" and "CUTLASS W4A8" in kernel_path(w4a8)[1]


def stored_bytes(checkpoint) -> dict[str, int]:
    """Bytes of every tensor in the checkpoint's weight files, by name."""
    sizes = {}
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as tensors:
            for name in tensors.keys():
                tensor = tensors.get_slice(name)
                numel = 1
                for size in tensor.get_shape():
                    numel *= size
                sizes[name] = numel * torch.empty(0, dtype=getattr(torch, _DTYPES[tensor.get_dtype()])).element_size()
    return sizes


_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "I32": "int32", "I64": "int64"}


@pytest.fixture(scope="module")
def calibration(tiny_path, tmp_path_factory):
    _, processor = colquant.load(tiny_path)
    corpus = build_corpus(tmp_path_factory.mktemp("corpus"), n_pages=4, n_queries=4, progress=False)
    return build_text_calibration(processor.tokenizer, source="pile-10k", seqlen=64, nsamples=2, seed=0,
                                  offline_fallback="embedded", corpus=corpus)


@pytest.mark.parametrize("scheme", ["w2-g128", "w3-g64", "w8-g32"])  # W4 g128: test_quantization; mixed: test_variants
def test_sizes_on_disk_match_the_predicted_bytes(scheme, tiny_path, tiny_model, calibration, tmp_path):
    """Every decoder layer's packed tensors as saved, and the whole checkpoint, within 2% of
    `packed_layer_bytes` (+ the 16-bit tensors as they are), for each width and group size."""
    widths, group = scheme.split("-")[-2:]
    options = [int(bits) for bits in widths.lstrip("w").split("w")]
    group_size = int(group.lstrip("g"))
    settings = QuantizationSettings("rtn", min(options), group_size, True, 0, 2, 0)
    model, processor = colquant.load(tiny_path)
    names = decoder_linear_names(model.language_model)
    layer_bits = {name: options[index % len(options)] for index, name in enumerate(names)} if len(options) > 1 else None
    autoround, cost = quantize_language_model(model, processor, calibration, settings, layer_bits)
    metadata = quantization_metadata(scheme, settings, calibration, cost, base_model=str(tiny_path),
                                     base_model_revision="local build", random_weights=True, quantized_layers=names)
    out = save_quantized_model(model, processor, autoround, tmp_path / scheme, metadata=metadata)
    stored, base = stored_bytes(out), stored_bytes(tiny_path)
    reference = tiny_model[0].language_model
    predicted_layers = 0
    for name in names:
        layer = reference.get_submodule(name)
        bits = (layer_bits or {}).get(name, options[0])
        predicted = packed_layer_bytes(layer.in_features, layer.out_features, bits, group_size)
        saved = sum(size for key, size in stored.items() if key.startswith(f"{PREFIX}{name}."))
        assert abs(saved - predicted) / predicted < 0.02, (name, saved, predicted)
        predicted_layers += predicted
    unquantized = sum(size for key, size in base.items()
                      if not any(key == f"{PREFIX}{name}.weight" for name in names))
    on_disk = json.loads((out / workspace.METADATA_FILE).read_text())["size_on_disk_bytes"]
    assert abs(on_disk - (unquantized + predicted_layers)) / on_disk < 0.02
