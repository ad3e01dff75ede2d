"""Shared fixtures: the embedded tiny model, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
# under pytest-xdist each worker is one of the cores: more threads per worker would spin against each other
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def auto_round_scratch(tmp_path_factory: pytest.TempPathFactory):
    """Tests that call auto-round directly (not through the pipeline, which points it under the output
    root) keep its scratch directory out of the working tree."""
    from colquant.quantize.autoround import scratch_dir

    with scratch_dir(tmp_path_factory.mktemp("ar_work_space")):
        yield


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from colquant.retriever import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The evaluation tests' page corpus (tests/tiny_task.py's size), built once and only read."""
    from colquant.evaluate.corpus import build_corpus
    from tiny_task import N_PAGES, N_QUERIES

    root = tmp_path_factory.mktemp("eval-corpus") / "corpus"
    build_corpus(root, n_pages=N_PAGES, n_queries=N_QUERIES, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_path: Path):
    import colquant

    return colquant.load(tiny_path)


@pytest.fixture(scope="module")
def small_model(tiny_path: Path):
    """The tiny model with a 64-visual-token budget, so pages encode in milliseconds (one per module)."""
    import colquant

    return colquant.load(tiny_path, max_num_visual_tokens=64)


@pytest.fixture(scope="session")
def tiny_w4a16(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """(in-memory model, processor, saved dir): an auto-round W4A16 variant of the tiny model (2 iterations),
    saved as ColQuant saves variants, with auto-round's no-bf16 CPU branch forced (an AVX2-only CPU);
    tests/test_quantization.py checks the bf16 branch gives the same variant. Shared by every test that
    needs a 4-bit checkpoint: read it, never change it (copy it first)."""
    from tiny_variants import build_tiny_w4a16

    return build_tiny_w4a16(tiny_path, tmp_path_factory.mktemp("w4a16"), cpu_bf16=False)


@pytest.fixture(scope="session")
def tiny_w4a16_path(tiny_w4a16) -> Path:
    return tiny_w4a16[2]


@pytest.fixture
def output_root(tmp_path, monkeypatch):
    """Outputs of a pipeline run under this test's folder (profile `pipeline-test`), progress bars off."""
    from colquant.research import workspace

    monkeypatch.setenv(workspace.OUTPUT_ROOT_ENV, str(tmp_path / "outputs"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return tmp_path / "outputs" / "pipeline-test"


@pytest.fixture
def stand_in(monkeypatch, output_root):
    """`pipeline.run` with stand-in notebooks (tests/pipeline_stand_in.py), the report and the plan's
    warm-up replaced too: the scheduling is tested, no model runs."""
    from colquant.research import pipeline, workspace
    from pipeline_stand_in import StandIn, not_measured

    notebooks = StandIn()
    monkeypatch.setattr(pipeline, "_execute", notebooks)

    def report(profile, stale=frozenset()):
        notebooks.stale = stale
        return workspace.output_dir(profile) / "REPORT.md"

    monkeypatch.setattr("colquant.research.reporting.write_report", report)
    monkeypatch.setattr("colquant.research.warmup.measure_in_subprocess", not_measured)
    return notebooks
