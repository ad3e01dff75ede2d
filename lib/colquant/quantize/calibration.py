"""Calibration sets for auto-round: `nsamples` sequences of `seqlen` tokens from a named source.

Sources (the profile's `calibration.source`):
- `pile-10k`: `NeelNanda/pile-10k`, the seeds' choice (generic web text);
- `colpali-train`: `vidore/colpali_train_set`, stratified by its `source` field, query + answer text;
- `pages`: multimodal; page images in the page prompt, run through the (16-bit) vision tower.

Text sources are concatenated and cut into `seqlen` windows, so short texts (queries) still fill
whole sequences. Offline, a text source falls back to the embedded corpus's page text only when the
profile says `offline_fallback: embedded`; the set records which source was actually used.

Pages and the deepstack trap: Qwen3-VL adds deepstack visual features to the hidden states after
language-model layers 0-2. auto-round caches the first block's inputs and replays blocks one after
another, so with image tokens every later block would see inputs without those additions. A page
sample therefore carries, captured from a real forward pass, the embeddings entering the language
model *and* the deepstack residual each early layer must add; `deepstack_replay` hooks add it back
inside the replayed blocks, so every block is calibrated on its real inputs.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from colquant.basics.files import atomic_write
from colquant.retriever.processing import PAGE_PROMPT, PIXELS_PER_VISUAL_TOKEN, ColQwen3Processor, to_rgb

log = logging.getLogger(__name__)

PAGE_EMBEDS_KEY = "colquant_inputs_embeds"
DEEPSTACK_KEY = "deepstack_residual"
CALIBRATION_FORMAT_KEY = "format"
CALIBRATION_FORMAT = "colquant-calibration-v1"
PILE_10K = "NeelNanda/pile-10k"
COLPALI_TRAIN = "vidore/colpali_train_set"


class CalibrationDataError(RuntimeError):
    """The requested calibration source cannot be read and the profile allows no fallback."""


@dataclass
class CalibrationSet:
    """Token sequences ready for `AutoRound(dataset=items)`, with where each one came from."""

    source: str
    source_used: str
    seqlen: int
    items: list[dict[str, torch.Tensor]]
    origins: list[list[str]] = field(default_factory=list)
    fallback_reason: str | None = None

    @property
    def nsamples(self) -> int:
        return len(self.items)

    @property
    def multimodal(self) -> bool:
        return bool(self.items) and PAGE_EMBEDS_KEY in self.items[0]

    def save(self, path: str | Path) -> Path:
        """One safetensors file per set: tensors `<sample>.<key>`, provenance as JSON in its header.

        A data format, not a pickle: loading it can never run code. Written atomically.
        """
        from safetensors.torch import save_file

        tensors = {f"{index}.{key}": value.detach().clone().contiguous() for index, item in enumerate(self.items) for key, value in item.items()}
        provenance = {"source": self.source, "source_used": self.source_used, "seqlen": self.seqlen,
                      "samples": len(self.items), "origins": self.origins, "fallback_reason": self.fallback_reason}
        metadata = {CALIBRATION_FORMAT_KEY: CALIBRATION_FORMAT, "provenance": json.dumps(provenance)}
        return atomic_write(Path(path), lambda staging: save_file(tensors, str(staging), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        """Read a set `save` wrote; anything else (e.g. a pickled `.pt`) is refused, never unpickled."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no calibration set at {path}; run notebooks/02_calibration.ipynb first")
        rebuild = "delete it and re-run notebooks/02_calibration.ipynb (or `python -m colquant run <profile>`)"
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise CalibrationDataError(
                f"{path} is not a calibration set in ColQuant's safetensors format ({error}); files in other "
                f"formats (pickled .pt) are not loaded, since unpickling can run code: {rebuild}") from error
        if metadata.get(CALIBRATION_FORMAT_KEY) != CALIBRATION_FORMAT:
            raise CalibrationDataError(f"{path} lacks the {CALIBRATION_FORMAT} header: {rebuild}")
        provenance = json.loads(metadata["provenance"])
        items: list[dict[str, torch.Tensor]] = [{} for _ in range(provenance.pop("samples"))]
        for name, tensor in tensors.items():
            index, key = name.split(".", 1)
            items[int(index)][key] = tensor
        return cls(items=items, **provenance)

    def statistics(self) -> pd.DataFrame:
        """Per-sample token counts and source mix, for the notebook's histogram and table."""
        rows = []
        for index, item in enumerate(self.items):
            origins = self.origins[index] if self.origins else []
            rows.append(
                {
                    "sample": index,
                    "tokens": int(item["attention_mask"].sum()),
                    "documents": len(origins),
                    "main_origin": Counter(origins).most_common(1)[0][0] if origins else self.source_used,
                }
            )
        return pd.DataFrame(rows)


def _require_hub_or_offline_cache() -> None:
    """Fail fast instead of letting `datasets` retry with backoff against an unreachable hub.

    In offline mode (HF_HUB_OFFLINE=1, as `datasets` read it) `datasets` goes straight to its local
    cache and raises ConnectionError at once when the dataset is not there, so a dataset downloaded
    earlier (or copied into HF_HOME) is used; only an unreachable hub outside offline mode is refused.
    """
    from datasets import config as datasets_config

    from colquant.retriever.checkpoint import hub_offline

    if not datasets_config.HF_HUB_OFFLINE and hub_offline():
        raise ConnectionError("the Hugging Face hub is unreachable; set HF_HUB_OFFLINE=1 to read the dataset "
                              "from the local cache (HF_HOME) instead")


def load_text_documents(source: str, *, seed: int, limit: int) -> list[tuple[str, str]]:
    """(text, origin) pairs from a hub dataset through `datasets`; raises if it cannot be read."""
    from datasets import load_dataset

    _require_hub_or_offline_cache()

    if source == "pile-10k":
        rows = load_dataset(PILE_10K, split="train")
        texts = [(row["text"], "pile-10k") for row in rows.select(range(min(limit, len(rows))))]
        random.Random(seed).shuffle(texts)
        return texts
    if source == "colpali-train":
        # streamed without the image column: the text is a few MB, the page images many GB
        rows = load_dataset(COLPALI_TRAIN, split="train", streaming=True).select_columns(["query", "answer", "source"])
        rows = rows.shuffle(seed=seed).take(8 * limit)
        return _stratified(
            [(f"{row['query']}\n{row['answer']}", row["source"]) for row in rows], seed=seed, limit=limit
        )
    raise ValueError(f"{source!r} is not a text calibration source (pile-10k, colpali-train)")


def _stratified(documents: list[tuple[str, str]], *, seed: int, limit: int) -> list[tuple[str, str]]:
    """Round-robin over strata so every source of the training set is represented equally."""
    rng = random.Random(seed)
    strata: dict[str, list[tuple[str, str]]] = {}
    for document in documents:
        strata.setdefault(document[1], []).append(document)
    for members in strata.values():
        rng.shuffle(members)
    picked: list[tuple[str, str]] = []
    for round_ in range(max(map(len, strata.values()), default=0)):
        for name in sorted(strata):
            if round_ < len(strata[name]) and len(picked) < limit:
                picked.append(strata[name][round_])
    return picked


def embedded_documents(corpus: Any, *, seed: int) -> list[tuple[str, str]]:
    """The embedded corpus's page text, shuffled, tagged with each page's layout."""
    documents = [(page.text, f"embedded:{page.layout}") for page in corpus.pages]
    random.Random(seed).shuffle(documents)
    return documents


def pack_text(
    tokenizer: Any, documents: Sequence[tuple[str, str]], *, seqlen: int, nsamples: int
) -> tuple[list[dict[str, torch.Tensor]], list[list[str]]]:
    """Concatenate documents (EOS-separated) and cut `nsamples` windows of exactly `seqlen` tokens."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    stream_origin: list[str] = []
    needed = seqlen * nsamples
    documents = list(documents)
    while len(stream) < needed:
        if not documents:
            raise CalibrationDataError(f"documents too few for {nsamples} x {seqlen} tokens")
        for text, origin in documents:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
            stream.extend(ids)
            stream_origin.extend([origin] * len(ids))
            if len(stream) >= needed:
                break
    items, origins = [], []
    for index in range(nsamples):
        window = slice(index * seqlen, (index + 1) * seqlen)
        ids = torch.tensor([stream[window]], dtype=torch.long)
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        origins.append(sorted(set(stream_origin[window])))
    return items, origins


def build_text_calibration(
    tokenizer: Any,
    *,
    source: str,
    seqlen: int,
    nsamples: int,
    seed: int,
    offline_fallback: str,
    corpus: Any | None = None,
) -> CalibrationSet:
    """Text calibration set from `source`, or from the embedded corpus if allowed and needed."""
    try:
        documents = load_text_documents(source, seed=seed, limit=max(4 * nsamples, 256))
        source_used, reason = source, None
    except Exception as error:  # datasets raises ConnectionError, OSError, DatasetNotFoundError...
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if offline_fallback != "embedded" or corpus is None:
            raise CalibrationDataError(
                f"cannot read calibration source {source!r} ({reason}). Run where the hub is reachable "
                "(or pre-download it into the datasets cache), or set calibration.offline_fallback: "
                "embedded in the profile to calibrate on the embedded corpus instead."
            ) from error
        log.warning("calibration source %s unavailable (%s); using the embedded corpus as the profile allows", source, reason)
        documents, source_used = embedded_documents(corpus, seed=seed), "embedded"
    items, origins = pack_text(tokenizer, documents, seqlen=seqlen, nsamples=nsamples)
    return CalibrationSet(source, source_used, seqlen, items, origins, reason)


def page_grid(seqlen: int, aspect: float, prompt_tokens: int) -> tuple[int, int]:
    """Merged-patch grid (rows, cols) with the page's aspect whose sequence fits in `seqlen` tokens."""
    budget = seqlen - prompt_tokens
    if budget < 4:
        raise ValueError(f"seqlen={seqlen} leaves no room for an image after the {prompt_tokens}-token page prompt")
    cols = max(2, int(math.sqrt(budget / aspect)))
    rows = max(2, budget // cols)
    while rows * cols > budget:
        rows -= 1
    return rows, cols


@torch.no_grad()
def capture_language_model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Run the real forward pass and capture what enters the language model (then stop there)."""
    captured: dict[str, Any] = {}

    class _Stop(Exception):
        pass

    def grab(_module: torch.nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        captured.update(kwargs)
        raise _Stop

    handle = model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured


def deepstack_residual(captured: dict[str, Any], hidden_size: int, levels: int) -> torch.Tensor:
    """(batch, tokens, levels, hidden): level l's deepstack features at visual positions, zeros elsewhere."""
    embeds = captured["inputs_embeds"]
    residual = embeds.new_zeros(embeds.shape[0], embeds.shape[1], levels, hidden_size)
    mask = captured["visual_pos_masks"]
    for level, features in enumerate(captured["deepstack_visual_embeds"]):
        residual[..., level, :][mask] = features.to(residual.dtype)
    return residual


def page_prompt_tokens(processor: ColQwen3Processor) -> int:
    """Tokens of the page prompt besides the visual tokens themselves."""
    return len(processor.tokenizer(PAGE_PROMPT, add_special_tokens=False)["input_ids"]) - 1


def page_batch(processor: ColQwen3Processor, image: Image.Image, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One page resized to exactly `grid` merged patches (rows, cols), in the page prompt.

    Everything but the visual-token budget is `processor`'s own (its image processor's mean/std and
    patch sizes, its transparency handling), so calibration pages are prepared like the pages the
    quantized model will embed."""
    rows, cols = grid
    side = int(math.sqrt(PIXELS_PER_VISUAL_TOKEN))
    sized = ColQwen3Processor(processor.tokenizer, processor.image_processor, max_num_visual_tokens=rows * cols,
                              transparency=processor.transparency)
    page = to_rgb(image, processor.transparency).resize((cols * side, rows * side))
    return dict(sized.process_images([page]))


def build_page_calibration(
    model: torch.nn.Module,
    processor: ColQwen3Processor,
    images: Sequence[Image.Image],
    *,
    seqlen: int,
    nsamples: int,
    origins: Sequence[str],
) -> CalibrationSet:
    """Page samples in the page prompt, all resized to one grid so every sample has the same length
    (at most `seqlen`), with the language-model inputs and deepstack residuals of a real forward."""
    if len(images) < nsamples:
        raise CalibrationDataError(f"{len(images)} page images for nsamples={nsamples}; give more pages")
    grid = page_grid(seqlen, images[0].height / images[0].width, page_prompt_tokens(processor))
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    items, sample_origins = [], []
    for image, origin in tqdm(list(zip(images, origins))[:nsamples], desc=f"page calibration @ {seqlen}"):
        batch = {key: value.to(model.device) for key, value in page_batch(processor, image, grid).items()}
        captured = capture_language_model_inputs(model, batch)
        items.append(
            {
                "input_ids": batch["input_ids"].cpu(),
                "attention_mask": batch["attention_mask"].cpu(),
                "position_ids": captured["position_ids"].cpu(),
                PAGE_EMBEDS_KEY: captured["inputs_embeds"].cpu(),
                DEEPSTACK_KEY: deepstack_residual(captured, model.config.text_config.hidden_size, levels).cpu(),
            }
        )
        sample_origins.append([origin])
    return CalibrationSet("pages", "pages", int(items[0]["input_ids"].shape[1]), items, sample_origins)


@contextmanager
def deepstack_replay(language_model: torch.nn.Module) -> Iterator[None]:
    """Make page samples work under block-wise replay.

    A pre-hook on the language model swaps the token embeddings for the captured page embeddings
    (auto-round still sees `input_ids`, which it uses for shapes and loss masking); post-hooks on the
    first decoder layers add the captured deepstack residual to their outputs, exactly what Qwen3-VL
    does between those layers in a full forward pass. The residual travels as a per-sample keyword
    argument, which auto-round caches and hands to every replayed block.
    """

    def use_page_embeddings(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        if PAGE_EMBEDS_KEY not in kwargs:
            return None
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = kwargs.pop(PAGE_EMBEDS_KEY)
        kwargs["input_ids"] = None
        return (), kwargs

    def add_deepstack(level: int):
        def hook(_module: torch.nn.Module, _args: tuple, kwargs: dict[str, Any], output: Any):
            residual = kwargs.get(DEEPSTACK_KEY)
            if residual is None or level >= residual.shape[2]:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + residual[:, :, level].to(hidden.device, hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    handles = [language_model.register_forward_pre_hook(use_page_embeddings, with_kwargs=True)]
    handles += [
        layer.register_forward_hook(add_deepstack(level), with_kwargs=True)
        for level, layer in enumerate(language_model.layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_page_images(*, seed: int, limit: int) -> tuple[list[Image.Image], list[str]]:
    """Page images of `vidore/colpali_train_set`, stratified by source (streamed: no full download)."""
    from datasets import load_dataset

    _require_hub_or_offline_cache()

    rows = load_dataset(COLPALI_TRAIN, split="train", streaming=True).shuffle(seed=seed).take(8 * limit)
    picked = _stratified([(row["image"], row["source"]) for row in rows], seed=seed, limit=limit)
    return [image for image, _ in picked], [origin for _, origin in picked]


def build_calibration(
    profile: dict[str, Any],
    seqlen: int,
    model: torch.nn.Module,
    processor: ColQwen3Processor,
    corpus: Any | None,
) -> CalibrationSet:
    """The profile's calibration set at `seqlen` (source, nsamples, seed and fallback policy from it)."""
    c = profile["calibration"]
    if c["source"] != "pages":
        return build_text_calibration(
            processor.tokenizer,
            source=c["source"],
            seqlen=seqlen,
            nsamples=c["nsamples"],
            seed=c["seed"],
            offline_fallback=c["offline_fallback"],
            corpus=corpus,
        )
    try:
        images, origins = load_page_images(seed=c["seed"], limit=c["nsamples"])
        reason = None
    except Exception as error:  # datasets raises ConnectionError, OSError, DatasetNotFoundError...
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        if c["offline_fallback"] != "embedded" or corpus is None:
            raise CalibrationDataError(
                f"cannot read page images of {COLPALI_TRAIN} ({reason}); run with hub access or set "
                "calibration.offline_fallback: embedded"
            ) from error
        log.warning("page source unavailable (%s); using the embedded corpus as the profile allows", reason)
        pages = corpus.pages[: c["nsamples"]]
        images, origins = [corpus.image(p.page_id) for p in pages], [f"embedded:{p.layout}" for p in pages]
    calibration = build_page_calibration(model, processor, images, seqlen=seqlen, nsamples=c["nsamples"], origins=origins)
    if reason is not None:
        calibration.source_used, calibration.fallback_reason = "embedded pages", reason
    return calibration
