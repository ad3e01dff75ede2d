"""vLLM's ColQwen3 with the projection bias the checkpoint carries (see the package docstring)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.colqwen3 import ColQwen3Model

PROJECTION_BIAS_SUFFIXES = ("embedding_proj_layer.bias", "custom_text_proj.bias")


class ColQwen3WithProjectionBias(ColQwen3Model):
    """Rebuilds `custom_text_proj` with a bias before loading when the weights include one.

    Only the projection changes; a checkpoint without a bias loads exactly as in vLLM."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        weights = list(weights)
        has_bias = any(name.endswith(PROJECTION_BIAS_SUFFIXES) for name, _ in weights)
        projection = self.custom_text_proj
        if has_bias and projection is not None and projection.bias is None:
            self.custom_text_proj = nn.Linear(
                projection.in_features,
                projection.out_features,
                bias=True,
                dtype=projection.weight.dtype,
                device=projection.weight.device,
            )
        return super().load_weights(weights)
