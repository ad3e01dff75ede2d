"""The mteb encoder of ColQuant: any loaded ColQwen3 variant (BF16 or 4-bit) as an mteb model.

`ColQuantEncoder` embeds text queries and page images with the project's processor and scores them
with `colquant.score`. With `replicas` (copies of the model on other GPUs) it splits the page
encoding of each corpus chunk across them, batch k on replica k mod n
(`distributed.encode_across_replicas`, the round-robin of `encode-corpus`'s shards), so the
evaluation of one variant on N GPUs takes about 1/N of the page-encoding time. `gpu_replicas`
loads those copies when more than one GPU is visible. `colquant.evaluation` runs it through mteb.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ScoringFunction
from mteb.types import PromptType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from colquant.distributed import encode_across_replicas, load_replicas, visible_gpus
from colquant.scoring import SCORING_MODES, Embeddings, ScoringMode, score

log = logging.getLogger(__name__)

MODEL_ORGANISATION = "colquant"
# mteb files results under <name>/<revision>/. The revision is the fingerprint of everything the
# scores depend on (checkpoint content, dtype, visual-token budget, scoring mode; see
# `workspace.evaluation_fingerprint`), so a changed input is recomputed and its old result never read.
REVISION_PATTERN = re.compile(r"[0-9a-f]{8,64}")
DEFAULT_SCORING: ScoringMode = "colpali"
# Similarity entries per scoring block (~400 MB in float32), the budget mteb's max_sim uses.
SIMILARITY_ELEMENTS = 100_000_000

def check_scoring(scoring: str) -> None:
    """Refuse a scoring mode `colquant.score` does not have, naming the two it has."""
    if scoring not in SCORING_MODES:
        raise ValueError(f"evaluation.scoring={scoring!r}: use 'colpali' (mteb's published scoring) or 'exact' (true MaxSim)")


def other_scoring(scoring: ScoringMode) -> ScoringMode:
    """The mode shown in the extra column beside the main one."""
    check_scoring(scoring)
    return "exact" if scoring == "colpali" else "colpali"


def variant_model_name(variant_name: str) -> str:
    """The mteb model name of a variant, e.g. `colquant/w4a16-g128-sym-rtn`.

    mteb's result cache is keyed by model name: two variants sharing a name would share results,
    and the second would silently be reported with the first one's scores.
    """
    if not variant_name or "/" in variant_name:
        raise ValueError(f"variant name {variant_name!r} must be non-empty and contain no '/', "
                         "e.g. 'bf16' or 'w4a16-g128-sym-rtn'")
    return f"{MODEL_ORGANISATION}/{variant_name}"


class ColQuantEncoder(AbsEncoder):
    """mteb encoder for a loaded ColQwen3 variant: multi-vector embeddings scored with MaxSim.

    Queries and pages go through the project's processor exactly as `colquant` uses them elsewhere
    (query augmentation, page prompt, visual-token budget). Task prompts are not prepended, as in
    mteb's own ColQwen3 wrapper that produced the published ViDoRe scores.

    `encode` returns a (items, tokens, dim) tensor in the model's dtype, each item's real tokens
    first and zero rows after (mteb pads a corpus chunk the same way); `similarity` is
    `colquant.score` in the `scoring` mode: `colpali` maxes over those zero rows as colpali-engine
    does, `exact` ignores them. Results are cached under (variant name, `revision`); the revision
    must be the fingerprint of everything that changes scores (weights, dtype, visual-token budget,
    scoring mode: `workspace.evaluation_fingerprint`). `replicas` (the same model on other devices)
    share the page encoding with `model`; `"auto"` loads `gpu_replicas(model, processor)` when pages
    are first encoded (so a run whose results are all cached loads none), `()` keeps to one device.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, variant_name: str, revision: str,
                 scoring: ScoringMode = DEFAULT_SCORING,
                 replicas: Sequence[torch.nn.Module] | Literal["auto"] = "auto") -> None:
        if not isinstance(revision, str) or not REVISION_PATTERN.fullmatch(revision):
            raise ValueError(f"revision {revision!r} must be a hex fingerprint of the variant's inputs, e.g. "
                             "workspace.evaluation_fingerprint(profile, checkpoint, scoring)")
        check_scoring(scoring)
        self.model = model
        self.replicas: list[torch.nn.Module] | None = None if replicas == "auto" else list(replicas)
        self.processor = processor
        self.scoring = scoring
        self.device = next(model.parameters()).device
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=variant_model_name(variant_name),
            revision=revision,
            release_date=None,
            languages=["eng-Latn"],
            n_parameters=None,
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=None,
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.MAX_SIM,
            use_instructions=False,
            training_datasets=None,
            modalities=["text", "image"],
            model_type=["late-interaction"],
        )

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Embed a dataloader of text queries or page images (mteb's batches: {"text": [...]} or
        {"image": [PIL, ...]}); the batch size is the dataloader's, set by mteb from encode_kwargs.
        Page batches are spread over the model and its replicas; queries run on the model."""
        columns = set(inputs.dataset.column_names) & {"text", "image"}
        if columns == {"text"}:
            column, process, description = "text", self.processor.process_queries, "Encoding queries"
        elif columns == {"image"}:
            column, process, description = "image", self.processor.process_images, "Encoding pages"
        else:
            raise ValueError(
                f"{task_metadata.name} ({hf_subset}/{hf_split}) gives inputs with columns "
                f"{sorted(inputs.dataset.column_names)}; ColQuantEncoder embeds either text queries or "
                "page images, so use text-to-image tasks (category 't2i')")
        if column == "image" and self.replicas is None:
            self.replicas = gpu_replicas(self.model, self.processor)
        models = [self.model, *self.replicas] if column == "image" else [self.model]
        batches = (batch[column] for batch in
                   tqdm(inputs, desc=description, disable=not kwargs.get("show_progress_bar", True)))

        def encode_batch(model: torch.nn.Module, values: list[Any]) -> list[torch.Tensor]:
            with torch.inference_mode():  # thread-local: entered in the thread that runs the model
                features = process(values).to(next(model.parameters()).device)
                embeddings = model(**features).embeddings
                keep = features["attention_mask"].bool()
                return [row[mask].cpu() for row, mask in zip(embeddings, keep)]

        items = encode_across_replicas(models, batches, encode_batch)
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)

    def similarity(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """Late-interaction scores (queries, pages) in the encoder's scoring mode, float32 on the
        model's device (`colquant.score` works in bounded blocks, whatever the corpus chunk)."""
        return score(embeddings1, embeddings2, mode=self.scoring, device=self.device,
                     block_elements=SIMILARITY_ELEMENTS, show_progress_bar=False)

    def similarity_pairwise(self, embeddings1: Embeddings, embeddings2: Embeddings) -> torch.Tensor:
        """Score of each query with the page at the same position (mteb's reranking path)."""
        if len(embeddings1) != len(embeddings2):
            raise ValueError(f"pairwise similarity needs as many queries as pages, got "
                             f"{len(embeddings1)} and {len(embeddings2)}")
        return torch.stack([
            score(embeddings1[i : i + 1], embeddings2[i : i + 1], mode=self.scoring, device=self.device,
                  show_progress_bar=False)[0, 0].cpu()
            for i in range(len(embeddings1))
        ])



def gpu_replicas(model: torch.nn.Module, processor: Any) -> list[torch.nn.Module]:
    """Copies of `model` on every other visible GPU, loaded from the checkpoint it was loaded from
    with its dtype and visual-token budget; none when it is on the CPU or is the only GPU's."""
    device = next(model.parameters()).device
    others = [gpu for gpu in visible_gpus() if gpu != device] if device.type == "cuda" else []
    if not others:
        return []
    checkpoint = getattr(model.config, "_name_or_path", "")
    if not checkpoint or not (Path(checkpoint) / "config.json").is_file():
        raise ValueError(f"cannot copy the model to {len(others)} more GPU(s): it was not loaded from a checkpoint "
                         f"directory (config._name_or_path={checkpoint!r}); load it with colquant.load(path), pass "
                         "replicas=load_replicas(path, devices), or replicas=() to encode on one GPU")
    log.info("encoding pages on %d GPUs: %s plus replicas on %s", len(others) + 1, device,
             ", ".join(map(str, others)))
    return load_replicas(checkpoint, others, dtype=model.dtype, max_num_visual_tokens=processor.max_num_visual_tokens)
