"""Writing results so that a kill, a full disk or a read-only directory never leaves half of one.

Every file the package writes goes through `atomic_write` (a temporary sibling, fsync, rename) and
every directory it builds (a checkpoint, the tiny model, the corpus) through `atomic_directory` (a
hidden staging sibling swapped in when complete). This module imports nothing from colquant, so
the lowest modules (processing, tiny, corpus, hub) can use it; `colquant.research.workspace` re-exports it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OUTPUT_ROOT_ENV = "COLQUANT_OUTPUT_ROOT"
# `tempfile.mkdtemp(prefix=".<name>.")` folders: what `atomic_directory` stages in
STAGING_NAME = re.compile(r"\..+\.[a-z0-9_]{8}")


FINGERPRINT_LENGTH = 16

# sha256 of files already read, by file identity and change stamps (see `file_sha256`)
_FILE_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}


class OutputError(RuntimeError):
    """An output cannot be written (read-only directory, full disk) or read back (corrupt file)."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` into one OutputError that names the path and the fix."""
    try:
        yield
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_fix_for(error)}") from error


def _fix_for(error: OSError) -> str:
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        return ("the disk is full (no space left on device); free space there or set "
                f"{OUTPUT_ROOT_ENV} to a directory on a disk with room")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"the directory is not writable ({error.strerror}); fix its permissions or set "
                f"{OUTPUT_ROOT_ENV} to a writable directory")
    return f"{error.strerror or error} (errno {error.errno})"


def plain_mode(*, directory: bool = False) -> int:
    """The mode a plain `open()` (0o666) or `mkdir()` (0o777) gives under the process umask.

    `tempfile` makes its files 0o600 and folders 0o700 whatever the umask, for privacy; a result
    or checkpoint renamed into place from one would lock other users of a shared machine out of it
    (PermissionError loading a variant), so the staging file or folder gets this mode instead.
    """
    return (0o777 if directory else 0o666) & ~_process_umask()


def _process_umask() -> int:
    """The umask, read from /proc on Linux; elsewhere set and put back at once (the only portable
    way to read it: os has no getter), to 0o777 in between, so a file another thread creates in
    that instant is too private rather than world-writable."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    umask = os.umask(0o777)
    os.umask(umask)
    return umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary path)` in `path`'s directory (created if needed), fsync, then rename
    onto `path`.

    A kill or a full disk at any moment leaves either the old file or the new one, never half of
    one; the temporary file is removed when writing fails. The file gets the mode a plain `open`
    of a new file would give (`plain_mode`), not `tempfile`'s 0o600.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(handle)
        staging = Path(name)
        try:
            write(staging)
            with open(staging, "rb+") as file:
                os.fsync(file.fileno())
            os.chmod(staging, plain_mode())
            os.replace(staging, path)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically, so a crash never leaves half a result."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, frame: Any) -> Path:
    """Write a DataFrame as CSV atomically."""
    return atomic_write(path, lambda staging: frame.to_csv(staging, index=False))


def read_json(path: Path, fix: str) -> Any:
    """Read a JSON result, naming the file and `fix` when it is empty or corrupt (e.g. a killed write)."""
    path = Path(path)
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        state = "is empty" if not text.strip() else f"is not valid JSON ({error})"
        raise OutputError(f"{path} {state}; {fix}") from error


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `target` (`.<name>.<8 characters>`); when the block
    finishes, it replaces `target`; when it fails, it is deleted and `target` is untouched.

    The old `target` is moved aside first and deleted last, so at every moment `target` is the old
    complete directory or the new one (or absent), never a half-written one. Everything in it gets
    the mode a plain `open`/`mkdir` would give (`plain_mode`), not `tempfile`'s 0o600/0o700, which
    the folder and the libraries writing into it (safetensors' shards) would otherwise leave.
    """
    target = Path(target)
    with writing(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with writing(staging):
            yield staging
            _give_plain_modes(staging)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _give_plain_modes(root: Path) -> None:
    """`plain_mode` for `root` and every folder and regular file under it (links left alone)."""
    file_mode, folder_mode = plain_mode(), plain_mode(directory=True)
    os.chmod(root, folder_mode)
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode if name in folders else file_mode)


def _swap_in(staging: Path, target: Path) -> None:
    with writing(target):
        if not target.exists():
            os.replace(staging, target)
            return
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.retired.", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def remove_stale_staging(directory: Path) -> list[Path]:
    """Delete staging folders that interrupted `atomic_directory` blocks left in `directory`;
    call only when no build is live there (e.g. under the output lock)."""
    candidates = directory.iterdir() if directory.exists() else []
    stale = sorted(path for path in candidates if path.is_dir() and STAGING_NAME.fullmatch(path.name))
    for path in stale:
        log.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path)
    return stale


def discard(path: Path) -> None:
    """Delete a file or folder as one step: it is first renamed into a staging folder beside it,
    so a kill while deleting leaves no half of it under its own name, only staging that
    `remove_stale_staging` removes."""
    path = Path(path)
    with writing(path):
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def refuse_unrelated(target: Path, marker: str, what: str, builder: str) -> None:
    """Before `builder` replaces `target` whole (`atomic_directory`): it may replace its own earlier
    build (which holds `marker`), an empty folder or nothing, never a file or a folder of other
    things, which the swap would delete."""
    target = Path(target)
    if (target / marker).is_file():
        return
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"{target} exists and is not a {what} (no {marker}); pass a new or empty directory "
                         f"so {builder} does not overwrite unrelated files")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read once per process for each version of the file.

    Content, not modification time, is what identifies a file: a model or a page copied, touched or
    downloaded again is the same. The cache is keyed by the file's device, inode, size, and
    modification and status-change times: any write to the file changes its status-change time,
    which no user can set back, so a changed file is always read again.
    """
    with open(path, "rb") as file:
        stat = os.fstat(file.fileno())
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if key not in _FILE_DIGESTS:
            _FILE_DIGESTS[key] = hashlib.file_digest(file, "sha256").hexdigest()
    return _FILE_DIGESTS[key]


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dict keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_LENGTH]
