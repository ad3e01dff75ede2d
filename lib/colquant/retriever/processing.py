"""Turning queries and page images into ColQwen3 inputs, as the published reference does.

Reproduces the hub processor's semantics (TomoroAI's `processing_colqwen3.py`, run beside this
code on 2026-11-30; DESIGN.md §2 "Reference rules") without its remote code:

- queries are `.strip()`ped, then get 10 attended `<|endoftext|>` augmentation tokens;
- pages are converted with a plain `convert("RGB")` (alpha dropped, the colour under it kept),
  wrapped in a fixed chat prompt whose single `<|image_pad|>` expands to one token per merged 2x2
  patch;
- min/max pixels, patch and merge sizes and mean/std come from the checkpoint's
  `preprocessor_config.json` (Qwen3-VL: 65,536 px floor, patch 16, merge 2, mean/std 0.5), and
  `max_num_visual_tokens` N sets the pixel cap to N x 32^2 (mteb runs the model with N = 1280);
- everything is left-padded.

Where the reference silently breaks, this module differs on purpose and says so: a 16-bit or
float image is scaled by its mode's range (a plain RGB conversion clips a 16-bit page to white),
and a page never gets more visual tokens than its budget (Qwen's pixel floor can push a small
image past budgets under ~128 tokens; never at 1280).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, PreTrainedTokenizerFast

try:  # the PIL backend needs no torchvision, which has no wheel matching the CPU torch pin
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil as _ImageProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # transformers releases before the PIL/torchvision split
    from transformers import Qwen2VLImageProcessor as _ImageProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

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
DEFAULT_MAX_NUM_VISUAL_TOKENS = 1280  # what mteb's ColQwen3 wrapper passes for the published numbers
MAX_ASPECT_RATIO = 200  # Qwen's smart_resize rejects longer/shorter side ratios above this
PROCESSOR_CONFIG = "colquant_processor.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
Transparency = Literal["drop", "white"]
TRANSPARENCY_MODES = ("drop", "white")
PageInput = Image.Image | str | os.PathLike | bytes | np.ndarray
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def qwen3_vl_image_processor() -> _ImageProcessor:
    """The image processor of Qwen3-VL checkpoints' `preprocessor_config.json` (the 4B's values)."""
    return _ImageProcessor(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 65_536, "longest_edge": 16_777_216},
    )


def to_rgb(image: Image.Image, transparency: Transparency = "drop") -> Image.Image:
    """RGB the way the reference converts it, except where that conversion destroys the page.

    `transparency="drop"` (default, the reference's `convert("RGB")`) discards alpha and keeps the
    colour stored under it; `"white"` composites onto white instead, for pages whose transparent
    areas hold arbitrary colour (an explicit choice: it changes embeddings vs the reference).
    16-bit and 32-bit integer images are scaled from 0..65535 and float images from 0..1 to 8 bits;
    a plain conversion would clip them to a white page.
    """
    if transparency not in TRANSPARENCY_MODES:
        raise ValueError(f"transparency={transparency!r}: use 'drop' (the reference) or 'white'")
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        image = _scaled_to_8_bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if transparency == "white" and has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _scaled_to_8_bit(image: Image.Image) -> Image.Image:
    """A single-channel 16/32-bit integer or float image as 8-bit grayscale, by its mode's range."""
    values = np.asarray(image, dtype=np.float64)
    full_scale = 1.0 if image.mode == "F" else 65535.0
    if values.size and (values.min() < 0 or values.max() > full_scale):
        raise ValueError(
            f"a mode-{image.mode} image must hold values in 0..{full_scale:g} (got {values.min():g}.."
            f"{values.max():g}); rescale it to that range or convert it to 8-bit RGB yourself"
        )
    return Image.fromarray(np.round(values * (255.0 / full_scale)).astype(np.uint8), mode="L")


def page_size_problem(width: int, height: int) -> str | None:
    """Why Qwen's image resizing cannot take a page of this size (empty, or an aspect ratio over
    200), said after "page X", or None."""
    if width == 0 or height == 0:
        return f"is {width}x{height} pixels: an empty image has nothing to embed."
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        return (f"is {width}x{height} pixels, an aspect ratio of {ratio:.0f}; Qwen's image resizing accepts at most "
                f"{MAX_ASPECT_RATIO}. Crop it or split it into several pages.")
    return None


def open_page(page: PageInput, index: int = 0) -> Image.Image:
    """A PIL image from what users hold: a PIL image, a file path, encoded bytes, or an array.

    Arrays are (height, width) or (height, width, 1/3/4 channels) of uint8, uint16 (scaled from
    0..65535), bool, or floats in 0..1.
    """
    if isinstance(page, Image.Image):
        return page
    if isinstance(page, (str, os.PathLike, bytes)):
        source = io.BytesIO(page) if isinstance(page, bytes) else Path(page)
        try:
            image = Image.open(source)
            image.load()
        except (FileNotFoundError, IsADirectoryError) as error:
            raise FileNotFoundError(f"page {index}: no image file at {page}") from error
        except (UnidentifiedImageError, OSError) as error:
            shown = f"{len(page)} bytes" if isinstance(page, bytes) else str(page)
            raise ValueError(f"page {index}: {shown} is not an image PIL can read ({error})") from error
        return image
    if isinstance(page, np.ndarray):
        return _array_to_image(page, index)
    raise TypeError(
        f"page {index} is a {type(page).__name__}; pass PIL images, image file paths, encoded image "
        "bytes, or numpy arrays (H, W[, C])"
    )


def _array_to_image(array: np.ndarray, index: int) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"page {index}: array of shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype == np.uint8:
        scaled = array
    elif array.dtype == np.bool_:
        scaled = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        scaled = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
            raise ValueError(f"page {index}: a float image must hold finite values in 0..1; rescale it")
        scaled = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"page {index}: array dtype {array.dtype}; use uint8, uint16, bool or floats in 0..1")
    return Image.fromarray(np.ascontiguousarray(scaled))


class ColQwen3Processor:
    """Batches queries and page images the way the hub's ColQwen3 processor does."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        image_processor: _ImageProcessor | None = None,
        max_num_visual_tokens: int = DEFAULT_MAX_NUM_VISUAL_TOKENS,
        transparency: Transparency = "drop",
    ) -> None:
        if isinstance(max_num_visual_tokens, bool) or not isinstance(max_num_visual_tokens, int):
            raise TypeError(f"max_num_visual_tokens must be an int, got {max_num_visual_tokens!r}")
        if max_num_visual_tokens < 4:
            raise ValueError(
                f"max_num_visual_tokens={max_num_visual_tokens} is too small: a page needs at least "
                f"4 visual tokens (a 64x64 image); mteb uses {DEFAULT_MAX_NUM_VISUAL_TOKENS}."
            )
        if transparency not in TRANSPARENCY_MODES:
            raise ValueError(f"transparency={transparency!r}: use 'drop' (the reference) or 'white'")
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_processor = image_processor or qwen3_vl_image_processor()
        self.max_num_visual_tokens = max_num_visual_tokens
        self.transparency = transparency
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)

    @property
    def patch_factor(self) -> int:
        """Pixels per side of one visual token (patch x merge; 32 for Qwen3-VL)."""
        return self.image_processor.patch_size * self.image_processor.merge_size

    @property
    def max_pixels(self) -> int:
        """The pixel cap the visual-token budget sets: N x 32^2 (the checkpoint's longest_edge
        is replaced by it, as the reference's `max_num_visual_tokens` does)."""
        return self.max_num_visual_tokens * self.patch_factor**2

    @property
    def min_pixels(self) -> int:
        """The checkpoint's pixel floor (shortest_edge), never above the cap."""
        return min(self.image_processor.size["shortest_edge"], self.max_pixels)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_num_visual_tokens: int | None = None,
        transparency: Transparency | None = None,
    ) -> "ColQwen3Processor":
        """Tokenizer, `preprocessor_config.json` and the settings ColQuant saved with a checkpoint.

        `max_num_visual_tokens` and `transparency` default to the checkpoint's saved
        `colquant_processor.json`, then to the reference's values (1280, "drop").
        """
        path = Path(path)
        if not (path / IMAGE_PROCESSOR_CONFIG).exists():
            raise FileNotFoundError(
                f"{path} has no {IMAGE_PROCESSOR_CONFIG}: the page resolution (min/max pixels, patch "
                "and merge sizes, mean/std) comes from it. Copy it from the model's hub repo "
                "(TomoroAI/tomoro-colqwen3-embed-4b) into the checkpoint directory."
            )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD_TOKEN
        saved = read_saved_settings(path)
        return cls(
            tokenizer,
            _ImageProcessor.from_pretrained(str(path)),
            max_num_visual_tokens=saved.get("max_num_visual_tokens", DEFAULT_MAX_NUM_VISUAL_TOKENS)
            if max_num_visual_tokens is None
            else max_num_visual_tokens,
            transparency=saved.get("transparency", "drop") if transparency is None else transparency,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer and image-processor files in the hub checkpoint's layout, plus this
        processor's budget and transparency handling in `colquant_processor.json`."""
        path = Path(path)
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(str(path))
        settings = {"max_num_visual_tokens": self.max_num_visual_tokens, "transparency": self.transparency}
        # written whole, then renamed; by a plain open, so the file gets the umask's mode (this file
        # also ships as remote code, so colquant.basics.files' atomic_write is not at hand)
        staging = path / f".{PROCESSOR_CONFIG}.{os.getpid()}.partial"
        staging.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        os.replace(staging, path / PROCESSOR_CONFIG)

    def process_queries(self, texts: Sequence[str]) -> BatchFeature:
        """Stripped text + 10 attended `<|endoftext|>` tokens (query augmentation), left-padded."""
        texts = _checked_queries(texts)
        augmented = [text.strip() + PAD_TOKEN * QUERY_AUGMENTATION_TOKENS for text in texts]
        batch = self.tokenizer(augmented, padding="longest", return_tensors="pt")
        return BatchFeature({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})

    def process_images(self, images: Sequence[PageInput]) -> BatchFeature:
        """Page prompt with one `<|image_pad|>` per merged patch, plus pixel patches and grid sizes.

        Accepts PIL images, file paths, encoded bytes and numpy arrays (see `open_page`).
        """
        pages = [self.resized_page(page, index) for index, page in enumerate(_checked_pages(images))]
        pixels = self.image_processor(images=pages, do_resize=False, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        n_visual = (grid.prod(dim=-1) // self.image_processor.merge_size**2).tolist()
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

    def prepared_page(self, page: PageInput, index: int = 0) -> Image.Image:
        """An input page as the RGB image the model sees before resizing; rejects what Qwen cannot
        resize (empty images, aspect ratios over 200) with the limit named."""
        image = to_rgb(open_page(page, index), self.transparency)
        problem = page_size_problem(*image.size)
        if problem:
            raise ValueError(f"page {index} {problem}")
        return image

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a page is resized to: Qwen's smart_resize between the checkpoint's pixel
        floor and the budget's cap; if the floor would push the page past the cap (budgets under
        ~128 tokens), the cap wins and the floor drops to one visual token."""
        factor = self.patch_factor
        size = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if size[0] * size[1] > self.max_pixels:
            size = smart_resize(height, width, factor=factor, min_pixels=factor**2, max_pixels=self.max_pixels)
        return size

    def resized_page(self, page: PageInput, index: int = 0) -> Image.Image:
        """The page at the size the model sees it, resampled as the image processor would
        (PIL, the checkpoint's `resample`, bicubic for Qwen)."""
        image = self.prepared_page(page, index)
        height, width = self.resized_size(image.height, image.width)
        return image.resize((width, height), resample=self.image_processor.resample)

    def visual_tokens(self, image: PageInput) -> int:
        """How many visual tokens a page becomes under this processor's budget."""
        page = self.prepared_page(image)
        height, width = self.resized_size(page.height, page.width)
        return height * width // self.patch_factor**2


def read_saved_settings(path: Path) -> dict[str, Any]:
    """The processor settings ColQuant saved beside a checkpoint (`colquant_processor.json`), if any."""
    file = path / PROCESSOR_CONFIG
    if not file.exists():
        return {}
    try:
        settings = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); delete it to use the defaults") from error
    unknown = set(settings) - {"max_num_visual_tokens", "transparency"} if isinstance(settings, dict) else None
    if unknown is None or unknown:
        raise ValueError(
            f"{file} must be an object with max_num_visual_tokens and/or transparency; "
            f"got {settings!r}. Fix or delete it."
        )
    return settings


def _checked_queries(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(
            "process_queries takes a list of queries, got one string; for a single query pass [text]"
        )
    if texts is None or not isinstance(texts, Sequence):
        raise TypeError(f"process_queries takes a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("process_queries got an empty list: there is no query to embed")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"query {index} is {type(text).__name__} ({text!r}); every query must be a string")
    return list(texts)


def _checked_pages(images: Any) -> list[PageInput]:
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, np.ndarray)):
        raise TypeError(
            f"process_images takes a list of pages, got a single {type(images).__name__}; pass [page]"
        )
    if images is None or not isinstance(images, Sequence):
        raise TypeError(f"process_images takes a list of pages, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("process_images got an empty list: there is no page to embed")
    return list(images)
