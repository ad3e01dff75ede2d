"""ColQwen3 processor for `AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)`.

Shipped inside ColQuant checkpoints next to `colquant_processing.py` (ColQuant's processor, copied
verbatim); this file adds the interface the hub's ColQwen3 processor offers and mteb's ColQwen3
wrapper calls: `processor(images=...)` / `processor(text=...)` and `score_multi_vector`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .colquant_processing import ColQwen3Processor as _ColQuantProcessor


class ColQwen3Processor(_ColQuantProcessor):
    """ColQuant's processor with the hub processor's call and scoring interface."""

    @classmethod
    def from_pretrained(
        cls, path: str | Path, max_num_visual_tokens: int | None = None, **_hub_kwargs: Any
    ) -> "ColQwen3Processor":
        """AutoProcessor passes hub options (trust_remote_code, revision, ...) that a local read ignores;
        without `max_num_visual_tokens` the processor's own default (or the checkpoint's) applies."""
        budget = {} if max_num_visual_tokens is None else {"max_num_visual_tokens": max_num_visual_tokens}
        return super().from_pretrained(path, **budget)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """AutoProcessor calls this on remote-code classes; it records the class it was loaded by."""
        cls._auto_class = auto_class

    def __call__(self, images: list | None = None, text: list[str] | None = None, **_: Any):
        """Pages when images are given, queries otherwise (the hub processor's contract)."""
        if images is not None and text is not None:
            raise ValueError("pass images or text, not both: pages and queries are embedded separately")
        if images is not None:
            return self.process_images(images)
        if text is None:
            raise ValueError("pass images (pages) or text (queries)")
        return self.process_queries(text)

    @staticmethod
    def score_multi_vector(
        queries: list[torch.Tensor] | torch.Tensor, pages: list[torch.Tensor] | torch.Tensor, device: str | None = None, **_: Any
    ) -> torch.Tensor:
        """MaxSim, as colpali-engine scores: token sets zero-padded, (n_queries, n_pages) float32."""
        pad = torch.nn.utils.rnn.pad_sequence
        q = pad([torch.as_tensor(x) for x in queries], batch_first=True).float().to(device or "cpu")
        p = pad([torch.as_tensor(x) for x in pages], batch_first=True).float().to(device or "cpu")
        return torch.einsum("qnd,psd->qpns", q, p).amax(dim=-1).sum(dim=-1)
