"""Model cards: what a quantized variant is, how to use it, what was measured on it.

The auto-round card is built with huggingface_hub's `ModelCard`/`ModelCardData`, so its metadata is
what the hub indexes (base model and relation, library, pipeline tag, license carried from the base
model, quantization details). Usage snippets are the three ways the checkpoint loads (colquant,
transformers with the remote code it carries, vLLM with the colquant plugin); tests check that each
one runs. FP8 variants get a card of their own (`fp8_card`). Quantization writes the card with the
checkpoint, the report rewrites it when results arrive (`update_model_card`), `colquant push`
publishes it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

from colquant.basics.files import write_text
from colquant.quantize.weight_formats import weight_format
from colquant.retriever.checkpoint_files import read_variant_metadata, write_reported_results
from colquant.retriever.fp8 import METHOD as FP8_METHOD
from colquant.retriever.fp8 import NO_CALIBRATION
from colquant.retriever.processing import DEFAULT_MAX_NUM_VISUAL_TOKENS as MTEB_VISUAL_TOKENS  # mteb's ColQwen3Wrapper's
from colquant.retriever.processing import read_saved_settings

log = logging.getLogger(__name__)

PIPELINE_TAG = "visual-document-retrieval"
NOT_FOR_USE = "**Not for use: random weights.**"
UNKNOWN_LICENSE = "other"
PROJECTION_BIAS = "embedding_proj_layer.bias"


def base_model_license(base_model: str) -> str | None:
    """The license in the base model's own card (local directory or hub cache), or None if unreadable."""
    from huggingface_hub import hf_hub_download

    local = Path(base_model) / "README.md"
    try:
        card_file = local if local.exists() else Path(hf_hub_download(base_model, "README.md", local_files_only=True))
        return ModelCard.load(card_file).data.license
    except Exception as error:  # no card, not cached, not a repo id: the card says the license is unknown
        log.info("no license readable from %s (%s)", base_model, error)
        return None


def card_data(metadata: dict[str, Any]) -> ModelCardData:
    """Hub metadata for a variant: base model, relation, library, task, license, tags, quantization."""
    settings = metadata["settings"]
    widths = list(settings.get("options") or [settings["bits"]])  # AutoScheme variants: every width a layer may have
    license_ = metadata.get("license") or base_model_license(metadata["base_model"]) or UNKNOWN_LICENSE
    return ModelCardData(
        base_model=metadata["base_model"],
        base_model_relation="quantized",
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license=license_,
        tags=["colqwen3", "late-interaction", "multi-vector", "vidore", "auto-round",
              *(f"w{bits}a16" for bits in widths), *(f"{bits}-bit" for bits in widths), "colquant"]
        + (["mixed-precision"] if len(widths) > 1 else [])
        + (["random-weights", "not-for-use"] if metadata["random_weights"] else []),
        quantization={
            "method": f"auto-round ({settings['method']})",
            "bits": settings["bits"] if len(widths) == 1 else widths,
            "group_size": settings["group_size"],
            "sym": settings["sym"],
            "iters": settings["iters"],
            "scope": metadata.get("scope", "language-model decoder Linear layers"),
        },
    )


def results_tables(results: dict[str, Any]) -> tuple[str, str]:
    """(fidelity table, retrieval table) as markdown rows `| metric | value |`."""
    retrieval = {k: v for k, v in results.items() if k.lower().startswith("ndcg")}
    fidelity = {k: v for k, v in results.items() if k not in retrieval}

    def rows(items: dict[str, Any]) -> str:
        return "\n".join(f"| {key} | {value} |" for key, value in items.items()) or "| (not measured yet) | |"

    return rows(fidelity), rows(retrieval)


def card_body(metadata: dict[str, Any], bias_notice: str | None, visual_tokens: int = MTEB_VISUAL_TOKENS) -> str:
    """The card's markdown; `visual_tokens` is the page budget the variant saved (its processor's default)."""
    settings, calibration = metadata["settings"], metadata["calibration"]
    name, base = metadata["variant"], metadata["base_model"]
    first_line = (
        f"{NOT_FOR_USE} This checkpoint was quantized from a randomly initialised model of the ColQwen3 "
        "architecture; its numbers check the tooling, not retrieval quality.\n\n"
        if metadata["random_weights"] else ""
    )
    fidelity, retrieval = results_tables(metadata.get("results", {}))
    size = metadata.get("size_on_disk_bytes")
    limits = [
        "Only the language model's decoder Linear layers are quantized; the vision tower, token embeddings "
        "and the 320-d projection stay 16-bit, so pages cost the same vision compute as the base model.",
        bias_notice or "The projection bias is zero here, so vLLM's handling of it does not matter.",
    ]
    if metadata["random_weights"]:
        limits.insert(0, "Random weights: do not use for retrieval.")
    return f"""{first_line}# {name}

Weight quantization ({weight_format(settings)}) of `{base}` made with
[auto-round](https://github.com/intel/auto-round) by ColQuant. {metadata.get('quantized_layers', 'All')} decoder
Linear layers are quantized (group size {settings['group_size']}, {'symmetric' if settings['sym'] else 'asymmetric'});
the vision tower, token embeddings and the 320-d projection stay 16-bit.
Size on disk: {f"{size / 2**20:,.1f} MiB" if size else "not measured"}.

## Use

With ColQuant:
```python
import colquant
model, processor = colquant.load("{name}")  # a local directory or the hub repo id
queries = model(**processor.process_queries(["revenue in 2019"])).embeddings
```

With transformers alone (the checkpoint carries its model and processor code; auto-round restores
the quantized layers):
```python
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained("{name}", trust_remote_code=True, dtype="bfloat16").eval()
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True, max_num_visual_tokens={visual_tokens})
queries = model(**processor(text=["revenue in 2019"])).embeddings
```
Pages are resized to at most {visual_tokens:,} visual tokens, the budget this variant was saved with
(`colquant_processor.json`; the processor's default when `max_num_visual_tokens` is left out).
mteb's registered `ColQwen3Wrapper` loads the processor with {MTEB_VISUAL_TOKENS:,} visual tokens whatever the
checkpoint saved; to evaluate with this variant's budget, replace its processor:
```python
from mteb.models.model_implementations.colqwen_models import ColQwen3Wrapper
encoder = ColQwen3Wrapper("{name}")
encoder.processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True, max_num_visual_tokens={visual_tokens})
```

With vLLM (`pip install vllm colquant`; the colquant plugin keeps the projection bias):
```python
from vllm import LLM
llm = LLM(model="{name}", runner="pooling")
token_vectors = llm.encode([{{"prompt_token_ids": processor(text=["revenue in 2019"])["input_ids"][0].tolist()}}],
                           pooling_task="token_embed")[0].outputs.data
```
Score with MaxSim (`colquant.score`, or `processor.score_multi_vector`).

## Calibration
| setting | value |
|---|---|
| base model revision | {metadata.get('base_model_revision') or 'not recorded'} |
| method | {settings['method']} (iters {settings['iters']}, seed {settings['seed']}) |
| data | {calibration['source_used']} (requested {calibration['source']}), {calibration['nsamples']} samples x {calibration['seqlen']} tokens |
| calibration fallback | {calibration.get('fallback_reason') or 'none: the requested source was used'} |
| quantization time | {metadata.get('wall_time_s', 'n/a')} s |
| peak memory while quantizing | {metadata.get('peak_memory_bytes', 0) / 2**20:,.0f} MiB ({metadata.get('memory_kind', 'n/a')}) |

## Fidelity to the BF16 model
Per-token cosine of query and page embeddings against the BF16 model on the same inputs, and
overlap of the top-5 retrieved pages (ColQuant notebook 04).

| metric | value |
|---|---|
{fidelity}

## Retrieval (NDCG@5)
mteb's ViDoRe retrieval tasks, scored with MaxSim (ColQuant notebook 05).

| metric | value |
|---|---|
{retrieval}

## Known limits
""" + "\n".join(f"- {limit}" for limit in limits) + "\n"


def build_model_card(metadata: dict[str, Any], checkpoint: Path | None = None) -> ModelCard:
    """The variant's card; `checkpoint` lets it state whether vLLM's bias defect applies and which page
    budget (visual tokens) the variant saved, since mteb's wrapper does not read it."""
    notice = projection_bias_notice(checkpoint) if checkpoint is not None else None
    budget = read_saved_settings(checkpoint).get("max_num_visual_tokens") if checkpoint is not None else None
    body = card_body(metadata, notice, budget or MTEB_VISUAL_TOKENS)
    return ModelCard.from_template(card_data(metadata), template_str="---\n{{ card_data }}\n---\n" + _escape(body))


def _escape(text: str) -> str:
    """The body is final markdown: keep jinja from reading its braces."""
    return "{% raw %}" + text + "{% endraw %}"


def projection_bias_notice(checkpoint: Path) -> str | None:
    """A warning when the checkpoint's projection bias is non-zero (vLLM without the plugin drops it)."""
    index_file = checkpoint / "model.safetensors.index.json"
    if index_file.exists():
        shard = checkpoint / json.loads(index_file.read_text())["weight_map"].get(PROJECTION_BIAS, "")
    else:
        shard = checkpoint / "model.safetensors"
    if not shard.is_file():
        return None
    with safe_open(str(shard), framework="pt") as tensors:
        if PROJECTION_BIAS not in tensors.keys() or not tensors.get_tensor(PROJECTION_BIAS).any():
            return None
    return (
        f"{checkpoint.name} has a non-zero {PROJECTION_BIAS}. vLLM 0.32's ColQwen3 drops it (every token "
        "vector shifts; cosine to the true embedding fell to 0.977 in a test) unless the `colquant_vllm` "
        "plugin is installed in the serving environment (`pip install colquant`, which registers it under "
        "vllm.general_plugins). transformers and colquant.load use the bias."
    )


def fp8_card(metadata: dict[str, Any]) -> str:
    """README.md of an FP8 variant: what it is, how it was made, what was measured so far."""
    settings = metadata["settings"]
    warning = ("\n> **Random weights**: this checkpoint checks the machinery only; it retrieves nothing.\n"
               if metadata["random_weights"] else "")
    results = metadata.get("results") or {}
    measured = "\n".join(f"| {key} | {value} |" for key, value in results.items()) or "| (none yet) | |"
    return f"""---
base_model: {metadata['base_model']}
library_name: colquant
tags: [colqwen3, fp8, w8a8, compressed-tensors, colquant]
---
# {metadata['variant']}
{warning}
W8A8 FP8 (e4m3) version of `{metadata['base_model']}` made by ColQuant: weights {settings['weights']},
activations {settings['activations']} (computed at run time). {metadata['quantized_layers']} Linear layers of
{metadata['scope']}. {NO_CALIBRATION}.

Stored in the `compressed-tensors` `float-quantized` layout (`weight` float8_e4m3fn, `weight_scale`
float32 per output channel). `colquant.load(path)` reads it: on GPUs of compute capability 8.9 or
more it runs FP8 tensor cores (`torch._scaled_mm`, rowwise scales), elsewhere a dequantized reference.

| | |
|---|---|
| base model revision | {metadata.get('base_model_revision') or 'not recorded'} |
| size on disk | {metadata.get('size_on_disk_bytes', 0) / 2**20:,.0f} MiB |
| quantization time | {metadata.get('wall_time_s', 'n/a')} s |

| result | value |
|---|---|
{measured}
"""


def w4a8_card(metadata: dict[str, Any]) -> str:
    """README.md of a W4A8 run: what it loads and how, what runs where, what was measured so far."""
    loads, runs = metadata["loads"], metadata["runs"]
    warning = f"{NOT_FOR_USE} It runs a checkpoint quantized from a randomly initialised model.\n\n" \
        if metadata["random_weights"] else ""
    measured = "\n".join(f"| {key} | {value} |" for key, value in (metadata.get("results") or {}).items())
    return f"""# {metadata['variant']}

{warning}The 4-bit checkpoint `{loads['checkpoint']}` (the folder beside this one) run as W4A8: its int4 weights
re-encoded at load with e4m3 group scales and an fp32 scale per output channel, activations e4m3 per token,
FP8 tensor cores. This folder holds no weights; it names the checkpoint and how it is loaded:

```python
import colquant
model, processor = colquant.load("{loads['checkpoint']}", activations="{loads['activations']}")
```

| where | what runs |
|---|---|
| CUDA | {runs['cuda']} |
| CPU | {runs['cpu']} |

## Measured so far

| metric | value |
|---|---|
{measured or "| (none yet) | |"}
"""


def model_card(metadata: dict[str, Any], checkpoint: Path | None = None) -> str:
    """A variant's README.md: the FP8 card for FP8 variants, else the auto-round card (`build_model_card`)."""
    if metadata["settings"]["method"] == FP8_METHOD:
        return fp8_card(metadata)
    if "loads" in metadata:  # a W4A8 run of a 4-bit checkpoint (colquant.research.variants)
        return w4a8_card(metadata)
    return str(build_model_card(metadata, checkpoint))


def update_model_card(checkpoint: str | Path, results: dict[str, Any]) -> None:
    """Record the results later notebooks measured on these weights (fidelity, NDCG@5) beside the
    checkpoint, replacing what was recorded, and regenerate the card.

    The metadata is never rewritten after quantization (a kill there would lose it); results go to
    their own file, bound to the weights' fingerprint (`checkpoint_files.write_reported_results`), and both
    it and the card are replaced atomically. The caller passes every current result: one that is
    stale must leave the card.
    """
    checkpoint = Path(checkpoint)
    metadata = read_variant_metadata(checkpoint)
    write_reported_results(checkpoint, results)
    write_text(checkpoint / "README.md", model_card({**metadata, "results": results}, checkpoint))
