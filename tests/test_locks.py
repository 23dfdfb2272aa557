"""locks.py: the output directory's lock where the file system cannot flock a directory (NFS).
The lock held against real train.py and prepare_data.py runs is tested in test_run_safety.py."""

import json
import os

import pytest

import locks
from errors import DataError


def test_where_a_directory_cannot_be_flocked_the_lock_file_is_locked(tmp_path, monkeypatch):
    """NFS emulates flock with byte-range locks, which a directory opened read-only cannot take
    (EBADF): lock_dir then locks out_dir/.lock, and still refuses a second holder, naming the first."""
    import errno
    import fcntl
    import stat

    def flock(fd, operation, real=fcntl.flock):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    out = tmp_path / "data"
    with locks.lock_dir(out, DataError, "--out"):
        assert json.loads((out / locks.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(DataError, match=rf"--out={out} is in use by another run \(pid {os.getpid()} "):
            locks.lock_dir(out, DataError, "--out")
    assert not out.exists(), "the lock's holder made the directory and removed it again"
