import copy
import re
from pathlib import Path

import pytest
import torch
import yaml

from colquant.quantize.autoround import decoder_linear_names
from colquant.research import workspace
from colquant.research.params import ProfileError, load_profile, quantization_section, validate_profile
from colquant.research.profile_checks import quantized_input_widths

PARAMS = workspace.REPO_ROOT / "params"


@pytest.fixture(scope="module")
def tiny():
    return load_profile(PARAMS / "tiny.yaml")


def _rejected(profile: dict, edit) -> str:
    profile = copy.deepcopy(profile)
    edit(profile)
    with pytest.raises(ProfileError) as error:
        validate_profile(profile, source="params/edited.yaml")
    message = str(error.value)
    assert message.startswith("params/edited.yaml"), message  # every message names the file
    return message


@pytest.mark.parametrize("name", ["tiny", "colqwen3-4b", "synthetic-4b"])
def test_shipped_profiles_are_valid(name):
    profile = load_profile(PARAMS / f"{name}.yaml", check_device=False)
    assert profile["profile"] == name


def test_profile_is_a_plain_dict_with_the_defaults_filled_in():
    profile = load_profile(PARAMS / "colqwen3-4b.yaml", check_device=False)
    assert type(profile) is dict and all(type(profile[s]) is dict for s in ("model", "evaluation", "sweep"))
    assert profile["evaluation"]["scoring"] == "colpali"
    assert "revision" in profile["model"] and "pool3+binary" in profile["compression"]["settings"]
    assert profile["corpus"]["n_pages"] > 0


def test_real_profile_never_falls_back_silently():
    profile = load_profile(PARAMS / "colqwen3-4b.yaml", check_device=False)
    assert profile["calibration"]["offline_fallback"] == "none"
    assert len(profile["evaluation"]["tasks"]) == 22 and profile["calibration"]["seqlens"] == [256, 512, 1024]


@pytest.mark.parametrize(
    ("location", "key", "message"),
    [
        ("calibration", "nsampels", r"calibration\.nsampels is not a known key; did you mean 'nsamples'\?"),
        ("quantization", "grup_size", r"quantization\.grup_size is not a known key; did you mean 'group_size'\?"),
        (None, "seqlenss", r"seqlenss is not a known key; did you mean 'calibration\.seqlens'\?"),
    ],
)
def test_unknown_keys_name_the_nearest_valid_key(tiny, location, key, message):
    def add(profile):
        (profile[location] if location else profile)[key] = 1

    text = _rejected(tiny, add)
    assert re.search(message, text), text
    assert "keys of" in text  # and lists the valid ones


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("quantization", "sym", "false", "quantization.sym='false' is a string: input should be a valid boolean"),
        ("quantization", "iters", "20", "quantization.iters='20' is a string: input should be a valid integer"),
        ("calibration", "seqlens", "512", "calibration.seqlens='512' is a single value: input should be a valid list; write a list, e.g. [512]"),
        ("random_weights", None, "yes", "random_weights='yes' is a string"),
    ],
)
def test_quoted_numbers_and_booleans_are_not_coerced(tiny, section, key, value, message):
    def edit(profile):
        if key is None:
            profile[section] = value
        else:
            profile[section][key] = value

    assert message in _rejected(tiny, edit)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("calibration", "source", "wikitext", "calibration.source='wikitext' is not allowed: input should be 'pile-10k'"),
        ("calibration", "seqlens", [512, 0], "calibration.seqlens[1]=0: input should be greater than 0"),
        ("calibration", "seqlens", [], "calibration.seqlens is empty"),
        ("quantization", "bits", 8, "quantization.bits=8 is not allowed: input should be 4"),
        ("quantization", "iters", -1, "quantization.iters=-1: input should be greater than or equal to 0"),
        ("quantization", "batch_size", 0, "quantization.batch_size=0: input should be greater than 0"),
        ("quantization", "export_formats", ["gguf"], "quantization.export_formats[0]='gguf' is not allowed"),
        ("evaluation", "batch_size", 0, "evaluation.batch_size=0: input should be greater than 0"),
        ("evaluation", "scoring", "maxsim", "evaluation.scoring='maxsim' is not allowed: input should be 'colpali' or 'exact'"),
        ("sweep", "query_batch_sizes", [1, 0], "sweep.query_batch_sizes[1]=0: input should be greater than 0"),
        ("sweep", "page_batch_sizes", [-2], "sweep.page_batch_sizes[0]=-2: input should be greater than 0"),
        ("model", "dtype", "bfloat61", "model.dtype='bfloat61' is not allowed: input should be 'bfloat16', 'float16' "
                                       "or 'float32'; did you mean 'bfloat16'?"),
        ("model", "device", "gpu", "model.device='gpu': use cpu, cuda, cuda:N or auto"),
    ],
)
def test_impossible_values_name_the_key_and_the_allowed_values(tiny, section, key, value, message):
    assert message in _rejected(tiny, lambda profile: profile[section].__setitem__(key, value))


def test_group_size_must_divide_every_quantized_layer_of_the_tiny_model(tiny):
    message = _rejected(tiny, lambda profile: profile["quantization"].__setitem__("group_size", 96))
    assert "quantization.group_size=96 does not divide the input width of" in message
    assert "use a divisor of 128" in message


def test_group_size_is_checked_against_the_real_4b_architecture():
    real = load_profile(PARAMS / "colqwen3-4b.yaml", check_device=False)
    real["quantization"]["group_size"] = 1024  # divides o_proj's 4096, not 2560 or 9728
    with pytest.raises(ProfileError, match=r"group_size=1024 does not divide .*\(2560\).*use a divisor of 512"):
        validate_profile(real, check_device=False)


def test_group_size_is_checked_against_a_local_checkpoint(tiny, tiny_path):
    local = copy.deepcopy(tiny)
    local["model"]["id"] = str(tiny_path)
    local["quantization"]["group_size"] = 256
    with pytest.raises(ProfileError, match=r"group_size=256 does not divide .* in .*model"):
        validate_profile(local)


@torch.no_grad()
def test_known_widths_are_the_quantized_layers_input_widths(tiny_model):
    model, _ = tiny_model
    language_model = model.language_model
    actual = {language_model.get_submodule(name).in_features for name in decoder_linear_names(language_model)}
    assert set(quantized_input_widths("embedded-tiny").values()) == actual


def test_cuda_without_cuda_is_rejected_at_load(tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = _rejected(tiny, lambda profile: profile["model"].__setitem__("device", "cuda"))
    assert "model.device='cuda': this machine has no CUDA device" in message and "use device: auto" in message
    with pytest.raises(ProfileError, match="no CUDA device"):
        load_profile(PARAMS / "synthetic-4b.yaml")


def test_device_auto_is_accepted(tiny):
    profile = copy.deepcopy(tiny)
    profile["model"]["device"] = "auto"
    assert validate_profile(profile)["model"]["device"] == "auto"


def test_profile_names_are_plain_names(tiny):
    message = _rejected(tiny, lambda profile: profile.__setitem__("profile", "../../etc"))
    assert "profile='../../etc': a profile name is a plain name" in message


def test_every_problem_is_reported_at_once(tiny):
    def break_two(profile):
        profile["quantization"]["iters"] = "20"
        profile["model"]["dtype"] = "bfloat61"

    message = _rejected(tiny, break_two)
    assert "has 2 problems" in message and "quantization.iters" in message and "model.dtype" in message


def test_missing_section_is_named(tiny):
    assert "sweep is missing; add it" in _rejected(tiny, lambda profile: profile.pop("sweep"))
    assert "sweep must be a mapping of its keys" in _rejected(tiny, lambda profile: profile.__setitem__("sweep", None))


@pytest.mark.parametrize("section, key, values, repeated", [
    ("calibration", "seqlens", [256, 512, 256], "256"),
    ("quantization", "fp8", ["lm", "lm"], "lm"),
    ("evaluation", "tasks", ["my-task", "other-task", "my-task"], "my-task"),
    ("sweep", "query_batch_sizes", [1, 2, 1], "1"),
    ("sweep", "memory_budgets_gb", [8, 8.0], "8.0"),
])
def test_a_value_listed_twice_is_refused(tiny, section, key, values, repeated):
    """`seqlens: [256, 256]` listed the seqlen's variant twice in expected_variants, so notebooks
    04-06 evaluated it twice and its rows were reported twice; compression.settings already refused it."""
    message = _rejected(tiny, lambda p: p[section].__setitem__(key, values))
    assert f"{section}.{key}=" in message and f"{repeated} listed more than once; list each value once" in message


def test_compression_settings_follow_the_grammar(tiny):
    profile = copy.deepcopy(tiny)
    profile["compression"] = {}
    assert "pool3+binary" in validate_profile(profile)["compression"]["settings"]
    profile["compression"] = {"settings": ["pool9+int8", "none"]}
    assert validate_profile(profile)["compression"]["settings"] == ["pool9+int8", "none"]
    message = _rejected(tiny, lambda p: p.__setitem__("compression", {"settings": ["pool1", "int4"]}))
    assert "'pool1', 'int4' not understood; each setting is one of none, int8, binary, poolN" in message
    assert "int8 listed more than once" in _rejected(tiny, lambda p: p.__setitem__("compression", {"settings": ["int8", "none", "int8"]}))
    assert "compression.settings is empty" in _rejected(tiny, lambda p: p.__setitem__("compression", {"settings": []}))


def test_a_profile_without_a_compression_section_gets_the_default_grid(tiny):
    profile = copy.deepcopy(tiny)
    profile.pop("compression")
    assert validate_profile(profile)["compression"]["settings"] == ["none", "pool2", "pool3", "int8", "binary", "pool3+binary"]


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("profile: tiny\nmodel:\n  id: embedded-tiny\n dtype: bfloat16\n")
    with pytest.raises(ProfileError, match=r"broken\.yaml is not valid YAML: line 4, column 2"):
        load_profile(broken)


def test_a_yaml_file_that_is_not_a_mapping_is_rejected(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump(["model", "sweep"]))
    with pytest.raises(ProfileError, match=r"list\.yaml must be a YAML mapping of sections"):
        load_profile(listing)


def test_load_profile_names_the_file(tmp_path, tiny):
    edited = copy.deepcopy(tiny)
    edited["calibration"]["nsampels"] = 4
    path = Path(tmp_path / "edited.yaml")
    path.write_text(yaml.safe_dump(edited))
    with pytest.raises(ProfileError, match=rf"^{re.escape(str(path))}: calibration\.nsampels"):
        load_profile(path)


def test_missing_profile_lists_the_available_ones():
    with pytest.raises(ProfileError, match="tiny.yaml"):
        load_profile(PARAMS / "nope.yaml")


def test_variant_names_carry_their_settings(tiny):
    settings = quantization_section(tiny)
    assert settings.variant_name(1024, calibration_source="pile-10k") == "w4a16-g128-sym-pile10k-seqlen1024-iters20"
    assert settings.variant_name(1024, "rtn") == "w4a16-g128-sym-rtn"
    asymmetric = quantization_section({"quantization": {**tiny["quantization"], "sym": False, "group_size": 64}})
    assert asymmetric.variant_name(256, calibration_source="pages") == "w4a16-g64-asym-pages-seqlen256-iters20"


def test_w4a8_runs_are_named_like_their_checkpoint_with_8_bit_activations(tiny):
    settings = quantization_section(tiny)
    assert settings.w4a8_variant_name(512, calibration_source="embedded") == "w4a8-g128-sym-embedded-seqlen512-iters20"


@pytest.mark.parametrize("change, problem", [(dict(sym=False), "sym=False, group_size=128"),
                                             (dict(group_size=64), "sym=True, group_size=64")])
def test_w4a8_runs_only_checkpoints_the_kernel_takes(tiny, change, problem):
    message = _rejected(tiny, lambda p: p["quantization"].update(w4a8=True, **change))
    assert problem in message and "set quantization.w4a8: false" in message
    assert validate_profile({**tiny, "quantization": {**tiny["quantization"], "w4a8": False, **change}})


@pytest.mark.parametrize("w4a8, seqlen", [(True, 1024), (False, None), (256, 256)])
def test_w4a8_runs_the_largest_seqlen_or_the_one_named(tiny, w4a8, seqlen):
    profile = validate_profile({**tiny, "quantization": {**tiny["quantization"], "w4a8": w4a8}})
    assert type(profile["quantization"]["w4a8"]) is type(w4a8)  # true stays a bool: not seqlen 1
    assert workspace.w4a8_seqlen(profile) == seqlen


def test_a_w4a8_seqlen_without_a_variant_is_refused_with_the_key_path(tiny):
    message = _rejected(tiny, lambda p: p["quantization"].update(w4a8=2048))
    assert "quantization.w4a8=2048 names no auto-round variant" in message and "[256, 512, 1024]" in message


def test_variant_names_carry_the_calibration_source_actually_used(tiny):
    """The tiny profile requests pile-10k but calibrates on the embedded fallback offline: its
    variants must not be called pile10k."""
    settings = quantization_section(tiny)
    assert settings.variant_name(512, calibration_source="embedded") == "w4a16-g128-sym-embedded-seqlen512-iters20"
    assert settings.variant_name(512, calibration_source="embedded pages") == "w4a16-g128-sym-embeddedpages-seqlen512-iters20"
    with pytest.raises(ValueError, match="source_used"):
        settings.variant_name(512)


# --- command-line overrides (`colquant run <profile> --set KEY.PATH=VALUE`) -----------------------


def test_overrides_set_values_of_their_yaml_type_and_repeat():
    profile = load_profile(PARAMS / "tiny.yaml", overrides=[
        "quantization.iters=50", "calibration.seqlens=[128, 64]", "quantization.sym=false", "quantization.w4a8=false",
        "profile=tiny-iters50"])  # asymmetric: no W4A8 run (CUTLASS W4A8 takes symmetric checkpoints)
    assert profile["quantization"]["iters"] == 50 and profile["calibration"]["seqlens"] == [128, 64]
    assert profile["quantization"]["sym"] is False and profile["quantization"]["w4a8"] is False
    assert profile["profile"] == "tiny-iters50"
    assert quantization_section(profile).variant_name(64, calibration_source="embedded").endswith("seqlen64-iters50")


def test_an_override_may_add_an_optional_section_or_key():
    profile = load_profile(PARAMS / "tiny.yaml", overrides=["compression.settings=[binary]", "corpus.seed=3"])
    assert profile["compression"]["settings"] == ["binary"] and profile["corpus"]["seed"] == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quantization.iterz=50", r"tiny\.yaml with --set quantization\.iterz=50: quantization\.iterz is not a known key; did you mean 'iters'\?"),
        ("quantizaton.iters=50", r"quantizaton is not a known key; did you mean 'quantization'\?"),
        ("quantization.iters=abc", r"quantization\.iters='abc' is a string: input should be a valid integer"),
        ("quantization.iters=-1", r"quantization\.iters=-1: input should be greater than or equal to 0"),
        ("model.dtype=bf16", r"model\.dtype='bf16' is not allowed"),
        ("quantization.iters", r"--set 'quantization\.iters' is not KEY=VALUE with a dotted key; write e\.g\. --set quantization\.iters=50"),
        ("quantization..iters=5", r"is not KEY=VALUE with a dotted key"),
        ("quantization.iters.max=5", r"quantization\.iters is a value \(20\), not a section with keys"),
        ("quantization.iters=[1", r"--set 'quantization\.iters=\[1': the value is not valid YAML"),
    ],
)
def test_bad_overrides_are_refused_by_the_same_validation(override, message):
    with pytest.raises(ProfileError, match=message):
        load_profile(PARAMS / "tiny.yaml", overrides=[override])


# --- the frontier's weight grid (quantization.grid) and the frontier section ----------------------


def _grid(profile: dict, **changes) -> None:
    profile["quantization"]["grid"] = {**profile["quantization"]["grid"], **changes}


def test_the_tiny_grid_is_valid_and_defaults_fill_in(tiny):
    grid = tiny["quantization"]["grid"]
    assert grid["seqlen"] in tiny["calibration"]["seqlens"] and {3, 4} <= set(grid["bits"])
    assert grid["autoscheme"]["avg_bits"] and tiny["frontier"]["memory_budgets_gb"] == [8, 12, 24, 80]
    profile = copy.deepcopy(tiny)
    profile["quantization"]["grid"] = {"bits": [2]}
    assert validate_profile(profile)["quantization"]["grid"] == {"seqlen": 512, "bits": [2], "group_sizes": [128],
                                                                  "rtn": True, "autoscheme": None}
    profile["calibration"]["seqlens"] = [1024, 64, 256, 128]  # the middle one, the lower of two
    profile["quantization"]["w4a8"] = True  # its 512 is no longer a seqlen
    assert validate_profile(profile)["quantization"]["grid"]["seqlen"] == 128
    profile["quantization"]["grid"]["seqlen"] = 1024
    assert validate_profile(profile)["quantization"]["grid"]["seqlen"] == 1024
    profile.pop("frontier")
    assert validate_profile(profile)["frontier"]["corpus_pages"] == [10_000, 100_000, 1_000_000]


@pytest.mark.parametrize(("changes", "message"), [
    ({"bits": [4, 5]}, "quantization.grid.bits[1]=5 is not allowed: input should be 2, 3, 4 or 8"),
    ({"bits": [3, 3]}, "quantization.grid.bits=[3, 3]: 3 listed more than once"),
    ({"group_sizes": [128, 128]}, "quantization.grid.group_sizes=[128, 128]: 128 listed more than once"),
    ({"group_sizes": []}, "quantization.grid.group_sizes is empty"),
    ({"seqlen": 300}, "quantization.grid.seqlen=300 has no calibration set: it is not one of calibration.seqlens "
                      "[256, 512, 1024]; use one of them"),
    ({"bits": [], "autoscheme": None}, "quantization.grid makes no variant: list bit widths in quantization.grid.bits"),
])
def test_bad_grid_entries_are_refused_with_their_key_path(tiny, changes, message):
    assert message in _rejected(tiny, lambda profile: _grid(profile, **changes))


def test_a_grid_group_size_must_divide_the_models_widths(tiny):
    message = _rejected(tiny, lambda profile: _grid(profile, group_sizes=[64, 96]))
    assert "quantization.grid.group_sizes[1]=96 does not divide the input width of" in message
    assert "group_sizes[0]" not in message and "use a divisor of 128" in message
    autoscheme = {**tiny["quantization"]["grid"]["autoscheme"], "group_size": 256}
    assert "quantization.grid.autoscheme.group_size=256 does not divide" in _rejected(
        tiny, lambda profile: _grid(profile, autoscheme=autoscheme))


def test_a_grid_group_size_is_checked_against_the_real_4b(tiny):
    real = load_profile(PARAMS / "colqwen3-4b.yaml", check_device=False)
    real["quantization"]["grid"] = {"seqlen": 512, "bits": [4], "group_sizes": [128, 1024]}
    with pytest.raises(ProfileError, match=r"quantization\.grid\.group_sizes\[1\]=1024 does not divide .*\(2560\)"):
        validate_profile(real, check_device=False)


@pytest.mark.parametrize(("autoscheme", "message"), [
    ({"avg_bits": [3.0]}, "quantization.grid.autoscheme.avg_bits[0]=3.0 is outside what its options can average: "
                          "W3A16 to W4A16 at group size 128 store 3.148 to 4.156 bits per weight"),
    ({"avg_bits": [3.5, 4.5]}, "quantization.grid.autoscheme.avg_bits[1]=4.5 is outside"),
    ({"avg_bits": [3.5, 3.5]}, "quantization.grid.autoscheme.avg_bits=[3.5, 3.5]: 3.5 listed more than once"),
    ({"options": [4]}, "quantization.grid.autoscheme.options=[4] has 1 value(s); give at least 2"),
    ({"options": [3, 6]}, "quantization.grid.autoscheme.options[1]=6 is not allowed"),
    ({"options": [4, 4]}, "quantization.grid.autoscheme.options=[4, 4]: 4 listed more than once"),
    ({"nsamples": 0}, "quantization.grid.autoscheme.nsamples=0: input should be greater than 0"),
])
def test_bad_autoscheme_entries_are_refused_with_their_key_path_and_range(tiny, autoscheme, message):
    changed = {**tiny["quantization"]["grid"]["autoscheme"], **autoscheme}
    assert message in _rejected(tiny, lambda profile: _grid(profile, autoscheme=changed))


def test_an_autoscheme_budget_at_an_end_of_the_range_is_accepted(tiny):
    """auto-round accepts a budget within 1e-3 of the ends; 4.15625 is W4A16 g128 exactly."""
    profile = copy.deepcopy(tiny)
    _grid(profile, autoscheme={**tiny["quantization"]["grid"]["autoscheme"], "avg_bits": [3.1484, 4.15625]})
    assert validate_profile(profile)["quantization"]["grid"]["autoscheme"]["avg_bits"] == [3.1484, 4.15625]


def test_autoscheme_is_refused_with_page_calibration(tiny):
    message = _rejected(tiny, lambda profile: profile["calibration"].__setitem__("source", "pages"))
    assert "quantization.grid.autoscheme needs text calibration" in message and "calibration.source is pages" in message


@pytest.mark.parametrize(("key", "value", "message"), [
    ("corpus_pages", [10_000, 10_000], "frontier.corpus_pages=[10000, 10000]: 10000 listed more than once"),
    ("corpus_pages", [0], "frontier.corpus_pages[0]=0: input should be greater than 0"),
    ("memory_budgets_gb", [], "frontier.memory_budgets_gb is empty"),
])
def test_bad_frontier_settings_are_refused(tiny, key, value, message):
    assert message in _rejected(tiny, lambda profile: profile["frontier"].__setitem__(key, value))
