"""Notebooks opened on their own: a missing upstream output is named with the notebook/command that makes it."""

import json
import logging

import pytest

from colquant.research import upstream, workspace
from colquant.research.params import load_profile
from colquant.retriever.checkpoint_files import METADATA_FILE


@pytest.fixture
def profile(tmp_path, monkeypatch, tiny_path):
    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(workspace, "base_model", lambda profile: tiny_path)  # BF16 exists; variants do not
    return load_profile(workspace.resolve("params/tiny.yaml"))


def add_variant(profile, name="w4a16-g128-sym-rtn"):
    directory = workspace.variants_dir(profile) / name
    directory.mkdir(parents=True)
    metadata = {"settings": {"method": "rtn"}, "calibration": {"seqlen": 512}}
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    return directory


def test_fidelity_without_variants_says_what_to_run(profile):
    with pytest.raises(upstream.MissingInputError) as error:
        upstream.variants_to_compare(profile, "04_embedding_fidelity", need_quantized=True)
    message = str(error.value)
    assert "04_embedding_fidelity" in message and "03_quantization.ipynb" in message
    assert "colquant run tiny --notebooks 02,03" in message


def test_eval_and_sweep_warn_and_run_on_bf16_alone(profile, caplog):
    with caplog.at_level(logging.WARNING, logger="colquant.research.upstream"):
        variants = upstream.variants_to_compare(profile, "05_vidore_eval", need_quantized=False)
    assert list(variants) == [workspace.BASELINE]
    assert "05_vidore_eval found no quantized variant" in caplog.text and "colquant run tiny" in caplog.text


def test_with_a_variant_everything_is_returned_silently(profile, caplog):
    path = add_variant(profile)
    with caplog.at_level(logging.WARNING):
        variants = upstream.variants_to_compare(profile, "04_embedding_fidelity", need_quantized=True)
    assert variants == {workspace.BASELINE: variants[workspace.BASELINE], path.name: path}
    assert not caplog.text
