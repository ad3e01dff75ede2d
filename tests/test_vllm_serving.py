"""Serving check: vLLM (CPU build, its own environment) embeds ColQuant checkpoints as colquant.load does.

Skips, saying why, when the serving environment is absent or could not be installed (`make vllm-env`).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import colquant
from colquant.quantize.cards import PROJECTION_BIAS, projection_bias_notice
from colquant.deploy.serving import (
    ServingError,
    cannot_serve,
    colquant_requests,
    compare_embeddings,
    vllm_capabilities,
    vllm_embeddings,
    vllm_python,
)

REPO = Path(__file__).resolve().parents[1]
MIN_COSINE_BF16 = 0.999
QUERIES = ["what was the revenue of Norbright Labs in 2019?", "pie chart of energy use by sector"]


@pytest.fixture(scope="module")
def serving_python() -> Path:
    python, why_not = vllm_python(REPO)
    if python is None:
        pytest.skip(why_not)
    return python


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in [(224, 160, 3), (96, 128, 3)]]


def with_projection_bias(source: Path, destination: Path) -> Path:
    """A copy of `source` whose projection bias is non-zero (the real 4B has one; tiny's is zero)."""
    shutil.copytree(source, destination)
    index = (destination / "model.safetensors.index.json").read_text()
    shard = destination / json.loads(index)["weight_map"][PROJECTION_BIAS]
    tensors = load_file(str(shard))
    generator = torch.Generator().manual_seed(0)
    bias = tensors[PROJECTION_BIAS]
    tensors[PROJECTION_BIAS] = (0.5 * torch.randn(bias.shape, generator=generator)).to(bias.dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return destination


CASES = {  # name -> kind of checkpoint vLLM serves
    "bf16": "bf16",
    "w4a16": "w4a16",
    "w4a16 GPTQ export": "w4a16",
    "bf16 with projection bias": "bf16",
}
AVX2_ONLY = "import torch\ntorch.cpu._is_avx512_supported = lambda: False"
AVX512_BF16 = "import torch\ntorch.cpu._is_avx512_supported = lambda: True\ntorch.cpu._is_avx512_bf16_supported = lambda: True"


@pytest.fixture(scope="module")
def capabilities(serving_python) -> dict:
    return vllm_capabilities(serving_python)


@pytest.fixture(scope="module")
def served(serving_python, capabilities, tiny_path, tiny_w4a16_path, pages, tmp_path_factory) -> dict[str, pd.DataFrame]:
    """name -> per-request comparison table, for every checkpoint this machine's vLLM can serve (one vLLM run)."""
    workdir = tmp_path_factory.mktemp("serving")
    biased = with_projection_bias(tiny_path, workdir / "tiny-bias")
    served_and_reference = {  # what vLLM serves -> what colquant.load embeds for comparison
        "bf16": (tiny_path, tiny_path),
        "w4a16": (tiny_w4a16_path, tiny_w4a16_path),
        "w4a16 GPTQ export": (tiny_w4a16_path / "exports" / "auto_gptq", tiny_w4a16_path),
        "bf16 with projection bias": (biased, biased),
    }
    servable = [name for name in served_and_reference if cannot_serve(capabilities, CASES[name]) is None]
    jobs, ours = [], []
    for index, name in enumerate(servable):
        served_path, reference = served_and_reference[name]
        model, processor = colquant.load(reference)
        requests, embeddings = colquant_requests(model, processor, QUERIES, pages, workdir / f"job{index}")
        jobs.append((served_path, requests))
        ours.append(embeddings)
    theirs = vllm_embeddings(serving_python, jobs)
    return {name: compare_embeddings(a, b) for name, a, b in zip(servable, ours, theirs)}


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_embeds_the_checkpoint_like_colquant(served, capabilities, name):
    why_not = cannot_serve(capabilities, CASES[name])
    if why_not:
        pytest.skip(why_not)
    table = served[name]
    print(f"{name}:\n{table.to_string(index=False)}")
    assert len(table) == len(QUERIES) + 2
    assert table["min_cosine"].min() >= MIN_COSINE_BF16, table


def test_projection_bias_notice_names_the_defect_only_for_a_nonzero_bias(tiny_path, tmp_path):
    assert projection_bias_notice(tiny_path) is None
    notice = projection_bias_notice(with_projection_bias(tiny_path, tmp_path / "biased"))
    assert notice is not None and "vLLM" in notice and "colquant_vllm" in notice


def test_compare_embeddings_refuses_mismatched_token_counts():
    with pytest.raises(ServingError, match=r"item 0: reference \(3, 4\) vs candidate \(2, 4\).*tokenized or resized"):
        compare_embeddings([torch.ones(3, 4)], [torch.ones(2, 4)])
    with pytest.raises(ServingError, match="2 reference items but 1 candidate items"):
        compare_embeddings([torch.ones(3, 4)] * 2, [torch.ones(3, 4)])


def test_probe_finds_no_w4a16_gemm_where_vllm_loads_its_avx2_library(serving_python):
    """The AVX2-only processor's branch, forced on any x86 CPU: vLLM loads its AVX2 kernel library."""
    capabilities = vllm_capabilities(serving_python, setup=AVX2_ONLY)
    assert capabilities == {"device": "cpu", "ops": {"cpu_gemm_wna16": False}}
    assert "AVX2" in cannot_serve(capabilities, "w4a16") and cannot_serve(capabilities, "bf16") is None


def test_probe_finds_the_w4a16_gemm_where_vllm_loads_its_avx512_bf16_library(serving_python):
    capabilities = vllm_capabilities(serving_python, setup=AVX512_BF16)
    assert capabilities == {"device": "cpu", "ops": {"cpu_gemm_wna16": True}}
    assert cannot_serve(capabilities, "w4a16") is None and cannot_serve(capabilities, "bf16") is None


def test_a_failing_probe_names_the_environment_and_the_fix(serving_python):
    with pytest.raises(ServingError, match="make vllm-env"):
        vllm_capabilities(serving_python, setup="raise SystemExit(3)")


def test_serving_env_absent_or_failed_is_reported_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("COLQUANT_VLLM_PYTHON", raising=False)
    python, why = vllm_python(tmp_path)
    assert python is None and "make vllm-env" in why
    (tmp_path / ".venv-vllm").mkdir()
    (tmp_path / ".venv-vllm" / "UNAVAILABLE").write_text("no wheel for this platform")
    python, why = vllm_python(tmp_path)
    assert python is None and "no wheel for this platform" in why
