"""The processor against the reference's rules (DESIGN.md §2) and against bad input.

Expected values are derived by hand from the reference's rules (Qwen3-VL's preprocessor_config:
65,536 px floor, 32 px per visual token, mteb's budget of 1280 tokens = 1,310,720 px; Qwen's
smart_resize: round each side to 32, shrink with floor above the cap, grow with ceil below the
floor), not by calling the code under test.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from colquant.retriever.processing import PAD_TOKEN, QUERY_AUGMENTATION_TOKENS, ColQwen3Processor, to_rgb

PATCH_VALUES = 3 * 2 * 16 * 16  # channels x temporal patch x 16 x 16


@pytest.fixture(scope="module")
def processor(tiny_path):
    return ColQwen3Processor.from_pretrained(tiny_path, max_num_visual_tokens=64)


@pytest.fixture(scope="module")
def reference(tiny_path):
    """The processor at the reference's settings: the checkpoint's own files, mteb's 1280 budget."""
    return ColQwen3Processor.from_pretrained(tiny_path)


def ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_left_padded(processor, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    pad = processor.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return input_ids, mask


# --- queries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queries, stripped",
    [
        (["short", "a noticeably longer query"], ["short", "a noticeably longer query"]),
        (["  leading and trailing spaces  ", "trailing newline\n", "\ttabs\t", "   "],
         ["leading and trailing spaces", "trailing newline", "tabs", ""]),
    ],
    ids=["ragged", "whitespace"],
)
def test_queries_match_the_reference_rules(reference, queries, stripped):
    batch = reference.process_queries(queries)
    augmentation = [reference.pad_token_id] * QUERY_AUGMENTATION_TOKENS
    input_ids, mask = expected_left_padded(reference, [ids(reference, text) + augmentation for text in stripped])
    assert torch.equal(batch["input_ids"], input_ids)
    assert torch.equal(batch["attention_mask"], mask)


def test_whitespace_query_has_the_reference_token_count(reference):
    # DESIGN.md: the reference gives 37 tokens (27 characters + 10 augmentation), not 41
    assert int(reference.process_queries(["  leading and trailing spaces  "])["attention_mask"].sum()) == 37


# --- pages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, grid",
    [
        ((1700, 2200), (80, 62)),  # 2208x1696 > cap: beta=sqrt(3.74e6/1310720), floor -> 1280x992 px
        ((300, 4000), (250, 18)),  # 4000x288 rounds inside [floor, cap]
        ((64, 64), (16, 16)),  # below the 65,536 px floor: grows to 256x256 (64 tokens, not 4)
        ((200, 150), (14, 20)),  # 160x192 rounds below the floor: ceil growth -> 224x320
    ],
    ids=["1700x2200", "300x4000", "64x64", "200x150"],
)
def test_page_grid_and_prompt_match_the_reference_rules(reference, size, grid):
    batch = reference.process_images([Image.new("RGB", size, "white")])
    rows, cols = grid
    n_visual = rows * cols // 4
    expected_ids, expected_mask = expected_left_padded(
        reference,
        [ids(reference, "<|im_start|>user\n<|vision_start|>") + [reference.image_token_id] * n_visual
         + ids(reference, f"<|vision_end|>Describe the image.<|im_end|>{PAD_TOKEN}")],
    )
    assert batch["image_grid_thw"].tolist() == [[1, rows, cols]]
    assert tuple(batch["pixel_values"].shape) == (rows * cols, PATCH_VALUES)
    assert torch.equal(batch["input_ids"], expected_ids)
    assert torch.equal(batch["attention_mask"], expected_mask)
    assert reference.visual_tokens(Image.new("RGB", size)) == n_visual


def test_ragged_page_batch_is_left_padded(reference):
    batch = reference.process_images([Image.new("RGB", (64, 64)), Image.new("RGB", (200, 150))])
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16], [1, 14, 20]]
    assert tuple(batch["pixel_values"].shape) == (16 * 16 + 14 * 20, PATCH_VALUES)
    prompt = len(ids(reference, "<|im_start|>user\n<|vision_start|><|vision_end|>Describe the image.<|im_end|>"
                               + PAD_TOKEN))
    assert batch["attention_mask"].sum(dim=1).tolist() == [64 + prompt, 70 + prompt]
    assert batch["attention_mask"][0, : 70 - 64].eq(0).all()
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == [64, 70]


def test_rgba_page_keeps_the_colour_under_transparent_pixels(reference):
    """The reference's plain convert("RGB"): fully transparent red is red (normalised +1, -1, -1)."""
    batch = reference.process_images([Image.new("RGBA", (640, 480), (255, 0, 0, 0))])
    red, green_blue = batch["pixel_values"][:, : PATCH_VALUES // 3], batch["pixel_values"][:, PATCH_VALUES // 3 :]
    assert torch.allclose(red, torch.ones_like(red)) and torch.allclose(green_blue, -torch.ones_like(green_blue))


def test_white_compositing_is_an_explicit_option(tiny_path):
    white = ColQwen3Processor.from_pretrained(tiny_path, transparency="white")
    values = white.process_images([Image.new("RGBA", (64, 64), (255, 0, 0, 0))])["pixel_values"]
    assert torch.allclose(values, torch.ones_like(values))
    assert to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "white").getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="transparency='grey'"):
        ColQwen3Processor.from_pretrained(tiny_path, transparency="grey")


def test_budget_caps_pages_even_where_the_floor_would_exceed_it(processor):
    for size in [(20, 20), (6000, 8000), (224, 288), (64, 64)]:
        assert processor.visual_tokens(Image.new("RGB", size)) <= 64
    assert processor.visual_tokens(Image.new("RGB", (224, 288))) == 63  # 7x9 tokens, as sized


def test_budget_below_minimum_is_rejected(processor):
    with pytest.raises(ValueError, match="max_num_visual_tokens"):
        ColQwen3Processor(processor.tokenizer, max_num_visual_tokens=2)


# --- settings read from the checkpoint ------------------------------------------------------------


def test_image_settings_come_from_the_checkpoints_preprocessor_config(tiny_path, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_path / name).read_bytes())
    config = json.loads((tiny_path / "preprocessor_config.json").read_text())
    config.update(size={"shortest_edge": 16 * 16 * 4 * 4, "longest_edge": 16_777_216},
                  image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], patch_size=8)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = ColQwen3Processor.from_pretrained(tmp_path, max_num_visual_tokens=100)
    assert processor.max_pixels == 100 * 16 * 16  # N x (patch x merge)^2 with this checkpoint's patch
    batch = processor.process_images([Image.new("RGB", (32, 32), "white")])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]  # floor 4,096 px: 64x64 with 8 px patches
    assert torch.allclose(batch["pixel_values"], torch.ones_like(batch["pixel_values"]))  # mean 0, std 1


def test_saved_budget_is_used_unless_overridden(tiny_path, tmp_path):
    ColQwen3Processor.from_pretrained(tiny_path, max_num_visual_tokens=256).save_pretrained(tmp_path)
    assert ColQwen3Processor.from_pretrained(tmp_path).max_num_visual_tokens == 256
    assert ColQwen3Processor.from_pretrained(tmp_path, max_num_visual_tokens=64).max_num_visual_tokens == 64
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["size"]["shortest_edge"] == 65_536


def test_missing_preprocessor_config_names_the_file(tiny_path, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tiny_path / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ColQwen3Processor.from_pretrained(tmp_path)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "queries, error, message",
    [
        ("What was the revenue?", TypeError, r"got one string; for a single query pass \[text\]"),
        ([], ValueError, "empty list"),
        (None, TypeError, "list of strings, got NoneType"),
        (["fine", None], TypeError, "query 1 is NoneType"),
        (["fine", 42], TypeError, "query 1 is int"),
    ],
    ids=["string", "empty", "none", "none-item", "int-item"],
)
def test_bad_queries_raise_clear_errors(processor, queries, error, message):
    with pytest.raises(error, match=message):
        processor.process_queries(queries)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (Image.new("RGB", (64, 64)), TypeError, r"got a single Image; pass \[page\]"),
        ([], ValueError, "empty list"),
        ([Image.new("RGB", (0, 0))], ValueError, "page 0 is 0x0 pixels"),
        ([Image.new("RGB", (64, 64)), Image.new("RGB", (10, 4000))], ValueError,
         "page 1 is 10x4000 pixels, an aspect ratio of 400; .* at most 200"),
        ([None], TypeError, "page 0 is a NoneType; pass PIL images, image file paths"),
        (["/nonexistent/page.png"], FileNotFoundError, "no image file at /nonexistent/page.png"),
        ([b"not an image"], ValueError, "12 bytes is not an image"),
        ([np.zeros((8, 8, 2), np.uint8)], ValueError, r"shape \(8, 8, 2\)"),
        ([np.full((8, 8), 2.0, np.float32)], ValueError, "float image must hold finite values in 0..1"),
        ([Image.fromarray(np.full((8, 8), 7.5, np.float32))], ValueError, "mode-F image must hold values in 0..1"),
    ],
    ids=["single-image", "empty", "0x0", "aspect-400", "none", "missing-path", "bad-bytes", "2-channels",
         "float-array-range", "float-image-range"],
)
def test_bad_pages_raise_clear_errors(processor, images, error, message):
    with pytest.raises(error, match=message):
        processor.process_images(images)


def test_aspect_ratio_at_the_limit_is_accepted(processor):
    assert processor.process_images([Image.new("RGB", (20, 4000))])["image_grid_thw"].shape == (1, 3)


def mean_pixel(processor, page) -> float:
    return float(processor.process_images([page])["pixel_values"].mean())


def test_paths_bytes_and_arrays_give_the_same_page(processor, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    image.save(tmp_path / "page.png")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    expected = processor.process_images([image])["pixel_values"]
    for page in (tmp_path / "page.png", str(tmp_path / "page.png"), buffer.getvalue(), rgb,
                 (rgb.astype(np.uint16) * 257), rgb / 255.0):
        assert torch.allclose(processor.process_images([page])["pixel_values"], expected), type(page)


def test_sixteen_bit_and_float_pages_are_scaled_by_their_range(processor, tmp_path):
    """A 16-bit PNG of mid grey must look mid grey, not white (a plain RGB conversion clips it)."""
    grey16 = Image.fromarray(np.full((64, 64), 32768, np.uint16))
    grey16.save(tmp_path / "grey16.png")
    reopened = Image.open(tmp_path / "grey16.png")
    assert reopened.mode.startswith("I")
    grey8 = Image.new("RGB", (64, 64), (128, 128, 128))
    expected = mean_pixel(processor, grey8)
    assert abs(expected) < 0.01  # mid grey normalises to ~0, white would be 1
    for page in (reopened, grey16, Image.fromarray(np.full((64, 64), 128 / 255, np.float32)),
                 Image.new("I", (64, 64), 32896)):
        assert mean_pixel(processor, page) == pytest.approx(expected, abs=1e-6), page.mode


def test_load_uses_the_budget_the_checkpoint_saved(tiny_path, tmp_path):
    """colquant.load honours colquant_processor.json (256 saved -> 256 used) unless overridden."""
    import colquant

    for file in tiny_path.iterdir():
        (tmp_path / file.name).symlink_to(file)
    (tmp_path / "colquant_processor.json").unlink()
    (tmp_path / "colquant_processor.json").write_text(json.dumps({"max_num_visual_tokens": 256}))
    assert colquant.load(tmp_path)[1].max_num_visual_tokens == 256
    assert colquant.load(tmp_path, max_num_visual_tokens=64)[1].max_num_visual_tokens == 64
