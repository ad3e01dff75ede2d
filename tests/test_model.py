import json
import math
from pathlib import Path

import torch
from PIL import Image

from colquant.model import ColQwen3, ColQwen3Config, parameter_count


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
