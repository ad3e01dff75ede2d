"""mteb's rows as ColQuant reads them: pages as stored, and the content digest the embedding cache keys by."""

from __future__ import annotations

import io

import numpy as np
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from colquant.evaluate.mteb_rows import encoded_pages, items_digest, stored_image_feature


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pages(ids: list[str], seeds: list[int]) -> Dataset:
    return Dataset.from_dict({"id": ids, "image": [{"bytes": png(seed), "path": None} for seed in seeds]},
                             features=Features({"id": Value("string"), "image": ImageFeature()}))


def test_stored_pages_decode_to_what_the_loader_gives():
    dataset = pages(["a", "b"], [1, 2])
    feature = stored_image_feature(dataset)
    for stored, decoded, seed in zip(encoded_pages(dataset), dataset["image"], (1, 2)):
        assert stored["bytes"] == png(seed)
        assert np.array_equal(np.asarray(feature.decode_example(stored)), np.asarray(decoded))


def test_the_digest_follows_the_content_in_order_not_the_ids(tmp_path):
    digest = items_digest(pages(["a", "b"], [1, 2]), "image")
    assert items_digest(pages(["x", "y"], [1, 2]), "image") == digest  # renamed, same pages
    assert items_digest(pages(["a", "b"], [1, 3]), "image") != digest  # page b replaced under its id
    assert items_digest(pages(["b", "a"], [2, 1]), "image") != digest  # another order, other batches
    files = [tmp_path / "1.png", tmp_path / "2.png"]
    for path, seed in zip(files, (1, 2)):
        path.write_bytes(png(seed))
    by_path = Dataset.from_dict({"image": [str(path) for path in files]}).cast_column("image", ImageFeature())
    assert items_digest(by_path, "image") == digest  # a page stored as a file is hashed by its bytes
    texts = Dataset.from_dict({"text": ["what", "why"]})
    assert items_digest(texts, "text") != items_digest(Dataset.from_dict({"text": ["what", "how"]}), "text")
