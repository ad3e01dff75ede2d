"""Per-token embeddings from vLLM for a list of ColQwen3 requests (the serving check's vLLM side).

Run inside the serving environment (vLLM's CPU or GPU build):

    python -m colquant_vllm.embed --jobs jobs.json

`jobs.json` is a list of `{"model": checkpoint dir, "requests": requests.json, "out": .safetensors}`;
the models are loaded one after another in this one process (vLLM's start-up dominates on CPU).

`requests.json` is a list of `{"token_ids": [...]}` (a query, tokenized by ColQuant's processor so
both sides see the same ids) or `{"prompt": "...<|image_pad|>...", "image": "page.png"}` (a page: vLLM
expands the single image token with the checkpoint's own Qwen3-VL processor and image budget).
The output holds one float32 (tokens, dim) tensor per request under its index.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def vllm_prompts(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM prompt dicts: token ids for queries, text plus a PIL image for pages."""
    from PIL import Image

    prompts = []
    for request in requests:
        if "token_ids" in request:
            prompts.append({"prompt_token_ids": list(request["token_ids"])})
        else:
            image = Image.open(request["image"]).convert("RGB")
            prompts.append({"prompt": request["prompt"], "multi_modal_data": {"image": image}})
    return prompts


def embed(model: str, requests: list[dict[str, Any]], *, dtype: str = "bfloat16", max_model_len: int = 4096) -> list[Any]:
    """Load `model` with vLLM's pooling runner and return each request's token embeddings (float32)."""
    from vllm import LLM

    llm = LLM(
        model=model,
        runner="pooling",
        dtype=dtype,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": 1, "video": 0},
        enforce_eager=True,
        seed=0,
    )
    outputs = llm.encode(vllm_prompts(requests), pooling_task="token_embed", use_tqdm=False)
    return [output.outputs.data.float().cpu() for output in outputs]


def run_job(job: dict[str, str], dtype: str) -> None:
    """Embed one checkpoint's requests and write them atomically to the job's `out`."""
    import gc

    from safetensors.torch import save_file

    out = Path(job["out"])
    embeddings = embed(job["model"], json.loads(Path(job["requests"]).read_text()), dtype=dtype)
    partial = out.with_name(out.name + ".partial")
    save_file({str(index): tensor.contiguous() for index, tensor in enumerate(embeddings)}, str(partial))
    partial.replace(out)
    log.info("wrote %d embeddings of %s to %s", len(embeddings), job["model"], out)
    gc.collect()  # the previous engine's memory goes before the next model loads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m colquant_vllm.embed", description=__doc__)
    parser.add_argument("--jobs", required=True, type=Path, help="jobs.json (see above)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for job in json.loads(args.jobs.read_text()):
        run_job(job, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
