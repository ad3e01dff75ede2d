"""Compressed page indexes: token pooling, int8 and binary multi-vector embeddings, and exact MaxSim over them.

A ColQwen3 page is up to 1,280 vectors of 320 values; at a million pages the index, not the model,
is what costs memory and scoring time. This module makes the page side of the index smaller in the
ways the multi-vector literature uses, and scores queries against it with the same rules as
`colquant.score` (exact MaxSim over real tokens, all-zero rows are padding):

- token pooling (`poolN`): a page's token vectors are grouped by hierarchical (Ward) clustering into
  about tokens / N clusters, and each cluster is replaced by its re-normalised mean. This is
  colpali-engine's `HierarchicalTokenPooler` (illuin-tech/colpali, `colpali_engine/compression/
  token_pooling`) after Answer.AI's "A little pooling goes a long way for multi-vector
  representations" (Clavié, 2024), which keeps 97.8% of ColPali's NDCG at factor 3. As in PyLate's
  `pool_embeddings_hierarchical`, the first `protected_tokens` vectors can be kept unpooled.
  Only pages are pooled; queries are left whole, as in both.
- scalar int8 (`int8`): each vector is stored as int8 codes with its own float32 scale
  (max |x| / 127), dequantised to codes * scale for scoring.
- binary (`binary`): each vector keeps only its sign bits, packed eight to a byte (MSB first, as
  `numpy.packbits`); a stored bit b stands for the value 2b - 1. Float queries are scored against
  those ±1 vectors (asymmetric dot products, as Vespa's binarised ColPali); binary queries by
  Hamming distance, since <q, d> = dim - 2 * hamming(q, d) for ±1 vectors.
- combinations (`poolN+int8`, `poolN+binary`): pooled first, then quantised.

Each format is a dataclass of packed tensors plus per-page offsets into them, with `nbytes` read
from those tensors. `score_compressed` is MaxSim over any of them, on CPU or GPU, in blocks sized so
the (queries x pages x tokens x tokens) similarity never exists whole. `CompressedIndexEncoder`
lets mteb evaluate a (variant, setting) pair under a model name of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from colquant.basics.arguments import require_count, require_flag, usable_device
from colquant.retriever.scoring import Embeddings, check_items, pad_embeddings, require_finite

NDCG_COLUMN = "ndcg_at_5"  # as colquant.evaluate.evaluation, which needs mteb
COMPRESSION_TABLE = "compression_table.csv"
COMPRESSION_FORMS = "none, int8, binary, poolN, poolN+int8 or poolN+binary (N an integer from 2 to 9)"
# group 1: the pool factor (or None), group 2: the number format after pooling (or None)
COMPRESSION_PATTERN = re.compile(r"^(?:none|int8|binary|pool([2-9])(?:\+(int8|binary))?)$")

Quantization = Literal["float", "int8", "binary"]
# Elements of the (queries x query tokens x pages x page tokens) similarity per step: about 400 MB
# in float32, the budget mteb's max_sim and ColQuantEncoder.similarity use.
SIMILARITY_ELEMENTS = 100_000_000
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class CompressionSetting:
    """One way of storing the page side of the index: an optional pool factor, then a number format."""

    pool_factor: int | None
    quantization: Quantization

    def __post_init__(self) -> None:
        """Refuse what `compress_pages` cannot store: an unknown number format would otherwise be
        stored as float under its own name, and its results filed as that format's."""
        if self.quantization not in get_args(Quantization):
            raise ValueError(f"quantization {self.quantization!r} is not a number format of the index; use one of "
                             f"{', '.join(map(repr, get_args(Quantization)))}")
        factor = self.pool_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int)
                                   or not COMPRESSION_PATTERN.match(f"pool{factor}")):
            raise ValueError(f"pool_factor {factor!r} is not a pool factor: use an integer from 2 to 9, "
                             "or None for no pooling")

    @property
    def name(self) -> str:
        """The setting as written in a profile, e.g. `pool3+binary`; `parse_setting(name)` gives it back."""
        if self.pool_factor is None:
            return "none" if self.quantization == "float" else self.quantization
        suffix = "" if self.quantization == "float" else f"+{self.quantization}"
        return f"pool{self.pool_factor}{suffix}"

    @property
    def slug(self) -> str:
        """The name with '+' spelled '-', for model names and file names."""
        return self.name.replace("+", "-")


def parse_setting(text: str) -> CompressionSetting:
    """A profile's compression setting (e.g. `pool3+binary`) as a `CompressionSetting`."""
    match = COMPRESSION_PATTERN.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"compression setting {text!r} is not one of the allowed forms: {COMPRESSION_FORMS}; "
                         "e.g. pool3+binary")
    if match.group(1) is None:
        return CompressionSetting(None, "float" if text == "none" else text)  # type: ignore[arg-type]
    return CompressionSetting(int(match.group(1)), match.group(2) or "float")  # type: ignore[arg-type]


def profile_settings(profile: dict[str, Any]) -> list[CompressionSetting]:
    """The (validated) profile's `compression.settings`, parsed; the schema in `colquant.research.params`
    holds their default (the grid of issue 15) and refuses malformed or repeated ones."""
    return [parse_setting(name) for name in profile["compression"]["settings"]]


# --------------------------------------------------------------------------------------------
# Storage formats


@dataclass(frozen=True)
class _RaggedPages:
    """Page p's vectors are rows offsets[p]:offsets[p + 1] of the stored tensors."""

    offsets: torch.Tensor  # (pages + 1,) int64
    dim: int

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """Vectors stored per page."""
        return self.offsets[1:] - self.offsets[:-1]

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor, offsets included: what the index occupies."""
        return sum(t.numel() * t.element_size() for t in (*self._tensors(), self.offsets))

    @property
    def bytes_per_page(self) -> float:
        return self.nbytes / len(self)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The stored rows at indices `rows` as (len(rows), dim) vectors of `dtype`, as scored."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> _RaggedPages:
        """The same index with every tensor on `device`."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return type(self)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


@dataclass(frozen=True)
class FloatPages(_RaggedPages):
    """Vectors as the model gave them (or pooled), in their own float dtype."""

    vectors: torch.Tensor  # (rows, dim)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.vectors,)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.vectors[rows].to(dtype)


@dataclass(frozen=True)
class Int8Pages(_RaggedPages):
    """int8 codes with one float32 scale per vector: vector = codes * scale."""

    codes: torch.Tensor  # (rows, dim) int8
    scales: torch.Tensor  # (rows,) float32

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scales)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.codes[rows].to(torch.float32) * self.scales[rows, None]).to(dtype)


@dataclass(frozen=True)
class BinaryPages(_RaggedPages):
    """Sign bits packed MSB-first into ceil(dim / 8) bytes per vector; bit b stands for 2b - 1."""

    bits: torch.Tensor  # (rows, ceil(dim / 8)) uint8

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.bits,)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return unpack_signs(self.bits[rows], self.dim, dtype)


CompressedPages = FloatPages | Int8Pages | BinaryPages


# --------------------------------------------------------------------------------------------
# Compression


def real_tokens(embeddings: Embeddings) -> list[torch.Tensor]:
    """Each item's real token vectors: zero-padded rows dropped, by the rule `colquant.score` uses.

    Items holding NaN or Inf are refused as `colquant.score` refuses them: a NaN row would
    otherwise be dropped as padding (or its sign bits stored as -1) and the page scored as finite."""
    items = _checked_items(embeddings, "page")
    return [item[item.ne(0).any(-1)] for item in items]


def _checked_items(embeddings: Embeddings, side: str) -> list[torch.Tensor]:
    """`side`'s items as (tokens, dim) tensors, refused by `colquant.score`'s rules: none at all,
    a wrong shape, integer values, mixed dims, NaN or Inf."""
    padded = isinstance(embeddings, (torch.Tensor, np.ndarray))
    items = list(pad_embeddings(embeddings)) if padded else [torch.as_tensor(item) for item in embeddings]
    if len(items) == 0:
        raise ValueError(f"no {side} embeddings to {'compress' if side == 'page' else 'score'}")
    check_items(items, side)
    require_finite(items, side)
    return items


def pool_tokens(vectors: torch.Tensor, pool_factor: int, protected_tokens: int = 0) -> torch.Tensor:
    """One page's (tokens, dim) vectors pooled to max(1, tokens // pool_factor) cluster means.

    Ward clustering of the unit-normalised vectors (on unit vectors the Euclidean distance Ward
    needs is a monotone function of the cosine distance the pooling papers cluster by), cut into
    that many clusters, each replaced by its mean, re-normalised so MaxSim still compares unit
    vectors. The first `protected_tokens` vectors are kept as they are and put first.
    """
    if pool_factor < 2:
        raise ValueError(f"pool_factor must be at least 2, got {pool_factor}")
    protected, rest = vectors[:protected_tokens], vectors[protected_tokens:]
    if rest.shape[0] < 2:
        return vectors
    unit = torch.nn.functional.normalize(rest.to(torch.float32), dim=-1)
    n_clusters = max(1, rest.shape[0] // pool_factor)
    labels = fcluster(linkage(unit.numpy().astype(np.float64), method="ward"), t=n_clusters, criterion="maxclust")
    labels = torch.as_tensor(labels - 1, dtype=torch.int64)
    sums = torch.zeros(int(labels.max()) + 1, unit.shape[1]).index_add_(0, labels, unit)
    pooled = torch.nn.functional.normalize(sums, dim=-1).to(vectors.dtype)
    return torch.cat([protected, pooled])


def quantize_int8(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scales float32) with scale = max |x| / 127 per vector (1 for a zero vector)."""
    values = vectors.to(torch.float32)
    scales = values.abs().amax(dim=-1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(values / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def pack_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Sign bits (1 where x > 0) packed MSB-first, ceil(dim / 8) bytes per vector (tail bits 0)."""
    positive = (vectors > 0).to(torch.uint8)
    tail = (-positive.shape[-1]) % 8
    positive = torch.nn.functional.pad(positive, (0, tail))
    groups = positive.reshape(*positive.shape[:-1], positive.shape[-1] // 8, 8)
    return (groups * _BIT_WEIGHTS.to(vectors.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(bits: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed sign bits back to ±1 vectors of `dim` values."""
    shifts = torch.arange(7, -1, -1, device=bits.device, dtype=torch.uint8)
    unpacked = (bits[..., None] >> shifts) & 1
    signs = unpacked.reshape(*bits.shape[:-1], bits.shape[-1] * 8)[..., :dim].to(dtype)
    return signs * 2 - 1


def compress_pages(page_embeddings: Embeddings, setting: CompressionSetting | str, *,
                   protected_tokens: int = 0) -> CompressedPages:
    """Page embeddings (padded tensor or list of (tokens, dim)) stored as `setting` says."""
    setting = parse_setting(setting) if isinstance(setting, str) else setting
    if not isinstance(setting, CompressionSetting):
        raise TypeError(f"setting {setting!r} is neither a CompressionSetting nor its name; pass e.g. 'pool3+binary'")
    require_count("protected_tokens", protected_tokens, 0)
    pages = real_tokens(page_embeddings)
    if setting.pool_factor is not None:
        pages = [pool_tokens(page.cpu(), setting.pool_factor, protected_tokens) for page in pages]
    lengths = torch.tensor([page.shape[0] for page in pages], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    vectors = torch.cat(pages)
    dim = vectors.shape[-1]
    if setting.quantization == "int8":
        codes, scales = quantize_int8(vectors)
        return Int8Pages(offsets=offsets.to(vectors.device), dim=dim, codes=codes, scales=scales)
    if setting.quantization == "binary":
        return BinaryPages(offsets=offsets.to(vectors.device), dim=dim, bits=pack_signs(vectors))
    return FloatPages(offsets=offsets.to(vectors.device), dim=dim, vectors=vectors)


# --------------------------------------------------------------------------------------------
# Scoring


def score_compressed(
    query_embeddings: Embeddings,
    pages: CompressedPages,
    *,
    binary_queries: bool = False,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    similarity_elements: int = SIMILARITY_ELEMENTS,
) -> torch.Tensor:
    """MaxSim scores (queries, pages) over a compressed index: sum_i max_j <q_i, d_j>.

    Same rules as `colquant.score`: all-zero query rows are padding and add nothing, a page's max
    runs over its stored vectors only, and a page with none scores 0. Pages are dequantised block by
    block on `device` (default: the queries' device) and scored with one matrix product per block.
    `binary_queries=True` binarises the queries too and scores binary pages by Hamming distance
    (dim - 2 * hamming), the binary x binary case. `compute_dtype` is float32 by default (exact up
    to float32 rounding); bfloat16 is for speed on GPUs, ±1 and int8 codes being exact in it.
    """
    require_flag("binary_queries", binary_queries)
    require_count("similarity_elements", similarity_elements, 1)
    queries = pad_embeddings(_checked_items(query_embeddings, "query"))
    if queries.shape[-1] != pages.dim:
        raise ValueError(f"embedding dims differ: queries {queries.shape[-1]}, pages {pages.dim}")
    if binary_queries and not isinstance(pages, BinaryPages):
        raise ValueError(f"binary_queries=True scores binary pages by Hamming distance, got {type(pages).__name__}; "
                         "compress the pages with a binary setting or leave binary_queries False")
    device = usable_device(device) if device is not None else queries.device
    queries = queries.to(device)
    pages = pages.to(device)
    query_rows = queries.abs().sum(-1) > 0  # (Q, Tq)
    lengths = pages.lengths
    if binary_queries:  # the Hamming path holds (query vector, page vector, byte) integers
        similarity_elements = max(1, similarity_elements // (8 * pages.bits.shape[-1]))
    n_query_vectors = queries.shape[0] * queries.shape[1]
    if int(pages.offsets[-1]) == 0:
        return torch.zeros(queries.shape[0], len(pages), device=device)
    # Pages of similar length share a block, so little of the padded similarity is padding.
    order = torch.argsort(lengths, stable=True)
    blocks = [order[start:stop] for start, stop in _page_blocks(lengths[order], n_query_vectors, similarity_elements)]
    if binary_queries:
        packed_queries = pack_signs(queries).reshape(n_query_vectors, -1)
        columns = [_hamming_block(packed_queries, pages, block) for block in blocks]
    else:
        flat_queries = queries.reshape(n_query_vectors, pages.dim).to(compute_dtype)
        columns = [_float_block(flat_queries, pages, block) for block in blocks]
    best = torch.empty(n_query_vectors, len(pages), device=device)
    best[:, order] = torch.cat(columns, dim=1)
    best = best.reshape(queries.shape[0], queries.shape[1], len(pages))  # (Q, Tq, P)
    best = torch.where(query_rows[:, :, None] & (lengths > 0)[None, None, :], best, 0.0)
    return best.sum(dim=1)


def _page_blocks(lengths: torch.Tensor, query_vectors: int, similarity_elements: int) -> list[tuple[int, int]]:
    """Consecutive page ranges whose padded similarity with all query vectors fits the element budget."""
    blocks, start, longest = [], 0, 0
    for index, length in enumerate(lengths.tolist()):
        longest_with = max(longest, length, 1)
        if index > start and query_vectors * longest_with * (index + 1 - start) > similarity_elements:
            blocks.append((start, index))
            start, longest_with = index, max(length, 1)
        longest = longest_with
    blocks.append((start, len(lengths)))
    return blocks


def _padded_rows(pages: CompressedPages, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (pages, longest) into the stored tensors for the pages of `block`, clamped to
    stored rows (padding positions repeat a real row), and the mask of real positions."""
    offsets, lengths = pages.offsets[block], pages.lengths[block]
    positions = torch.arange(max(1, int(lengths.max())), device=offsets.device)
    real = positions[None, :] < lengths[:, None]
    rows = (offsets[:, None] + positions[None, :]).clamp(max=int(pages.offsets[-1]) - 1)
    return rows, real


def _float_block(flat_queries: torch.Tensor, pages: CompressedPages, block: torch.Tensor) -> torch.Tensor:
    """Best match per (query vector, page) for the pages of `block`: (Q * Tq, pages).

    One matrix product against the block's padded vectors, with -inf added to the padding columns
    in the same call (addmm's bias), then a max over each page's columns.
    """
    rows, real = _padded_rows(pages, block)
    vectors = pages.dequantize(rows.reshape(-1), flat_queries.dtype)  # (pages * longest, dim)
    padding = torch.zeros(real.numel(), dtype=flat_queries.dtype, device=real.device)
    padding.masked_fill_(~real.reshape(-1), float("-inf"))
    sim = torch.addmm(padding, flat_queries, vectors.T)  # (Q * Tq, pages * longest)
    return sim.view(flat_queries.shape[0], *rows.shape).amax(dim=-1).to(torch.float32)


_POPCOUNT = torch.tensor([bin(value).count("1") for value in range(256)], dtype=torch.int16)


def _hamming_block(packed_queries: torch.Tensor, pages: BinaryPages, block: torch.Tensor) -> torch.Tensor:
    """Best ±1 dot product (dim - 2 * hamming) per (query vector, page) for the pages of `block`."""
    rows, real = _padded_rows(pages, block)
    page_bits = pages.bits[rows]  # (pages, longest, bytes)
    popcount = _POPCOUNT.to(packed_queries.device)
    distance = popcount[(packed_queries[:, None, None, :] ^ page_bits[None]).long()].sum(-1)  # (Q * Tq, pages, longest)
    similarity = (pages.dim - 2 * distance).to(torch.float32)
    similarity.masked_fill_(~real[None], float("-inf"))
    return similarity.amax(dim=-1)


# --------------------------------------------------------------------------------------------
# The (variant x setting) grid: table, Pareto front, recommendation, report section


def compression_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, setting): mean NDCG@5 over tasks, mean bytes per page, the index's size
    relative to the uncompressed one of the same variant, and NDCG@5 relative to that one (%)."""
    grid = (results.groupby(["variant", "setting"], sort=False)
            .agg(ndcg_at_5=(NDCG_COLUMN, "mean"), bytes_per_page=("bytes_per_page", "mean"), tasks=("task", "size"))
            .reset_index())
    if "none" not in set(grid["setting"]):
        raise ValueError("the grid has no 'none' setting to compare with; add none to compression.settings")
    reference = grid[grid["setting"] == "none"].set_index("variant")
    grid["size_vs_none"] = grid["bytes_per_page"] / grid["variant"].map(reference["bytes_per_page"])
    grid["ndcg_vs_none_%"] = (grid["ndcg_at_5"] / grid["variant"].map(reference["ndcg_at_5"]) - 1) * 100
    return grid


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of `compression_table` no other row beats on both NDCG@5 and bytes per page."""
    dominated = [
        ((table["ndcg_at_5"] >= row.ndcg_at_5) & (table["bytes_per_page"] <= row.bytes_per_page)
         & ((table["ndcg_at_5"] > row.ndcg_at_5) | (table["bytes_per_page"] < row.bytes_per_page))).any()
        for row in table.itertuples()
    ]
    return table[[not d for d in dominated]].sort_values("bytes_per_page")


def recommend(table: pd.DataFrame, tolerance_pct: float = 2.0) -> str:
    """A sentence naming the smallest index whose NDCG@5 is within `tolerance_pct` % of the best."""
    best = table.loc[table["ndcg_at_5"].idxmax()]
    within = table[table["ndcg_at_5"] >= best["ndcg_at_5"] * (1 - tolerance_pct / 100)]
    pick = within.loc[within["bytes_per_page"].idxmin()]
    return (f"Use {pick['variant']} with the {pick['setting']} index: {pick['bytes_per_page'] / 1024:.3g} KiB per page "
            f"({pick['size_vs_none']:.1%} of its uncompressed index) at NDCG@5 {pick['ndcg_at_5']:.4f}, within "
            f"{tolerance_pct:g}% of the best combination ({best['variant']} / {best['setting']}, "
            f"{best['ndcg_at_5']:.4f}) and the smallest index that is.")


def compression_report(results_dir: Path) -> str:
    """The report's section: notebook 07's table (results/compression_table.csv) and the recommendation."""
    path = results_dir / COMPRESSION_TABLE
    title = "## Index compression: NDCG@5 against bytes per page (mteb)\n\n"
    if not path.exists():
        return title + ("_No compression grid yet: run `notebooks/07_index_compression.ipynb` "
                        "(or `python -m colquant run <profile>`)._")
    table = pd.read_csv(path)
    shown = table.assign(kib_per_page=table["bytes_per_page"] / 1024).drop(columns=["bytes_per_page"])
    return title + shown.to_markdown(index=False, floatfmt=".4g") + "\n\n" + recommend(table)

