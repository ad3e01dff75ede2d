"""Turning queries and page images into ColQwen3 inputs, and scoring them (MaxSim).

Reproduces the hub processor's semantics (DESIGN.md §2) without its remote code:
queries get 10 `<|endoftext|>` augmentation tokens that are attended to, pages are wrapped in a
fixed chat prompt whose single `<|image_pad|>` expands to one token per merged 2x2 patch, and
everything is left-padded. `max_num_visual_tokens` caps the image area (max_pixels = N x 32^2).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerFast

try:  # the PIL backend needs no torchvision, which has no wheel matching the CPU torch pin
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil as _ImageProcessor,
    )
except ImportError:  # transformers releases before the PIL/torchvision split
    from transformers import Qwen2VLImageProcessor as _ImageProcessor

QUERY_AUGMENTATION_TOKENS = 10
PAD_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|image_pad|>"
PAGE_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "Describe the image.<|im_end|><|endoftext|>"
)
PATCH_SIZE = 16
MERGE_SIZE = 2
PIXELS_PER_VISUAL_TOKEN = (PATCH_SIZE * MERGE_SIZE) ** 2
PROCESSOR_CONFIG = "colquant_processor.json"


def page_image_processor(max_num_visual_tokens: int = 1280) -> _ImageProcessor:
    """Qwen3-VL's image processor: patch 16, merge 2, mean/std 0.5, area capped by the token budget."""
    return _ImageProcessor(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=4 * PIXELS_PER_VISUAL_TOKEN,
        max_pixels=max_num_visual_tokens * PIXELS_PER_VISUAL_TOKEN,
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white (a page's background) and lift grayscale/palette to RGB."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


class ColQwen3Processor:
    """Batches queries and page images the way the hub's ColQwen3 processor does."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        image_processor: _ImageProcessor | None = None,
        max_num_visual_tokens: int = 1280,
    ) -> None:
        if max_num_visual_tokens < 4:
            raise ValueError(
                f"max_num_visual_tokens={max_num_visual_tokens} is too small: a page needs at least "
                "4 visual tokens (a 64x64 image); mteb uses 1280."
            )
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.max_num_visual_tokens = max_num_visual_tokens
        self.image_processor = image_processor or page_image_processor(max_num_visual_tokens)
        self.image_processor.size = {
            "shortest_edge": 4 * PIXELS_PER_VISUAL_TOKEN,
            "longest_edge": max_num_visual_tokens * PIXELS_PER_VISUAL_TOKEN,
        }
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_num_visual_tokens: int = 1280) -> "ColQwen3Processor":
        """Read the tokenizer (tokenizer.json) of a checkpoint directory; the image processor is
        rebuilt from the architecture's constants and the requested visual-token budget."""
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD_TOKEN
        return cls(tokenizer, max_num_visual_tokens=max_num_visual_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer and image-processor files in the hub checkpoint's layout."""
        path = Path(path)
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(str(path))
        (path / PROCESSOR_CONFIG).write_text(
            json.dumps({"max_num_visual_tokens": self.max_num_visual_tokens}, indent=2) + "\n"
        )

    def process_queries(self, texts: Sequence[str]) -> BatchFeature:
        """Text + 10 attended `<|endoftext|>` tokens (query augmentation), left-padded."""
        augmented = [text + PAD_TOKEN * QUERY_AUGMENTATION_TOKENS for text in texts]
        batch = self.tokenizer(augmented, padding="longest", return_tensors="pt")
        return BatchFeature({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})

    def process_images(self, images: Sequence[Image.Image]) -> BatchFeature:
        """Page prompt with one `<|image_pad|>` per merged patch, plus pixel patches and grid sizes."""
        pixels = self.image_processor(images=[to_rgb(image) for image in images], return_tensors="pt")
        grid = pixels["image_grid_thw"]
        n_visual = (grid.prod(dim=-1) // MERGE_SIZE**2).tolist()
        prompts = [PAGE_PROMPT.replace(IMAGE_TOKEN, IMAGE_TOKEN * n) for n in n_visual]
        batch = self.tokenizer(prompts, padding="longest", return_tensors="pt")
        input_ids = batch["input_ids"]
        return BatchFeature(
            {
                "input_ids": input_ids,
                "attention_mask": batch["attention_mask"],
                "pixel_values": pixels["pixel_values"],
                "image_grid_thw": grid,
                "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32),
            }
        )

    def visual_tokens(self, image: Image.Image) -> int:
        """How many visual tokens a page becomes under this processor's budget."""
        grid = self.image_processor(images=[to_rgb(image)], return_tensors="pt")["image_grid_thw"]
        return int(grid.prod() // MERGE_SIZE**2)
