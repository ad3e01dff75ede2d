import pytest
import torch
from PIL import Image

from colquant.processing import QUERY_AUGMENTATION_TOKENS, ColQwen3Processor


@pytest.fixture(scope="module")
def processor(tiny_path):
    return ColQwen3Processor.from_pretrained(tiny_path, max_num_visual_tokens=64)


def test_queries_get_ten_attended_pad_tokens_and_left_padding(processor):
    batch = processor.process_queries(["short", "a noticeably longer query"])
    pad = processor.pad_token_id
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[1] > lengths[0]
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        assert row[-QUERY_AUGMENTATION_TOKENS:].eq(pad).all()
        assert mask[-QUERY_AUGMENTATION_TOKENS:].eq(1).all()
    assert batch["attention_mask"][0, 0] == 0  # shorter query padded on the left


def test_page_prompt_has_one_image_token_per_merged_patch(processor):
    batch = processor.process_images([Image.new("RGB", (448, 576), "white")])
    grid = batch["image_grid_thw"][0]
    n_image_tokens = int((batch["input_ids"][0] == processor.image_token_id).sum())
    assert n_image_tokens == int(grid.prod()) // 4
    assert n_image_tokens <= 64
    assert batch["mm_token_type_ids"].sum() == n_image_tokens
    assert batch["pixel_values"].shape[0] == int(grid.prod())


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (300, 200), (0, 0, 0, 0)),
        Image.new("L", (200, 300), 128),
        Image.new("P", (120, 90)),
        Image.new("RGB", (6000, 8000), "white"),  # huge: scaled to the token budget
        Image.new("RGB", (20, 20), "white"),  # tiny: scaled up to the minimum
    ],
    ids=["rgba", "grayscale", "palette", "huge", "tiny"],
)
def test_odd_images_become_valid_batches(processor, image):
    batch = processor.process_images([image])
    assert batch["pixel_values"].dtype == torch.float32
    assert 4 <= int((batch["input_ids"] == processor.image_token_id).sum()) <= 64


def test_transparent_pixels_become_white(processor):
    from colquant.processing import to_rgb

    assert to_rgb(Image.new("RGBA", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_budget_below_minimum_is_rejected(processor):
    with pytest.raises(ValueError, match="max_num_visual_tokens"):
        ColQwen3Processor(processor.tokenizer, max_num_visual_tokens=2)
