"""How encode-corpus reads a source: every frame of a multi-frame image, symbolic links, page
digests by content, and refused settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from colquant.inference.page_sources import SourceError, open_source


def image(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (32, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.mark.parametrize("suffix", [".tif", ".gif"])
def test_every_frame_of_a_multi_frame_image_is_a_page(tmp_path, suffix):
    frames = [Image.new("RGB", (32, 40), (200, 60 * n, 0)) for n in range(3)]
    frames[0].save(tmp_path / f"scan{suffix}", save_all=True, append_images=frames[1:])
    image(tmp_path / "cover.png")
    pages = open_source(tmp_path)
    assert pages.ids == ["cover.png", f"scan{suffix}#page=1", f"scan{suffix}#page=2", f"scan{suffix}#page=3"]
    assert [pages.open(n).convert("RGB").getpixel((5, 5)) for n in (1, 3)] == [(200, 0, 0), (200, 120, 0)]


def test_links_are_followed_wherever_they_point_and_broken_or_looping_ones_are_refused(tmp_path):
    source, outside = tmp_path / "source", tmp_path / "outside"
    image(source / "a.png")
    image(outside / "chapter" / "b.png")
    image(outside / "c.png")
    (source / "linked-folder").symlink_to(outside / "chapter")
    (source / "linked-file.png").symlink_to(outside / "c.png")
    (source / "inside.png").symlink_to(source / "a.png")  # the same page under a second path
    assert open_source(source).ids == ["a.png", "inside.png", "linked-file.png", "linked-folder/b.png"]
    (source / "gone.png").symlink_to(tmp_path / "deleted.png")
    with pytest.raises(SourceError, match=r"gone.png is a link to .*deleted.png, which does not exist"):
        open_source(source)
    (source / "gone.png").unlink()
    (outside / "chapter" / "up").symlink_to(source)
    with pytest.raises(SourceError, match=r"up links to .*source, a folder above it"):
        open_source(source)


def test_a_page_digest_is_its_content_not_its_file_date(tmp_path):
    page = image(tmp_path / "source" / "a.png")
    pages = open_source(tmp_path / "source")
    before = pages.digest(0)
    os.utime(page, ns=(1, 1))
    assert open_source(tmp_path / "source").digest(0) == before
    stamp = page.stat().st_mtime_ns
    image(page, colour=(99, 20, 30))  # same name, size and date, other pixels
    os.utime(page, ns=(stamp, stamp))
    assert open_source(tmp_path / "source").digest(0) != before


def test_a_dataset_row_digest_is_its_image_bytes(tmp_path):
    import datasets

    files = [str(image(tmp_path / f"{n}.png", colour=(n, n, n))) for n in range(2)]
    dataset = datasets.Dataset.from_dict({"page": files}).cast_column("page", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "dataset"))
    pages = open_source(tmp_path / "dataset")
    assert pages.digest(0) != pages.digest(1)
    assert pages.open(1).getpixel((0, 0)) == (1, 1, 1)


def test_files_that_are_not_pages_are_named_when_skipped(tmp_path, caplog):
    """Only their count was logged: a page saved as JPEG 2000 went missing from a corpus of thousands unnamed."""
    image(tmp_path / "a.png")
    image(tmp_path / "scans" / "b.jp2")
    (tmp_path / "notes.txt").write_text("not a page")
    with caplog.at_level("WARNING", logger="colquant.inference.page_sources"):
        assert open_source(tmp_path).ids == ["a.png"]
    assert "ignoring 2 files that are neither images (.bmp, " in caplog.text
    assert "nor PDFs: notes.txt, scans/b.jp2" in caplog.text


@pytest.mark.parametrize("ids", [["a", None], ["a", ""]])
def test_a_dataset_row_without_an_id_is_named_not_stored_as_a_string(tmp_path, ids):
    import datasets

    files = [str(image(tmp_path / f"{n}.png", colour=(n, n, n))) for n in range(2)]
    dataset = datasets.Dataset.from_dict({"page": files, "pid": ids}).cast_column("page", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "dataset"))
    with pytest.raises(SourceError, match=r"column 'pid' has no id in row 1 .*--id-column"):
        open_source(tmp_path / "dataset", id_column="pid")


@pytest.mark.parametrize("dpi", [0, -72])
def test_a_dpi_below_one_is_refused_not_replaced(tmp_path, dpi):
    image(tmp_path / "a.png")
    with pytest.raises(SourceError, match=rf"dpi must be a whole number >= 1 .*got {dpi}"):
        open_source(tmp_path, dpi=dpi)


def test_one_page_file_is_a_source_and_another_file_is_refused(tmp_path):
    frames = [Image.new("RGB", (32, 40), (0, 0, 50 * n)) for n in range(2)]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    assert open_source(tmp_path / "scan.tif").ids == ["scan.tif#page=1", "scan.tif#page=2"]
    assert open_source(image(tmp_path / "cover.png")).ids == ["cover.png"]
    (tmp_path / "notes.txt").write_text("no pages")
    with pytest.raises(SourceError, match="notes.txt is neither a page image .* nor a PDF"):
        open_source(tmp_path / "notes.txt")


def test_a_folder_that_cannot_be_listed_is_named_not_skipped(tmp_path, monkeypatch):
    import errno

    image(tmp_path / "a.png")
    image(tmp_path / "locked" / "b.png")
    real_iterdir = Path.iterdir

    def locked(folder):  # what an unreadable folder does, even for root
        if folder.name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_iterdir(folder)

    monkeypatch.setattr(Path, "iterdir", locked)
    with pytest.raises(SourceError, match=r"cannot list .*locked \(Permission denied\): fix its permissions"):
        open_source(tmp_path)
