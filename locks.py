"""The lock on an output directory (a run's out_dir, prepare_data.py's --out): one writer at a
time, for the writer's whole life.

`lock_dir` takes an OS lock (flock) on the directory itself, so the kernel drops it when the
holder ends, however it ends (a kill -9 leaves no stale lock). `directory/.lock` names the holder
(pid, host, start time, command) for the message a refused run gives; when that file was deleted
by hand, /proc/locks still says who holds it (Linux). On a file system that cannot flock a
directory (NFS) the .lock file itself is locked; one without flock at all gives a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import atomic

LOCK_FILE = ".lock"  # in a locked output directory: who holds the lock (pid, host, start time)


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
        _flock_or_refuse(fd, directory, error, what)
    except OSError:  # NFS emulates flock with byte-range locks, which a directory cannot take
        os.close(fd)
        return _lock_file(directory, error, what, warn, created)
    lock = DirLock(path, fd, created)
    try:
        path.unlink(missing_ok=True)  # a killed holder's, or a link: never written through
        atomic.write_text(path, _holder_info())
    except OSError as err:
        lock.release()
        raise error(f"{what}={directory} cannot be used: {err.strerror or err} (it must be a directory this "
                    f"user can create and write)") from None
    return lock


def _flock_or_refuse(fd: int, directory: Path, error: type[Exception], what: str) -> None:
    """Take an exclusive flock on fd without waiting. Raises `error` naming the holder (fd closed)
    when another process holds it; OSError when the file system cannot flock (fd left open)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise error(f"{what}={directory} is in use by another run ({_holder(directory)}); wait for it to end or "
                    f"choose another {what}") from None


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
            _flock_or_refuse(fd, directory, error, what)
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
