"""MaxSim late-interaction scoring over ragged, zero-padded multi-vector embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Embeddings = torch.Tensor | Sequence[torch.Tensor]


def pad_embeddings(embeddings: Embeddings) -> torch.Tensor:
    """Stack per-item (tokens, dim) tensors into (items, max_tokens, dim), zero-padding the rest."""
    if isinstance(embeddings, torch.Tensor):
        if embeddings.dim() != 3:
            raise ValueError(f"expected (items, tokens, dim) embeddings, got shape {tuple(embeddings.shape)}")
        return embeddings
    if len(embeddings) == 0:
        raise ValueError("no embeddings to score")
    return torch.nn.utils.rnn.pad_sequence(list(embeddings), batch_first=True)


def score(
    query_embeddings: Embeddings,
    page_embeddings: Embeddings,
    *,
    page_batch_size: int = 128,
    query_batch_size: int = 128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """MaxSim scores (queries, pages): score(q, d) = sum_i max_j <q_i, d_j>.

    Padding is recognised as all-zero token rows. Padded page rows are excluded from the max (a
    plain zero-padded max would clamp negative best matches to 0, which reorders pages when token
    counts differ); padded query rows contribute nothing. Queries and pages are processed in blocks
    so the (queries x pages x tokens x tokens) similarity never exists whole; computation is float32.
    """
    queries = pad_embeddings(query_embeddings)
    pages = pad_embeddings(page_embeddings)
    if queries.shape[-1] != pages.shape[-1]:
        raise ValueError(f"embedding dims differ: queries {queries.shape[-1]}, pages {pages.shape[-1]}")
    device = torch.device(device) if device is not None else queries.device
    rows = []
    for q_start in range(0, queries.shape[0], query_batch_size):
        query_block = queries[q_start : q_start + query_batch_size].to(device, torch.float32)
        rows.append(
            torch.cat(
                [
                    _maxsim_block(query_block, pages[p_start : p_start + page_batch_size].to(device, torch.float32))
                    for p_start in range(0, pages.shape[0], page_batch_size)
                ],
                dim=1,
            )
        )
    return torch.cat(rows, dim=0)


def _maxsim_block(queries: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    query_rows = queries.abs().sum(-1) > 0  # (Q, Tq)
    page_rows = pages.abs().sum(-1) > 0  # (P, Td)
    sim = torch.einsum("qid,pjd->qpij", queries, pages)
    sim = sim.masked_fill(~page_rows[None, :, None, :], float("-inf"))
    best = sim.max(dim=-1).values  # (Q, P, Tq)
    best = torch.where(query_rows[:, None, :] & page_rows.any(-1)[None, :, None], best, 0.0)
    return best.sum(dim=-1)
