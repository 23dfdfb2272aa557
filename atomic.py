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
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from errors import DiskFullError

TMP_SUFFIX = ".tmp"
LOCK_FILE = ".lock"  # in a locked output directory: who holds the lock (pid, host, start time)
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


class DirLock:
    """An exclusive lock on an output directory, held by one run for its whole life.

    It is an OS lock (flock) on the directory itself, through a descriptor of the directory: the
    kernel releases it when the process ends, however it ends, so a kill -9 never leaves a stale
    lock, and no file can be deleted or replaced to defeat it (a lock on a file inside would pass
    to whoever recreated that file). While it is held, `directory/.lock` names the holder (pid,
    host, start time, command) for the message a refused run gives; `release` removes it again
    (and the directory, when lock_dir created it and nothing else was written there), so a refused
    or failed run leaves the directory as it found it. See `lock_dir`.
    """

    def __init__(self, path: Path, fd: int | None, created_dir: bool = False):
        self.path, self.fd, self.created_dir = path, fd, created_dir  # path: the .lock file; fd: the directory's

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)  # while still locked, so it never names a holder that has gone
            if self.created_dir and not os.listdir(self.path.parent):
                self.path.parent.rmdir()
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(pid, host, started, command: str) -> str:
    return f"pid {pid} on {host}, started {started}: {command[:120]}"


def _holder(directory: Path) -> str:
    """Who holds the lock on `directory`: as its .lock file says (written right after the lock was
    taken), or, when that file is gone (deleted by hand), as /proc/locks says on Linux: the pid
    holding a flock on the directory's inode, its start time and command line."""
    try:
        info = json.loads((directory / LOCK_FILE).read_text())
        return _describe(info["pid"], info["host"], info["started"], info["command"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        st = os.stat(directory)
        inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"
            pid = next(fields[4] for fields in map(str.split, f) if len(fields) > 5 and fields[1] == "FLOCK"
                       and fields[5].lower() == inode)
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(boot + ticks / os.sysconf("SC_CLK_TCK")))
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return _describe(pid, socket.gethostname(), started, command) + f" ({LOCK_FILE} was deleted)"
    except (OSError, ValueError, IndexError, StopIteration):
        return "its pid is not known yet"


def lock_dir(directory: str | Path, error: type[Exception], what: str,
             warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> DirLock:
    """Create `directory` if needed and take its exclusive lock (see DirLock), before anything there
    is read or written.

    Raises `error` (a UserError class) naming `what` (e.g. "out_dir") and the directory when it is a
    file or a dangling symlink, cannot be created or read, or when another process holds the lock
    (naming that process). A file system without flock support (some network mounts) gives a
    warning and a DirLock that holds nothing.
    """
    directory = Path(directory)
    if directory.is_symlink() and not directory.exists():
        raise error(f"{what}={directory} is a symlink to {os.readlink(directory)}, which does not exist; "
                    f"remove the link or choose another {what} (nothing is written through it)")
    if directory.exists() and not directory.is_dir():
        raise error(f"{what}={directory} is a file, not a directory")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise error(f"{what}={directory} cannot be used: {err.strerror or err} (it must be a directory this "
                    f"user can create and write)") from None
    path = directory / LOCK_FILE
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise error(f"{what}={directory} is in use by another run ({_holder(directory)}); wait for it to end or "
                    f"choose another {what}") from None
    except OSError:  # NFS emulates flock with byte-range locks, which a directory cannot take
        os.close(fd)
        return _lock_file(directory, error, what, warn, created)
    lock = DirLock(path, fd, created)
    try:
        path.unlink(missing_ok=True)  # a killed holder's, or a link: never written through
        write_text(path, _holder_info())
    except OSError as err:
        lock.release()
        raise error(f"{what}={directory} cannot be used: {err.strerror or err} (it must be a directory this "
                    f"user can create and write)") from None
    return lock


def _holder_info() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n"


def _lock_file(directory: Path, error: type[Exception], what: str, warn: Callable[[str], None],
               created: bool) -> DirLock:
    """lock_dir on a file system that cannot flock a directory: flock `directory/.lock` instead.
    There, deleting .lock while a run holds it would let a second run in. A file system without
    flock at all (ENOLCK, EOPNOTSUPP) gives a warning and a DirLock that holds nothing."""
    path = directory / LOCK_FILE
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as err:
            raise error(f"{what}={directory} cannot be used: {err.strerror or err} (it must be a directory this "
                        f"user can create and write)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise error(f"{what}={directory} is in use by another run ({_holder(directory)}); wait for it to end "
                        f"or choose another {what}") from None
        except OSError as err:
            warn(f"warning: cannot lock {what}={directory} ({err.strerror}): this file system does not support "
                 f"flock, so nothing stops a second run from writing there at the same time")
            return DirLock(path, fd, created)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_info().encode(), 0)  # in place: the lock is this file's
            return DirLock(path, fd, created)
        os.close(fd)  # the holder removed the file as it let go of it: lock the new one
    raise error(f"{what}={directory}: could not take its lock ({path} keeps being replaced)")
