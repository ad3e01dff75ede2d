import json
import math
from pathlib import Path

import torch
from PIL import Image

from colquant.retriever.model import ColQwen3, ColQwen3Config, image_rope_positions, parameter_count, text_rope_positions


def test_tiny_embeddings_are_unit_norm_with_exact_zero_padding(tiny_model):
    model, processor = tiny_model
    batch = processor.process_queries(["q", "a longer query text"])
    with torch.no_grad():
        embeddings = model(**batch).embeddings
    assert embeddings.shape[-1] == 320
    norms = embeddings.float().norm(dim=-1)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(norms[mask], torch.ones_like(norms[mask]), atol=1e-2)
    assert embeddings[~mask].eq(0).all()


def test_query_embedding_does_not_depend_on_batch_or_padding(tiny_model):
    model, processor = tiny_model
    query = "what was the revenue in 2019"
    with torch.no_grad():
        alone = model(**processor.process_queries([query])).embeddings[0]
        batch = processor.process_queries(["x", query, "a much, much longer neighbouring query text here"])
        together = model(**batch).embeddings[1]
    together = together[batch["attention_mask"][1].bool()]
    assert together.shape == alone.shape
    assert torch.allclose(alone.float(), together.float(), atol=2e-2)  # bf16 tolerance


def test_text_batches_number_real_tokens_only_as_the_reference_and_drift_no_more_than_it(tiny_model):
    """transformers 5 numbers a text-only batch 0..T-1 with its padding; the reference (transformers'
    `get_rope_index`, which the hub model ran) numbers real tokens only. In bf16 the absolute positions
    change a query's embedding with how much left padding its batch adds."""
    model, processor = tiny_model
    assert model.dtype == torch.bfloat16
    query = "what was the revenue in 2019"
    batch = processor.process_queries([query, "a much longer neighbouring query text that pads the other on the left " * 3])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    reference = model.vlm.model.get_rope_index(ids, torch.zeros_like(ids, dtype=torch.int32), attention_mask=mask)[0]
    assert not mask[0].all() and torch.equal(text_rope_positions(mask), reference)
    with torch.no_grad():
        alone = model(**processor.process_queries([query])).embeddings[0].float()
        padded = model(**batch).embeddings[0][mask[0].bool()].float()
        padded_as_reference = model(**batch, position_ids=reference).embeddings[0][mask[0].bool()].float()
    assert torch.equal(padded, padded_as_reference)  # bit-identical to the reference's positions
    assert (alone - padded).abs().max() <= (alone - padded_as_reference).abs().max()


def test_page_embedding_does_not_depend_on_batch(tiny_model):
    model, processor = tiny_model
    page = Image.new("RGB", (256, 320), "white")
    other = Image.new("RGB", (448, 576), "gray")
    with torch.no_grad():
        alone = model(**processor.process_images([page])).embeddings[0]
        batch = processor.process_images([other, page])
        together = model(**batch).embeddings[1][batch["attention_mask"][1].bool()]
    assert torch.allclose(alone.float(), together.float(), atol=2e-2)


def test_4b_config_reproduces_every_hub_tensor_name_and_shape():
    """The real checkpoint's 716 tensors (shapes recorded from the hub) against our 4B architecture."""
    hub = json.loads((Path(__file__).parent / "data" / "colqwen3_4b_state_dict_shapes.json").read_text())
    hub.pop("vlm.lm_head.weight")  # tied to the token embeddings; the native model does not keep it
    with torch.device("meta"):
        model = ColQwen3(ColQwen3Config.colqwen3_4b())
    ours = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert ours == hub
    assert parameter_count(model) == sum(math.prod(shape) for shape in hub.values())


def test_near_zero_projections_are_floored_at_the_dtypes_eps_as_in_the_reference(tiny_model):
    """The reference divides by norm.clamp_min(finfo(dtype).eps); torch's normalize would blow a
    projection of norm 1e-3 up to unit length in bf16 (eps 2^-7), the reference gives 1e-3 / 2^-7."""
    model, processor = tiny_model
    batch = processor.process_queries(["q"])
    proj = model.embedding_proj_layer
    saved = proj.weight.detach().clone(), proj.bias.detach().clone()
    try:
        with torch.no_grad():
            proj.weight.zero_()
            proj.bias.zero_()
            proj.bias[0] = 1e-3
            embeddings = model(**batch).embeddings
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved[0])
            proj.bias.copy_(saved[1])
    norms = embeddings.float().norm(dim=-1)[batch["attention_mask"].bool()]
    expected = float(torch.tensor(1e-3, dtype=embeddings.dtype)) / torch.finfo(embeddings.dtype).eps
    assert torch.allclose(norms, torch.full_like(norms, expected), rtol=1e-2)


# --------------------------------------------------------------------------------------------
# multimodal RoPE positions without host reads


def rope_index(model: ColQwen3, input_ids, attention_mask, grid):
    """transformers' own positions for the batch (the reference)."""
    types = (input_ids == model.config.image_token_id).to(torch.int32)
    return model.vlm.model.get_rope_index(input_ids, types, image_grid_thw=grid, attention_mask=attention_mask)[0]


def ours(model: ColQwen3, input_ids, attention_mask, grid):
    types = (input_ids == model.config.image_token_id).to(torch.int32)
    return image_rope_positions(types, attention_mask, grid, model.config.vision_config.spatial_merge_size)


def test_page_positions_equal_transformers_rope_index_for_left_and_right_padding(tiny_model):
    model, processor = tiny_model
    pages = [Image.new("RGB", size, "white") for size in ((256, 320), (448, 576), (320, 256), (64, 64))]
    batch = processor.process_images(pages)
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    assert not mask.all()  # pages of different sizes: left padding
    assert torch.equal(ours(model, ids, mask, grid), rope_index(model, ids, mask, grid))
    lengths = mask.sum(1)
    right_ids, right_mask = torch.full_like(ids, 0), torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):  # the same rows padded on the right
        right_ids[row, :n], right_mask[row, :n] = ids[row, mask[row].bool()], 1
    assert torch.equal(ours(model, right_ids, right_mask, grid), rope_index(model, right_ids, right_mask, grid))


def test_positions_of_several_images_a_row_frames_and_text_only_rows_equal_transformers(tiny_model):
    model, _ = tiny_model
    img, merge = model.config.image_token_id, model.config.vision_config.spatial_merge_size
    grids = torch.tensor([[1, 2 * merge, 3 * merge], [2, merge, 2 * merge], [1, 4 * merge, merge]])
    counts = [int(t * h * w) // merge**2 for t, h, w in grids.tolist()]
    rows = [[5, 6] + [img] * counts[0] + [7] + [img] * counts[1] + [8, 9],  # two images, one of two frames
            [5] * 7,  # text only
            [0, 0] + [5] + [img] * counts[2] + [6]]  # padded on the left
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    mask[2, :2] = 0
    assert torch.equal(ours(model, ids, mask, grids), rope_index(model, ids, mask, grids))


def test_a_page_forward_reads_nothing_back_from_the_device_for_positions(tiny_model, monkeypatch):
    """transformers' rope index reads the device per page; the model computes positions itself."""
    model, processor = tiny_model
    batch = processor.process_images([Image.new("RGB", (256, 320), "white"), Image.new("RGB", (64, 64), "gray")])
    monkeypatch.setattr(type(model.vlm.model), "get_rope_index", None)  # would raise if called
    with torch.no_grad():
        embeddings = model(**batch).embeddings
    assert torch.isfinite(embeddings).all()
