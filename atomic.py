"""Publishing files and directories so that a crash, a kill, a power loss or a full disk never
leaves one that looks whole. Every file this project writes to keep goes through here: shards,
meta.json, checkpoints, weights, loss.png, train_config.json, eval results.

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
import hashlib
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
    with ENOSPC, a message ("No space left on device"), or only an opaque error (torch.save raises
    a RuntimeError saying "unexpected pos"), for which the free space left on the file system
    decides. An error that says what else it is (an OSError with another errno, a KeyError, ...)
    is never "disk full", however full the file system looks."""
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    if any(text in str(err) for text in _DISK_FULL_TEXT):
        return True
    opaque = type(err) is RuntimeError or (isinstance(err, OSError) and err.errno is None)
    if not opaque:
        return False
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):
        return False
    return stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, path: Path) -> Iterator[None]:
    """Run the block that writes `tmp` (a file or directory) for `path`; if it fails, remove `tmp`
    and re-raise, a full disk as a DiskFullError naming `path`."""
    try:
        yield
    except BaseException as err:
        full = isinstance(err, Exception) and is_disk_full(err, path.parent)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(f"disk full while writing {path} ({type(err).__name__}: {err}); "
                                f"the partial file was removed: free some space and run again") from err
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` to (with any writer); publish it when the block ends,
    with the mode a plain open() gives (`file_mode`), so every file a user publishes has the same.

    Raises DiskFullError naming `path` when the disk is full; any other error propagates. Either
    way the temporary file is gone and an existing `path` is untouched.
    """
    path = Path(path)
    tmp = tmp_name(path)
    with _removed_on_failure(tmp, path):
        yield tmp
        os.chmod(tmp, file_mode())  # what open() would give, whatever the writer chose (safetensors: 0600)
        fsync_file(tmp)
        os.replace(tmp, path)
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
    with _removed_on_failure(tmp, final):
        _fsync_tree(tmp)
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
    with _removed_on_failure(tmp, final):
        yield tmp


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 4 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_mode() -> int:
    """The mode a newly published file gets: 0666 less the process's umask (as open() gives)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux >= 4.7: the
    Umask line of /proc/self/status). os.umask can only read it by setting it, and for that moment
    a file another thread creates (serve.py runs threads) would get the wrong mode: it is the
    fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask
