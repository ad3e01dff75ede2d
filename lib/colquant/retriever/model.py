"""ColQwen3, natively: the hub checkpoint's layout on top of transformers' Qwen3-VL classes.

The hub ships ColQwen3 as remote code that breaks on transformers 5.x (DESIGN.md §2), so the project
owns a small implementation that reads the same checkpoint keys (`vlm.model.visual.*`,
`vlm.model.language_model.*`, `embedding_proj_layer.*`) and reproduces the same forward pass:
last hidden state -> 320-d projection -> per-token L2 normalisation (the reference's eps) -> padding
rows zeroed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLModel,
    Qwen3VLPreTrainedModel,
)

# relative, so it resolves both in the package and in a checkpoint's remote code (which carries the file)
from .weight_checks import load_strictly

# Qwen2/Qwen3 special tokens and the ids Qwen's tokenizer gives them: the one definition in the
# package (the tiny tokenizer is built from it; code that writes token ids by hand imports these).
QWEN_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
    "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
PAD_TOKEN_ID = QWEN_SPECIAL_TOKENS["<|endoftext|>"]
IM_START_TOKEN_ID = QWEN_SPECIAL_TOKENS["<|im_start|>"]
IM_END_TOKEN_ID = QWEN_SPECIAL_TOKENS["<|im_end|>"]
VISION_START_TOKEN_ID = QWEN_SPECIAL_TOKENS["<|vision_start|>"]
VISION_END_TOKEN_ID = QWEN_SPECIAL_TOKENS["<|vision_end|>"]
IMAGE_TOKEN_ID = QWEN_SPECIAL_TOKENS["<|image_pad|>"]


class ColQwen3Config(Qwen3VLConfig):
    """Qwen3-VL config plus the retrieval head's settings, under the hub's `model_type`."""

    model_type = "colqwen3"

    def __init__(
        self,
        embed_dim: int = 320,
        padding_side: str = "left",
        mask_non_image_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.padding_side = padding_side
        self.mask_non_image_embeddings = mask_non_image_embeddings

    @classmethod
    def colqwen3_4b(cls) -> "ColQwen3Config":
        """The exact configuration of `TomoroAI/tomoro-colqwen3-embed-4b` (Qwen3-VL-4B backbone)."""
        return cls(
            text_config=dict(
                vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                max_position_embeddings=262144, tie_word_embeddings=True,
                rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                     mrope_section=[24, 20, 20], mrope_interleaved=True),
            ),
            vision_config=dict(
                depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
                num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
            ),
            embed_dim=320,
        )

    @classmethod
    def tiny(cls) -> "ColQwen3Config":
        """Same architecture as the 4B at toy width: every decoder Linear's input is a multiple of 128
        (so group-128 quantization applies), three deepstack levels feed LM layers 0-2 as in the 4B,
        and the Qwen token ids are kept so the tiny tokenizer speaks the real model's id space."""
        return cls(
            text_config=dict(
                vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                max_position_embeddings=32768, tie_word_embeddings=True,
                rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                     mrope_section=[6, 5, 5], mrope_interleaved=True),
            ),
            vision_config=dict(
                depth=4, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                num_position_embeddings=2304, deepstack_visual_indexes=[1, 2, 3],
            ),
            embed_dim=320,
        )


@dataclass
class ColQwen3Output(ModelOutput):
    """`embeddings`: (batch, tokens, embed_dim), unit norm per token, exact zeros on padding."""

    embeddings: torch.Tensor | None = None


class _VisionLanguageModel(nn.Module):
    """Holds `model` so parameter names read `vlm.model.*` as in the hub checkpoint.

    The hub's `vlm` is a Qwen3VLForConditionalGeneration whose `lm_head` is tied to the token
    embeddings and never used for retrieval; leaving it out saves 0.39 B parameters of activations
    and lets checkpoints with or without `vlm.lm_head.weight` load the same way.
    """

    def __init__(self, config: ColQwen3Config) -> None:
        super().__init__()
        self.model = Qwen3VLModel(config)


class ColQwen3(Qwen3VLPreTrainedModel):
    """Late-interaction retriever: one L2-normalised `embed_dim` vector per input token."""

    config_class = ColQwen3Config
    base_model_prefix = "vlm"
    _keys_to_ignore_on_load_unexpected = [r"^vlm\.lm_head\.weight$"]

    def __init__(self, config: ColQwen3Config) -> None:
        super().__init__(config)
        self.vlm = _VisionLanguageModel(config)
        self.embedding_proj_layer = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """transformers' loading, refused (CheckpointError) unless the weights match the config: transformers
        alone initialises missing layers at random, drops unexpected tensors and casts dtypes with a log line.
        `colquant.load` and `AutoModel.from_pretrained(dir, trust_remote_code=True)` both come through here."""
        return load_strictly(super().from_pretrained, cls, pretrained_model_name_or_path, args, kwargs)

    @property
    def language_model(self) -> nn.Module:
        """The text tower (Qwen3VLTextModel): the part W4A16 quantizes."""
        return self.vlm.model.language_model

    @property
    def visual(self) -> nn.Module:
        return self.vlm.model.visual

    def encode_queries(self, texts: Sequence[str], **options: Any) -> Any:
        """Embed query texts in length-sorted batches; see `colquant.encode.encode_queries`."""
        encode_queries = _colquant_encode("encode_queries")
        return encode_queries(self, texts, **options)

    def encode_pages(self, images: Iterable[Any], **options: Any) -> Any:
        """Embed page images (PIL, paths, a datasets column); see `colquant.encode.encode_pages`."""
        encode_pages = _colquant_encode("encode_pages")
        return encode_pages(self, images, **options)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ColQwen3Output:
        if pixel_values is not None and mm_token_type_ids is None:
            # transformers >= 5.4 needs it whenever image_grid_thw is given (1 = image token).
            mm_token_type_ids = (input_ids == self.config.image_token_id).to(torch.int32)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = text_rope_positions(attention_mask) if pixel_values is None else image_rope_positions(
                mm_token_type_ids, attention_mask, image_grid_thw, self.config.vision_config.spatial_merge_size)
        hidden = self.vlm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        projected = self.embedding_proj_layer(hidden.to(self.embedding_proj_layer.weight.dtype))
        embeddings = normalize_tokens(projected)
        keep = attention_mask
        if self.config.mask_non_image_embeddings and pixel_values is not None:
            keep = keep * (input_ids == self.config.image_token_id)
        return ColQwen3Output(embeddings=embeddings * keep.unsqueeze(-1).to(embeddings.dtype))


def text_rope_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions [3, batch, tokens] of a text-only batch: each row's real tokens numbered from 0
    wherever its padding sits (padding positions 0), as transformers' `get_rope_index` numbers text and
    the reference model ran. Why: transformers 5 numbers a text-only batch 0..tokens-1, padding included,
    so a left-padded query's tokens sat at other absolute positions than alone; RoPE is relative only up
    to rounding, and in bf16 that moved a query's embedding by up to 2e-3 with its batch's longest query."""
    real = attention_mask.long()
    return ((real.cumsum(1) - 1) * real).expand(3, -1, -1)


def image_rope_positions(mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
                         image_grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """Multimodal RoPE positions [3 (t, h, w), batch, tokens] of text and image tokens, equal to
    transformers' `Qwen3VLModel.get_rope_index` (padding positions 0), computed with tensor ops only.

    Why by hand: transformers loops over the batch in Python and reads the device in every step
    (`.tolist()`, boolean indexing, `.item()`), so the GPU idles while the host catches up: 16 page
    syncs cost ~25 ms of a 466 ms BF16 page batch on an H200 (benchmarks/gpu_idle.py). The same
    positions: real tokens are numbered in order (`attention_mask` may pad either side); a text token
    sits at its index plus, for each image before it, max(h, w) minus the image's token count; an
    image's tokens sit at (start + frame, start + row, start + column) of its merged grid, images
    counted across the batch in `image_grid_thw`'s order."""
    batch, tokens = attention_mask.shape
    device = attention_mask.device
    real = attention_mask.bool()
    # compact each row's real tokens to the front (padding to a spare last column)
    rank = torch.where(real, real.long().cumsum(1) - 1, tokens)
    image = torch.zeros(batch, tokens + 1, dtype=torch.bool, device=device)
    image.scatter_(1, rank, (mm_token_type_ids == 1) & real)
    image = image[:, :tokens]
    index = torch.arange(tokens, device=device).expand(batch, tokens)
    previous = torch.nn.functional.pad(image[:, :-1], (1, 0))
    following = torch.nn.functional.pad(image[:, 1:], (0, 1))
    starts, ends = image & ~previous, image & ~following
    ordinal = (starts.flatten().long().cumsum(0) - 1).view(batch, tokens).clamp_min(0)  # image of each token
    grid = image_grid_thw.to(device).long()[ordinal]
    t, h, w = grid[..., 0], grid[..., 1] // spatial_merge_size, grid[..., 2] // spatial_merge_size
    shift = torch.where(ends, torch.maximum(h, w) - t * h * w, 0)
    before = shift.cumsum(1) - shift  # what the images ended before each token add to positions
    run_start = torch.cummax(torch.where(starts, index, -1), dim=1).values  # where each token's image began
    start, offset = run_start + before, index - run_start
    text = (index + before).expand(3, batch, tokens)
    vision = torch.stack((start + offset // (h * w), start + offset % (h * w) // w, start + offset % w))
    compact = torch.where(image, vision, text)
    positions = torch.gather(torch.nn.functional.pad(compact, (0, 1)), 2, rank.expand(3, batch, tokens))
    return torch.where(real, positions, 0)


def normalize_tokens(projected: torch.Tensor) -> torch.Tensor:
    """Per-token L2 normalisation with the reference's floor, `norm.clamp_min(finfo(dtype).eps)`:
    near-zero projections then shrink as in the published model instead of being blown up to unit
    length (torch's `normalize` floors at 1e-12 whatever the dtype)."""
    norm = projected.norm(p=2, dim=-1, keepdim=True)
    return projected / norm.clamp_min(torch.finfo(projected.dtype).eps)


def _colquant_encode(name: str) -> Any:
    """colquant's batching helper `name`. This file also ships inside checkpoints as transformers
    remote code, where colquant may be absent: transformers' import check skips try-blocks, and the
    error says what to call instead."""
    try:
        from colquant.retriever import encode
    except ImportError as error:
        raise ImportError(
            f"model.{name} needs the colquant package (pip install colquant); with transformers alone "
            "call model(**processor(text=[...])) or model(**processor(images=[...]))"
        ) from error
    return getattr(encode, name)


def parameter_count(module: nn.Module) -> int:
    """Distinct parameters (tied tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
