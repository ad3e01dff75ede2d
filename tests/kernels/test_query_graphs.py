"""The CUDA-graph query path of the fused text tower across grad modes (CUDA only; no fixtures from
conftest, so it also runs with --noconftest on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from colquant.kernels import accelerate_model
from colquant.kernels.backend import fast_path_unavailable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or fast_path_unavailable(torch.device("cuda")),
                                reason="the query graphs need a CUDA GPU with Triton")


def small_text_tower() -> torch.nn.Module:
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    config = Qwen3VLTextConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               rope_scaling={"rope_type": "default", "mrope_section": [8, 12, 12]})
    torch.manual_seed(0)
    return Qwen3VLTextModel(config).to("cuda", torch.bfloat16).eval()


def test_a_graph_captured_under_inference_mode_replays_outside_it():
    """A shape first seen under torch.inference_mode (as encode_* and the bench's checks call) is
    replayed later under no_grad: the graph's static inputs must accept in-place writes there."""
    tower = accelerate_model(small_text_tower())
    ids = torch.randint(0, 512, (4, 20), device="cuda")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        first = tower(input_ids=ids, attention_mask=mask).last_hidden_state.clone()
    with torch.no_grad():
        again = tower(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(again, first)
