import copy

import pytest

from colquant import workspace
from colquant.params import ProfileError, load_profile, validate_profile, variant_name


@pytest.fixture(scope="module")
def tiny():
    return load_profile(workspace.REPO_ROOT / "params" / "tiny.yaml")


@pytest.mark.parametrize("name", ["tiny", "colqwen3-4b", "synthetic-4b"])
def test_shipped_profiles_are_valid(name):
    profile = load_profile(workspace.REPO_ROOT / "params" / f"{name}.yaml")
    assert profile["profile"] == name


def test_real_profile_never_falls_back_silently():
    profile = load_profile(workspace.REPO_ROOT / "params" / "colqwen3-4b.yaml")
    assert profile["calibration"]["offline_fallback"] == "none"
    assert len(profile["evaluation"]["tasks"]) == 22 and profile["calibration"]["seqlens"] == [256, 512, 1024]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("calibration", "source", "wikitext", "calibration.source='wikitext' is not one of"),
        ("calibration", "seqlens", [512, 0], "calibration.seqlens\\[\\] must be a positive integer"),
        ("calibration", "seqlens", [], "calibration.seqlens is empty"),
        ("quantization", "bits", 8, "only W4A16"),
        ("quantization", "iters", -1, "quantization.iters must be an integer >= 0"),
        ("quantization", "export_formats", ["gguf"], "export_formats\\[\\]='gguf'"),
    ],
)
def test_bad_settings_name_the_key_and_the_allowed_values(tiny, section, key, value, message):
    profile = copy.deepcopy(tiny)
    profile[section][key] = value
    with pytest.raises(ProfileError, match=message):
        validate_profile(profile)


def test_missing_profile_lists_the_available_ones(tmp_path):
    with pytest.raises(ProfileError, match="tiny.yaml"):
        load_profile(workspace.REPO_ROOT / "params" / "nope.yaml")


def test_variant_names_carry_their_settings(tiny):
    assert variant_name(tiny, 1024, calibration_source="pile-10k") == "w4a16-g128-sym-pile10k-seqlen1024-iters20"
    assert variant_name(tiny, 1024, "rtn") == "w4a16-g128-sym-rtn"


def test_variant_names_carry_the_calibration_source_actually_used(tiny):
    """The tiny profile requests pile-10k but calibrates on the embedded fallback offline: its
    variants must not be called pile10k."""
    assert variant_name(tiny, 512, calibration_source="embedded") == "w4a16-g128-sym-embedded-seqlen512-iters20"
    assert variant_name(tiny, 512, calibration_source="embedded pages") == "w4a16-g128-sym-embeddedpages-seqlen512-iters20"
    with pytest.raises(ValueError, match="source_used"):
        variant_name(tiny, 512)
