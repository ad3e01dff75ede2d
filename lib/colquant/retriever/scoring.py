"""MaxSim late-interaction scoring over ragged, zero-padded multi-vector embeddings.

Two modes, because the field's published numbers and the mathematically exact score differ:

- `mode="exact"` (the library default): score(q, d) = sum_i max_j <q_i, d_j> over the real
  (non-zero) token vectors of q and d. All-zero rows are padding and take no part.
- `mode="colpali"`: colpali-engine's `BaseVisualRetrieverProcessor.score_multi_vector`, which mteb
  uses for the published ViDoRe numbers. Pages are zero-padded (mteb pads the whole encoded chunk;
  colpali-engine pads a list in groups of `batch_size` pages) and the max runs over the padding
  too, so on a page shorter than its padded width a query token's best match is floored at 0.

Both are computed as one float32 matrix product per block of (query tokens x page tokens), with
pages sorted by length so that blocks carry little padding: faster than colpali-engine's
`einsum("bnd,csd->bcns")` over fully padded batches, and bounded in memory for any corpus size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from colquant.basics.arguments import require_count, require_flag, usable_device

Embeddings = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]
ScoringMode = Literal["exact", "colpali"]
SCORING_MODES = ("exact", "colpali")
COLPALI_BATCH_SIZE = 128  # colpali-engine's score_multi_vector default batch_size
BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}  # similarity entries per block (float32: 64 MB / 1 GB)
PROGRESS_MIN_BLOCKS = 16  # show_progress_bar=None shows a bar from this many blocks on


def pad_embeddings(embeddings: Embeddings) -> torch.Tensor:
    """Stack per-item (tokens, dim) tensors into (items, max_tokens, dim), zero-padding the rest."""
    if isinstance(embeddings, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(embeddings)
        if tensor.dim() != 3:
            raise ValueError(f"expected (items, tokens, dim) embeddings, got shape {tuple(tensor.shape)}")
        return tensor
    if len(embeddings) == 0:
        raise ValueError("no embeddings to score")
    return torch.nn.utils.rnn.pad_sequence([torch.as_tensor(item) for item in embeddings], batch_first=True)


@dataclass
class _Items:
    """Real (non-zero) token vectors per item, and how many rows the reference pads each item to."""

    tokens: list[torch.Tensor]
    padded_rows: list[int]
    dim: int


def _as_items(embeddings: Embeddings, side: str, colpali_batch_size: int) -> _Items:
    """Validate one side's embeddings and split them into real token rows per item.

    `padded_rows` is the width colpali-engine maxes over: the tensor's token axis for a padded
    tensor, and for a list the longest item in the item's group of `colpali_batch_size`.
    """
    if embeddings is None:
        raise ValueError(f"no {side} embeddings to score (got None)")
    if isinstance(embeddings, (torch.Tensor, np.ndarray)):
        tensor = torch.as_tensor(embeddings)
        if tensor.dim() != 3:
            raise ValueError(
                f"{side} embeddings must be (items, tokens, dim) or a list of (tokens, dim), "
                f"got shape {tuple(tensor.shape)}"
            )
        items = list(tensor.unbind(0))
        padded_rows = [tensor.shape[1]] * len(items)
    else:
        items = [torch.as_tensor(item) for item in embeddings]
        check_items(items, side)
        padded_rows = _group_widths([item.shape[0] for item in items], colpali_batch_size)
    if not items:
        raise ValueError(f"no {side} embeddings to score (empty input)")
    if not items[0].is_floating_point():
        raise ValueError(f"{side} embeddings have dtype {items[0].dtype}; embeddings must be floating point")
    return _Items(_real_rows(items, side), padded_rows, items[0].shape[-1])


def _group_widths(rows: list[int], group_size: int) -> list[int]:
    """For each item, the longest item of its group of `group_size` consecutive items."""
    widths: list[int] = []
    for start in range(0, len(rows), group_size):
        group = rows[start : start + group_size]
        widths.extend([max(group)] * len(group))
    return widths


def check_items(items: Sequence[torch.Tensor], side: str) -> None:
    """Every item a (tokens, dim) tensor of one floating dtype and one dim (`colquant.inference.compress`
    checks its inputs by the same rules)."""
    dims: dict[int, int] = {}
    for index, item in enumerate(items):
        if item.dim() != 2:
            raise ValueError(f"{side} item {index} has shape {tuple(item.shape)}; expected (tokens, dim)")
        if not item.is_floating_point():
            raise ValueError(f"{side} item {index} has dtype {item.dtype}; embeddings must be floating point")
        dims.setdefault(item.shape[1], index)
    if len(dims) > 1:
        shown = ", ".join(f"dim {dim} (first at item {index})" for dim, index in dims.items())
        raise ValueError(f"{side} embeddings mix dimensions: {shown}; embed all items with one model")


def require_finite(items: Sequence[torch.Tensor], side: str) -> None:
    """Refuse items holding NaN or Inf, naming the first: a NaN token would otherwise score as
    padding (it is not > 0) or turn a whole score into NaN, and the ranking would hide which item
    was bad. `colquant.inference.compress` refuses them by the same rule."""
    bad = next((index for index, item in enumerate(items) if not bool(torch.isfinite(item).all())), None)
    if bad is not None:
        raise ValueError(
            f"{side} item {bad} contains NaN or Inf; the model or its quantization produced non-finite "
            "embeddings: check the checkpoint (colquant.load verifies weights) and the dtype"
        )


def _real_rows(items: list[torch.Tensor], side: str) -> list[torch.Tensor]:
    """Each item's non-zero token rows (all-zero rows are the model's and the batch's padding),
    after checking every value is finite (NaN and Inf survive min/max, so one reduction finds them).

    On a GPU the items are checked in one concatenated pass (per-item kernels and syncs would cost
    more than the scoring); on CPU item by item, which keeps temporaries small (a fresh
    corpus-sized buffer costs more in page faults than the checks themselves).
    """
    empty = next((index for index, item in enumerate(items) if item.numel() == 0), None)
    if empty is not None:
        raise ValueError(f"{side} item {empty} has no non-zero token vectors: nothing to score it with")
    if items[0].device.type == "cpu":
        extremes = torch.stack([value for item in items for value in torch.aminmax(item)])
        masks = [item.ne(0).any(dim=-1) for item in items]
        counts = torch.stack([mask.sum() for mask in masks]).tolist()
        real = [item if count == len(item) else item[mask] for item, mask, count in zip(items, masks, counts)]
    else:
        lengths = [len(item) for item in items]
        rows = torch.cat(items)
        extremes = torch.stack(torch.aminmax(rows))
        mask = rows.ne(0).any(dim=-1)
        item_of_row = torch.repeat_interleave(torch.arange(len(items), device=rows.device), torch.tensor(lengths, device=rows.device))
        counts = torch.zeros(len(items), dtype=torch.long, device=rows.device).index_add_(0, item_of_row, mask.long())
        counts = counts.tolist()
        real = list((rows if counts == lengths else rows[mask]).split(counts))
    if not bool(torch.isfinite(extremes).all()):
        require_finite(items, side)
    if 0 in counts:
        raise ValueError(f"{side} item {counts.index(0)} has no non-zero token vectors: nothing to score it with")
    return real


def score(
    query_embeddings: Embeddings,
    page_embeddings: Embeddings,
    *,
    mode: ScoringMode = "exact",
    device: torch.device | str | None = None,
    colpali_batch_size: int = COLPALI_BATCH_SIZE,
    block_elements: int | None = None,
    show_progress_bar: bool | None = None,
) -> torch.Tensor:
    """Late-interaction scores, shape (queries, pages), float32 on `device` (default: the queries').

    `mode="exact"` is exact MaxSim over real tokens; `mode="colpali"` reproduces colpali-engine's
    `score_multi_vector` (see the module docstring): a page narrower than the width it is padded to
    (a padded tensor's token axis, or for lists the longest page among its `colpali_batch_size`
    neighbours) floors every query token's best match at 0.

    Inputs are a padded (items, tokens, dim) tensor or array, or a list of (tokens, dim) items;
    the scores carry no gradient.
    Empty inputs, items without any non-zero token, NaN/Inf and mixed dimensions raise ValueError.
    The work is split into blocks of about `block_elements` similarity entries (default: 2^24 on
    CPU, 2^28 on GPUs, the fastest measured for 1,000 x 500 items);
    `show_progress_bar=None` shows a tqdm bar when there are many blocks.
    """
    if mode not in SCORING_MODES:
        raise ValueError(f"mode={mode!r}: use 'exact' (true MaxSim) or 'colpali' (colpali-engine/mteb's scoring)")
    require_count("colpali_batch_size", colpali_batch_size, 1)
    if block_elements is not None:
        require_count("block_elements", block_elements, 1)
    require_flag("show_progress_bar", show_progress_bar, none_means="a bar when there are many blocks")
    queries = _as_items(query_embeddings, "query", colpali_batch_size)
    pages = _as_items(page_embeddings, "page", colpali_batch_size)
    if queries.dim != pages.dim:
        raise ValueError(f"embedding dims differ: queries have dim {queries.dim}, pages have dim {pages.dim}")
    if device is None:
        device = query_embeddings.device if isinstance(query_embeddings, torch.Tensor) else queries.tokens[0].device
    device = usable_device(device)
    if block_elements is None:
        block_elements = BLOCK_ELEMENTS["cpu" if device.type == "cpu" else "cuda"]
    floor_at_zero = torch.tensor(
        [mode == "colpali" and len(tokens) < rows for tokens, rows in zip(pages.tokens, pages.padded_rows)],
        device=device,
    )
    with torch.no_grad():  # scores for ranking; also lets the blocks write into one reused buffer
        return _blockwise_maxsim(queries.tokens, pages.tokens, floor_at_zero, device, block_elements, show_progress_bar)


def _blockwise_maxsim(
    queries: list[torch.Tensor],
    pages: list[torch.Tensor],
    floor_at_zero: torch.Tensor,
    device: torch.device,
    block_elements: int,
    show_progress_bar: bool | None,
) -> torch.Tensor:
    """Scores over page blocks (sorted by length) x query blocks, scattered back to input order."""
    query_matrix = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True).to(device, torch.float32)
    n_queries, query_width, dim = query_matrix.shape
    query_rows = query_matrix.reshape(n_queries * query_width, dim)
    # All queries against each page block when the budget allows; else fewer queries per block.
    page_block_tokens = max(max(len(page) for page in pages), block_elements // (n_queries * query_width))
    page_blocks = _page_blocks([len(page) for page in pages], page_block_tokens)
    query_block = max(1, block_elements // (query_width * page_block_tokens))
    query_spans = [(start, min(start + query_block, n_queries)) for start in range(0, n_queries, query_block)]
    show = len(page_blocks) * len(query_spans) >= PROGRESS_MIN_BLOCKS if show_progress_bar is None else show_progress_bar
    scores = torch.empty(n_queries, len(pages), device=device, dtype=torch.float32)
    # one similarity buffer for all blocks: a fresh 64 MB per block costs page faults on CPU
    buffer = torch.empty(min(query_block, n_queries) * query_width * page_block_tokens, device=device)
    for indices in tqdm(page_blocks, desc="MaxSim over page blocks", disable=not show):
        block = _PageBlock.build([pages[i] for i in indices], device)
        columns = torch.tensor(indices, device=device)
        floors = floor_at_zero[columns]
        for start, stop in query_spans:
            rows = query_rows[start * query_width : stop * query_width]
            best = block.maxsim(rows, floors, buffer)
            scores[start:stop, columns] = best.view(stop - start, query_width, -1).sum(1)
    return scores


def _page_blocks(lengths: list[int], max_block_tokens: int) -> list[list[int]]:
    """Page indices sorted by length, cut into blocks whose padded token count fits the budget."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    blocks: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # sorted ascending, so this page is the block's widest: the padded size is width x count
        if current and lengths[index] * (len(current) + 1) > max_block_tokens:
            blocks.append(current)
            current = []
        current.append(index)
    blocks.append(current)
    return blocks


@dataclass
class _PageBlock:
    """Pages zero-padded to a common width, flattened for one matrix product, with the flat
    indices of their padding rows (few: blocks hold pages of similar length)."""

    tokens: torch.Tensor  # (pages * width, dim)
    padding_columns: torch.Tensor  # flat indices into pages * width
    n_pages: int

    @classmethod
    def build(cls, pages: list[torch.Tensor], device: torch.device) -> "_PageBlock":
        padded = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True).to(device, torch.float32)
        lengths = torch.tensor([len(page) for page in pages], device=device)
        padding = torch.arange(padded.shape[1], device=device)[None, :] >= lengths[:, None]
        return cls(padded.flatten(0, 1), padding.flatten().nonzero().flatten(), len(pages))

    def maxsim(self, query_rows: torch.Tensor, floor_at_zero: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """(query tokens, pages): each query token's best match on each page, padding excluded,
        then floored at 0 on the pages the colpali reference pads. `buffer` holds the similarity."""
        sim = buffer[: query_rows.shape[0] * self.tokens.shape[0]].view(query_rows.shape[0], -1)
        torch.mm(query_rows, self.tokens.T, out=sim)
        if len(self.padding_columns):
            sim.index_fill_(1, self.padding_columns, float("-inf"))
        best = sim.view(query_rows.shape[0], self.n_pages, -1).amax(dim=-1)
        if bool(floor_at_zero.any()):
            best = torch.where(floor_at_zero, best.clamp_min(0.0), best)
        return best
