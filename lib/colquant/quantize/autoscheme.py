"""Mixed-precision weights from auto-round's AutoScheme: which decoder Linear gets how many bits.

AutoScheme (`auto_round.AutoScheme`) scores every candidate width of every layer by its delta loss,
|gradient x quantization error| summed over a calibration set, and picks per-layer widths that
minimise the total under an average-bits budget. ColQuant calls it, and does not re-implement it,
in two steps:

1. `choose_layer_bits`: AutoScheme's selection alone (`AutoRound.post_init`, which runs it), on the
   text tower. The delta loss needs a loss: AutoScheme takes the model's `loss` for labels = inputs,
   i.e. a causal LM's next-token loss. ColQwen3's text tower has no LM head of its own; Qwen3-VL ties
   its head to the token embeddings, so `NextTokenLoss` scores hidden states with the embedding matrix,
   as the backbone was pretrained. The sensitivity is therefore the backbone's language-modelling
   sensitivity, not retrieval loss (notebook 08 shows both the choice and the per-layer embedding error).
   AutoScheme reads its calibration text from a dataset name or a JSON file; it gets the calibration
   set's own token windows, decoded, in a file of its own, and an empty score cache of its own (its
   cache is keyed by the model's path and the file name, not by their content).
2. `quantization.quantize_language_model(..., layer_bits=chosen)`: auto-round tunes every layer at its
   chosen width on the same calibration set as every other variant, and the checkpoint records each
   layer's width (`quantization_config.extra_config`), which `colquant.load` restores.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from colquant.quantize.autoround import QuantizationSettings, decoder_linear_names, environment_variable
from colquant.quantize.calibration import CalibrationSet
from colquant.quantize.weight_formats import average_bits


@dataclass(frozen=True)
class AutoSchemeSettings(QuantizationSettings):
    """A variant whose layers take one of `options` bits each, `avg_bits` on average (AutoScheme's
    count, `weight_formats.average_bits`); `bits` is the lowest option, auto-round's default scheme."""

    avg_bits: float
    options: tuple[int, ...]
    selection_samples: int | None = None  # calibration windows the selection scores on (None: all)


class NextTokenLoss(nn.Module):
    """The text tower with its tied LM head (the token embeddings), returning the next-token loss of
    `labels`: the loss AutoScheme differentiates. Holds the tower, so auto-round finds its blocks."""

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.model = language_model
        self.config = language_model.config

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = nn.functional.linear(hidden, self.model.embed_tokens.weight).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


def calibration_texts(calibration: CalibrationSet, tokenizer: Any) -> list[str]:
    """The calibration set's token windows as text, for AutoScheme's dataset file; a page (multimodal)
    set has no text to give, which the profile refuses up front."""
    if calibration.multimodal:
        raise ValueError("AutoScheme scores layers on text, and this calibration set holds page embeddings; "
                         "calibrate on pile-10k or colpali-train (calibration.source) for AutoScheme variants")
    return [tokenizer.decode(item["input_ids"].reshape(-1)) for item in calibration.items]


def choose_layer_bits(model: nn.Module, processor: Any, calibration: CalibrationSet,
                      settings: AutoSchemeSettings) -> dict[str, int]:
    """AutoScheme's width for every decoder Linear, by name relative to the text tower.

    Runs auto-round's selection on `model`'s text tower and leaves it patched: quantize a freshly loaded
    model with the result. Raises when the selection leaves a layer out or averages over the budget.
    """
    from auto_round import AutoRound, AutoScheme
    from auto_round.schemes import QuantizationScheme

    texts = calibration_texts(calibration, processor.tokenizer)[: settings.selection_samples]
    options = [QuantizationScheme.from_dict({"bits": bits, "group_size": settings.group_size, "sym": settings.sym,
                                             "data_type": "int", "act_bits": 16}) for bits in settings.options]
    batch_size = min(settings.batch_size, len(texts))
    scheme = AutoScheme(avg_bits=settings.avg_bits, options=options, nsamples=len(texts),
                        seqlen=calibration.seqlen, batch_size=batch_size, low_cpu_mem_usage=False)
    with tempfile.TemporaryDirectory(prefix="colquant-autoscheme-") as scratch:
        dataset = Path(scratch) / "calibration.json"
        dataset.write_text(json.dumps([{"text": text} for text in texts]))
        # a cache of its own; its dataset prepared in this process (a fork of a notebook kernel would
        # send the kernel's messages) and without progress bars
        with environment_variable("AR_AUTO_SCHEME_CACHE", str(Path(scratch) / "scores")), \
                environment_variable("AR_DISABLE_DATASET_SUBPROCESS", "1"), _no_dataset_progress_bars():
            autoround = AutoRound(
                NextTokenLoss(model.language_model), processor.tokenizer, scheme=scheme, iters=0,
                nsamples=len(texts), seqlen=calibration.seqlen, batch_size=batch_size, dataset=str(dataset),
                seed=settings.seed, device_map=str(model.device), amp=model.device.type != "cpu",
                enable_torch_compile=False,
            )
            autoround.post_init()  # runs the selection; quantizes nothing
    chosen = {name.removeprefix("model."): int(layer["bits"]) for name, layer in autoround.layer_config.items()}
    return _checked_choice(model.language_model, chosen, settings)


@contextmanager
def _no_dataset_progress_bars() -> Iterator[None]:
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not disabled:
            enable_progress_bars()


def _checked_choice(language_model: nn.Module, chosen: dict[str, int], settings: AutoSchemeSettings) -> dict[str, int]:
    """The choice covers exactly the decoder Linears, with widths among the options, within the budget."""
    layers = decoder_linear_names(language_model)
    missing, extra = sorted(set(layers) - set(chosen)), sorted(set(chosen) - set(layers))
    strange = {name: bits for name, bits in chosen.items() if bits not in settings.options}
    if missing or extra or strange:
        raise RuntimeError(f"AutoScheme's choice does not match the decoder Linears: missing {missing[:4]}, "
                           f"unexpected {extra[:4]}, widths outside {settings.options}: {dict(list(strange.items())[:4])}")
    achieved = achieved_average_bits(language_model, chosen, settings.group_size)
    if achieved > settings.avg_bits + 1e-3:
        raise RuntimeError(f"AutoScheme's choice averages {achieved:.4f} bits, over the budget {settings.avg_bits}")
    return {name: chosen[name] for name in layers}


def achieved_average_bits(language_model: nn.Module, layer_bits: dict[str, int], group_size: int) -> float:
    """Bits per weight over the decoder Linears, each at its width (`weight_formats.average_bits`)."""
    weights = {name: language_model.get_submodule(name).weight.numel() for name in layer_bits}
    stored = sum(average_bits(bits, group_size) * weights[name] for name, bits in layer_bits.items())
    return stored / sum(weights.values())
