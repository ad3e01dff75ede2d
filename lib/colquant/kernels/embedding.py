"""The token-embedding table in int8: the memory-first 4-bit model's largest remaining BF16 tensor.

With its decoder linears in 4 bits, the 4B's BF16 vocabulary table (151,936 x 2,560, 742 MiB) is a
fifth of the model on the GPU. A retriever reads only the rows of the tokens it embeds, so the table
is stored as int8 with one absmax scale per vocabulary row (371 MiB + 0.6 MiB of scales) and only the
gathered rows are dequantized: the forward returns the same shape and dtype as ``nn.Embedding``.

Per row the rounding error is at most half a step, ``absmax(row) / 254`` (plus the output dtype's own
rounding). Unlike :class:`~colquant.kernels.fast_text.OffloadedEmbedding` the table stays on the GPU,
so a forward costs no host round trip and CUDA-graph capture is unaffected (the gather and the
multiply are ordinary device kernels).

This is a load-time transform (``colquant.load(..., embeddings="int8")``), not a checkpoint format:
the state dict then holds ``qweight``/``scales`` instead of ``weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from colquant.kernels.fast_text import OffloadedEmbedding, find_text_model

__all__ = ["EMBEDDINGS", "Int8Embedding", "quantize_embeddings", "quantize_rows_int8"]

EMBEDDINGS = ("bf16", "int8")  # `colquant.load(embeddings=...)`: keep the table as loaded, or int8 per row
INT8_MAX = 127
ROWS_PER_CHUNK = 8192  # rows quantized at a time: bounds the float32 temporary to 8192 x hidden x 4 bytes


@torch.no_grad()
def quantize_rows_int8(weight: torch.Tensor, rows_per_chunk: int = ROWS_PER_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 [V, H], float32 scales [V, 1]) with ``weight ~= q * scale``.

    Quantized in chunks of rows, so a 742 MiB table needs tens of MiB of scratch, not a float32 copy
    of itself. An all-zero row gets scale 1 (its codes are zero either way), never a division by 0.
    """
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty((weight.shape[0], 1), dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start:start + rows_per_chunk].float()
        absmax = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
        qweight[start:start + rows_per_chunk] = torch.round(rows / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scales[start:start + rows_per_chunk] = scale
    return qweight, scales


class Int8Embedding(nn.Module):
    """``nn.Embedding``'s forward over an int8 table with one float32 scale per row: gathers the
    requested rows and dequantizes only those, to ``dtype`` (the table's dtype before quantizing)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.ndim != 2 or scales.shape != (qweight.shape[0], 1):
            raise ValueError(f"Int8Embedding needs int8 [V, H] codes and [V, 1] scales; got {qweight.dtype} "
                             f"{list(qweight.shape)} and {list(scales.shape)}")
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """The int8 twin of a floating-point ``nn.Embedding``, on the same device."""
        qweight, scales = quantize_rows_int8(embedding.weight.detach())
        return cls(qweight, scales, embedding.weight.dtype, embedding.padding_idx)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).float() * self.scales.index_select(0, flat)
        return rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)

    def dequantize(self) -> torch.Tensor:
        """The whole table in float32 (for checks; the forward never builds it)."""
        return self.qweight.float() * self.scales

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row -> {self.dtype}"


def quantize_embeddings(model: nn.Module) -> int:
    """Swap the text tower's ``embed_tokens`` for an :class:`Int8Embedding`, in place; returns the
    bytes of device memory this frees (0 if it is int8 already).

    Raises ValueError, naming the fix, for a model with no Qwen3-VL text tower, a tower whose token
    embedding is not a floating-point ``nn.Embedding``, or one already offloaded to host memory.
    """
    try:
        text_model = find_text_model(model)
    except ValueError as error:
        raise ValueError(f"quantize_embeddings: {error}; pass a ColQwen3 or its Qwen3-VL text tower, whose "
                         "embed_tokens is the table to quantize") from error
    embedding = text_model.embed_tokens
    if isinstance(embedding, Int8Embedding):
        return 0
    if isinstance(embedding, OffloadedEmbedding):
        raise ValueError("quantize_embeddings: the token embeddings were offloaded to host memory "
                         "(offload_embeddings); quantize before offloading or call restore_embeddings first")
    if type(embedding) is not nn.Embedding or not embedding.weight.is_floating_point():
        raise ValueError(f"quantize_embeddings: {type(text_model).__name__}.embed_tokens is "
                         f"{type(embedding).__name__}, not a floating-point nn.Embedding; nothing to quantize")
    quantized = Int8Embedding.from_embedding(embedding)
    text_model.embed_tokens = quantized
    before = embedding.weight.numel() * embedding.weight.element_size()
    after = quantized.qweight.numel() + quantized.scales.numel() * quantized.scales.element_size()
    return before - after
