"""mteb's query and page rows as ColQuant reads them: pages still encoded, and a digest of a call's items.

mteb hands an encoder a `DataLoader` over a `datasets.Dataset` whose image column decodes every page
when the loader is iterated, in the thread that iterates it. ColQuant reads the same rows without
decoding them (`encoded_pages`; `mteb_page_batches` gives mteb's batches of them, each page an
`encode.StoredPage` its page workers decode exactly as `datasets` would) and identifies what a call
encodes by the content of its items, in order (`items_digest`), which is what the embedding cache
is keyed by.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader, SequentialSampler

from colquant.basics.files import file_sha256
from colquant.retriever.encode import StoredPage

ROWS_PER_READ = 64  # rows read from the Arrow table at a time (bounds the bytes held while hashing)
# items_digest of datasets already hashed in this process, by (datasets fingerprint, column)
_DIGESTS: dict[tuple[str, str], str] = {}


def stored_image_feature(dataset: Dataset, column: str = "image") -> ImageFeature | None:
    """The `datasets` Image feature `column` is stored as, or None when the column holds something
    else (images already decoded into another type, or no such column)."""
    feature = dataset.features.get(column) if isinstance(dataset, Dataset) else None
    return feature if isinstance(feature, ImageFeature) else None


def encoded_pages(dataset: Dataset, column: str = "image") -> Iterator[dict[str, Any]]:
    """The column's pages as stored, not decoded: `{"bytes": ..., "path": ...}` per row, in order
    (`stored_image_feature(dataset).decode_example(row)` is the page mteb's loader would give)."""
    if stored_image_feature(dataset, column) is None:
        raise ValueError(f"the dataset's {column!r} column is not a datasets Image feature "
                         f"({dataset.features.get(column)!r}): read it decoded instead")
    raw = dataset.select_columns([column]).cast_column(column, ImageFeature(decode=False))
    for rows in raw.iter(batch_size=ROWS_PER_READ):
        yield from rows[column]


def items_digest(dataset: Dataset, column: str) -> str:
    """sha256 over the content of every item of `column` (a text, or a page's stored bytes), in order.

    Why content and not ids: the same ids may name other pages after a dataset is rebuilt; the
    content in order is what the embeddings of a call are a function of. Pages are hashed as stored
    (their encoded bytes, or the file a path names), without decoding. A dataset already hashed in
    this process is not hashed again (keyed by `datasets`' fingerprint, which changes with the data).
    """
    memo = (getattr(dataset, "_fingerprint", None), column)
    if memo[0] is not None and memo in _DIGESTS:
        return _DIGESTS[memo]
    digest = hashlib.sha256()
    for item in _item_digests(dataset, column):
        digest.update(f"{item}\n".encode())
    if memo[0] is not None:
        _DIGESTS[memo] = digest.hexdigest()
    return digest.hexdigest()


def _item_digests(dataset: Dataset, column: str) -> Iterator[str]:
    if stored_image_feature(dataset, column) is not None:
        yield from (_stored_page_digest(row) for row in encoded_pages(dataset, column))
        return
    for rows in dataset.select_columns([column]).iter(batch_size=ROWS_PER_READ):
        yield from (_value_digest(value) for value in rows[column])


def _stored_page_digest(row: dict[str, Any]) -> str:
    if row.get("bytes") is not None:
        return hashlib.sha256(row["bytes"]).hexdigest()
    return file_sha256(row["path"])


def _value_digest(value: Any) -> str:
    """A text's, or a decoded image's (mode, size and pixels), sha256."""
    if isinstance(value, str):
        return hashlib.sha256(value.encode()).hexdigest()
    if isinstance(value, Image.Image):
        digest = hashlib.sha256(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
        return digest.hexdigest()
    raise TypeError(f"cannot identify an item of type {type(value).__name__}: the embedding cache keys "
                    "texts and images")


def mteb_page_batches(inputs: DataLoader) -> Iterable[dict[str, Any]]:
    """The batches mteb's dataloader gives (`{"image": [...], "id": [...]}`, `batch_size` rows in
    order), with each page left as stored (`encode.StoredPage`, decoded by a page worker) when the
    corpus is a `datasets` Image column read in order; otherwise the dataloader itself, which
    decodes."""
    dataset = inputs.dataset
    feature = stored_image_feature(dataset)
    in_order = isinstance(inputs.sampler, SequentialSampler) and inputs.batch_size and not inputs.drop_last
    if feature is None or not feature.decode or not in_order:
        return inputs
    return _stored_batches(dataset, feature, inputs.batch_size)


def _stored_batches(dataset: Dataset, feature: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    ids = dataset["id"] if "id" in dataset.column_names else None
    pages = encoded_pages(dataset)
    for start in range(0, len(dataset), batch_size):
        batch: dict[str, Any] = {"image": [StoredPage(row, feature) for row in itertools.islice(pages, batch_size)]}
        if ids is not None:
            batch["id"] = ids[start : start + batch_size]
        yield batch
