"""Publishing files and directories so that a crash, a kill, a power loss or a full disk never
leaves one that looks whole. Every file this project writes to keep goes through here: shards,
meta.json, checkpoints, weights, loss.png, config.json, eval results.

The recipe, for a file: write it under a temporary name beside its final one, flush and fsync
it, rename it into place (atomic on POSIX), then fsync the directory so the rename itself is on
disk. Before the rename a reader sees either the old file or none; after it, the whole new one.
On any failure the temporary file is removed and the error re-raised; a full disk (or quota or
file-size limit) becomes a `DiskFullError` naming the path. A directory (a checkpoint) is built
under a temporary name the same way and renamed into place once everything in it is fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from errors import DiskFullError

TMP_SUFFIX = ".tmp"
DELETING_PREFIX = ".deleting_"  # a directory being removed: never read, removed at the next start
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = ("No space left", "os error 28", "Disk quota", "File too large")
_NEARLY_FULL_BYTES = 1 << 20


def tmp_name(path: Path) -> Path:
    """Where `path` is written before it is published: `<name>.tmp` in the same directory."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def is_disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write failed for lack of space. Libraries report it differently: an OSError
    with ENOSPC, a message ("No space left on device"), or only an opaque error (torch.save says
    "unexpected pos"), for which the free space left on the file system decides."""
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    if any(text in str(err) for text in _DISK_FULL_TEXT):
        return True
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):
        return False
    return stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES


def _failed(err: BaseException, path: Path, tmp: Path) -> BaseException:
    """The exception to raise after a failed write of `path`; removes `tmp` (a file or directory)."""
    full = isinstance(err, Exception) and is_disk_full(err, path.parent)
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
    if full:
        return DiskFullError(f"disk full while writing {path} ({type(err).__name__}: {err}); "
                             f"the partial file was removed: free some space and run again")
    return err


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` to (with any writer); publish it when the block ends.

    Raises DiskFullError naming `path` when the disk is full; any other error propagates. Either
    way the temporary file is gone and an existing `path` is untouched.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        raised = _failed(err, path, tmp)
        if raised is err:
            raise
        raise raised from err
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_dir(Path(directory))


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final` once everything in it is on disk.

    An existing `final` (the same checkpoint saved again) is replaced: it is first renamed aside
    as a `.deleting_` directory, so at every moment either it or the new one is in place.
    """
    try:
        _fsync_tree(tmp)
    except BaseException as err:
        raised = _failed(err, final, tmp)
        if raised is err:
            raise
        raise raised from err
    old = None
    if final.exists():
        old = final.with_name(DELETING_PREFIX + final.name)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def remove_dir(path: Path) -> None:
    """Remove a directory so that an interruption never leaves a half-deleted one under its name:
    it is renamed to `.deleting_<name>` first (which readers skip and the next start removes)."""
    doomed = path.with_name(DELETING_PREFIX + path.name)
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


@contextlib.contextmanager
def building_dir(final: Path, tmp: Path) -> Iterator[Path]:
    """Create `tmp`, yield it to be filled, and remove it again if the block fails (a full disk
    becomes a DiskFullError naming `final`). Publishing is left to `publish_dir`."""
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier crash
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException as err:
        raised = _failed(err, final, tmp)
        if raised is err:
            raise
        raise raised from err
