"""The serving check: do vLLM's embeddings of a ColQuant checkpoint equal `colquant.load`'s?

Users quantize in order to deploy, and the server they deploy with runs its own implementation of
ColQwen3. vLLM (0.32) lives in its own environment (its transformers and torchvision pins differ from
this project's), so the comparison runs vLLM in a subprocess with that environment's Python
(`colquant_vllm.embed`), on the same query token ids and page images ColQuant embeds here, and
compares token by token. The projection-bias defect of vLLM's ColQwen3 is handled by the
`colquant_vllm` plugin; `colquant.quantize.cards.projection_bias_notice` says when a checkpoint depends on it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file

from colquant.retriever.processing import PAGE_PROMPT
from colquant_vllm.capabilities import W4A16_CPU_OP

VLLM_PYTHON_ENV = "COLQUANT_VLLM_PYTHON"
DEFAULT_VLLM_VENV = ".venv-vllm"
UNAVAILABLE_FILE = "UNAVAILABLE"  # written by `make vllm-env` when the serving stack cannot install
SERVING_TIMEOUT_S = 900
PROBE_TIMEOUT_S = 300


class ServingError(RuntimeError):
    """vLLM could not load or run a checkpoint, or its outputs cannot be compared."""


def vllm_python(repo_root: Path) -> tuple[Path | None, str]:
    """(python of the serving environment, why not) from $COLQUANT_VLLM_PYTHON or `<repo>/.venv-vllm`."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    venv = repo_root / DEFAULT_VLLM_VENV
    python = Path(configured) if configured else venv / "bin" / "python"
    if not configured and (venv / UNAVAILABLE_FILE).exists():
        return None, f"the vLLM serving environment could not be installed: {(venv / UNAVAILABLE_FILE).read_text().strip()}"
    if not python.exists():
        return None, f"no vLLM serving environment at {python}: create it with `make vllm-env` (or set ${VLLM_PYTHON_ENV})"
    return python, ""


def run_in_serving_env(command: list[str], timeout_s: float, **variables: str) -> subprocess.CompletedProcess:
    """Run `command` (the serving environment's Python) with this environment plus `variables`, minus
    PYTHONPATH: the serving environment has its own colquant_vllm install."""
    environment = {**os.environ, **variables}
    environment.pop("PYTHONPATH", None)
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout_s)


def output_tail(result: subprocess.CompletedProcess, lines: int = 25) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


def vllm_capabilities(python: Path, *, setup: str = "") -> dict[str, Any]:
    """What the serving environment's vLLM build loads on this machine (`colquant_vllm.capabilities`).

    `setup` is Python run first in the same process (tests use it to force vLLM's choice of kernel
    library)."""
    code = f"{setup}\nimport json\nfrom colquant_vllm.capabilities import probe\nprint(json.dumps(probe()))"
    result = run_in_serving_env([str(python), "-c", code], PROBE_TIMEOUT_S, VLLM_LOGGING_LEVEL="ERROR")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ServingError(f"the vLLM capability probe failed in {python} (exit {result.returncode}); "
                           f"recreate the environment with `make vllm-env`:\n{output_tail(result)}")
    return json.loads(lines[-1])


def cannot_serve(capabilities: dict[str, Any], kind: str) -> str | None:
    """Why this vLLM build cannot serve a checkpoint of `kind` ("bf16" or "w4a16") here, or None."""
    if kind not in ("bf16", "w4a16"):
        raise ValueError(f"kind={kind!r}: use 'bf16' or 'w4a16'")
    if kind == "w4a16" and capabilities["device"] == "cpu" and not capabilities["ops"][W4A16_CPU_OP]:
        return (f"vLLM's CPU build loaded its AVX2 kernel library on this processor, which has no {W4A16_CPU_OP} "
                "(vLLM's W4A16 GEMM on CPUs needs AVX512): a 4-bit checkpoint cannot be served here; "
                "BF16 checkpoints can")
    return None


@torch.no_grad()
def colquant_requests(
    model: torch.nn.Module,
    processor: Any,
    queries: Sequence[str],
    pages: Sequence[Image.Image],
    workdir: Path,
) -> tuple[Path, list[torch.Tensor]]:
    """Write requests.json (query token ids, page prompt + PNG) and return ColQuant's embeddings.

    Items are embedded one at a time, so no padding enters either side's numbers."""
    workdir.mkdir(parents=True, exist_ok=True)
    requests, embeddings = [], []
    for query in queries:
        batch = processor.process_queries([query])
        requests.append({"token_ids": batch["input_ids"][0].tolist()})
        embeddings.append(model(**batch).embeddings[0].float().cpu())
    for index, page in enumerate(pages):
        image_file = workdir / f"page{index}.png"
        page.save(image_file)
        batch = processor.process_images([page])
        requests.append({"prompt": PAGE_PROMPT, "image": str(image_file)})
        embeddings.append(model(**batch).embeddings[0].float().cpu())
    requests_file = workdir / "requests.json"
    requests_file.write_text(json.dumps(requests))
    return requests_file, embeddings


def vllm_embeddings(
    python: Path, jobs: Sequence[tuple[Path, Path]], *, dtype: str = "bfloat16"
) -> list[list[torch.Tensor]]:
    """Embed each (checkpoint, requests.json) with vLLM in one run of `colquant_vllm.embed` in the
    serving environment; vLLM's log tail is in the error if it fails."""
    outs = [requests.with_name(f"vllm-{index}-{checkpoint.name}.safetensors") for index, (checkpoint, requests) in enumerate(jobs)]
    jobs_file = jobs[0][1].with_name("vllm-jobs.json")
    jobs_file.write_text(json.dumps([
        {"model": str(checkpoint), "requests": str(requests), "out": str(out)}
        for (checkpoint, requests), out in zip(jobs, outs)
    ]))
    command = [str(python), "-m", "colquant_vllm.embed", "--jobs", str(jobs_file), "--dtype", dtype]
    result = run_in_serving_env(command, SERVING_TIMEOUT_S, HF_HUB_OFFLINE="1",
                                VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    missing = [str(checkpoint) for (checkpoint, _), out in zip(jobs, outs) if not out.exists()]
    if result.returncode != 0 or missing:
        raise ServingError(f"vLLM failed (exit {result.returncode}; no embeddings for {missing}):\n{output_tail(result)}")
    return [[tensors[str(i)] for i in range(len(tensors))] for tensors in (load_file(str(out)) for out in outs)]


def compare_embeddings(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> pd.DataFrame:
    """Per request: token count, min cosine over tokens and max absolute difference."""
    from colquant.evaluate.fidelity import token_cosines

    try:
        cosines = token_cosines(ours, theirs)
    except ValueError as error:
        raise ServingError(f"embeddings here (reference) and from vLLM (candidate) do not pair up: {error} "
                           "(the two sides tokenized or resized the page differently)") from error
    return pd.DataFrame([
        {"request": index, "tokens": a.shape[0], "min_cosine": cosine.min().item(),
         "max_abs_diff": (a.float() - b.float()).abs().max().item()}
        for index, (a, b, cosine) in enumerate(zip(ours, theirs, cosines))
    ])
