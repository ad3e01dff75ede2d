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
        queries: list[torch.Tensor] | torch.Tensor, pages: list[torch.Tensor] | torch.Tensor, batch_size: int = 128,
        device: str | torch.device | None = None, **_: Any,
    ) -> torch.Tensor:
        """MaxSim as colpali-engine's `BaseVisualRetrieverProcessor.score_multi_vector` (the hub processor's,
        which mteb calls) computes it, so scores match the published ones: queries and pages are zero-padded
        per group of `batch_size` (a page shorter than the longest of its group floors each query token's best
        match at 0), products run in the embeddings' own dtype, and the (n_queries, n_pages) scores come back
        float32 on the CPU. `colquant.score(..., mode="colpali")` gives the same in float32 without the
        padded products."""
        if len(queries) == 0 or len(pages) == 0:
            raise ValueError(f"nothing to score: {len(queries)} queries and {len(pages)} pages given")
        device = device or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
        queries, pages = [torch.as_tensor(x) for x in queries], [torch.as_tensor(x) for x in pages]
        pad = torch.nn.utils.rnn.pad_sequence
        rows = []
        for i in range(0, len(queries), batch_size):
            q = pad(queries[i : i + batch_size], batch_first=True).to(device)
            blocks = [torch.einsum("qnd,psd->qpns", q, pad(pages[j : j + batch_size], batch_first=True).to(device))
                      .amax(dim=3).sum(dim=2) for j in range(0, len(pages), batch_size)]
            rows.append(torch.cat(blocks, dim=1).cpu())
        return torch.cat(rows).float()
