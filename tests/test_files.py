"""colquant.basics.files: atomic writes leave files and folders as a plain open()/mkdir() would."""

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from colquant.basics import files
from colquant.basics.files import atomic_directory, atomic_write, write_json


@contextmanager
def umask(mask: int):
    """Run the block under `mask`, then restore the session's umask."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and of everything under it, by relative path."""
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


def expected_modes(root: Path, mask: int) -> dict[str, int]:
    """What a plain open() (files) and mkdir() (folders) under `mask` give each path of `root`."""
    return {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in modes(root)}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_get_the_umasks_mode_not_tempfiles(tmp_path, mask):
    """tempfile's 0o600/0o700 staging modes were kept (0o644 forced for files): another user of a
    shared machine could not enter a saved folder, and a private umask was overridden."""
    with umask(mask):
        write_json(tmp_path / "result.json", {"a": 1})
        atomic_write(tmp_path / "shard.safetensors", lambda staging: save_file({"a": torch.zeros(1)}, str(staging)))
        with atomic_directory(tmp_path / "variant") as staging:
            write_json(staging / "metadata.json", {})
            (staging / "nested").mkdir()
            save_file({"a": torch.zeros(1)}, str(staging / "nested" / "model.safetensors"))  # safetensors makes 0o600
    assert modes(tmp_path / "variant") == expected_modes(tmp_path / "variant", mask)
    for name in ("result.json", "shard.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_plain_mode_is_what_open_and_mkdir_give_under_the_umask(tmp_path, mask):
    with umask(mask):
        (tmp_path / "file").touch()
        (tmp_path / "folder").mkdir()
        assert files.plain_mode() == stat.S_IMODE((tmp_path / "file").stat().st_mode)
        assert files.plain_mode(directory=True) == stat.S_IMODE((tmp_path / "folder").stat().st_mode)
