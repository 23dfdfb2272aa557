"""The token-shard format, stated once, and the rank-aware batch loader that reads it.

A shard is the format of llm.c and modded-nanogpt, so their published FineWeb shards train here
unchanged and ours train there:

    header: 256 x int32 (little-endian)  [0] magic 20240520, [1] version 1, [2] token count, rest 0
    body:   token count x uint16         GPT-2 BPE ids (all < 65536)

Files are named `{split}_{index:06d}.bin` (e.g. train_000000.bin, val_000000.bin); a reader
also takes a prefix (`fineweb_train_000001.bin`, as llm.c and modded-nanogpt name theirs).
A data directory holds the shards of both splits and meta.json. `ShardDir` owns writing one:
it locks it, decides which files are this tool's own (derived from `shard_name`), removes an
earlier run's with --overwrite and nothing else, and while it writes keeps the file
`prepare_data.incomplete` there; `list_shards` refuses such a directory, so a killed run's
partial shards are never trained on. A failed or interrupted run removes what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

import atomic
import locks
from errors import ConfigError, DataError, ShardError

if TYPE_CHECKING:  # torch is imported where batches are made: prepare_data.py never needs it
    import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")  # uint16, little-endian
INCOMPLETE_MARKER = "prepare_data.incomplete"  # present while a data directory is being written
META_FILE = "meta.json"  # written last: what the directory holds (prepare_data.py fills it)
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def format_description() -> dict:
    """The shard format as meta.json records it."""
    return {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES, "token_dtype": "uint16"}


def shard_pattern(split: str) -> re.Pattern:
    """File names a reader takes as shards of `split`: ours, and prefixed ones such as llm.c's."""
    return re.compile(rf"(?:.*_)?{split}_\d+\.bin")


def write_shard(path: str | Path, tokens) -> Path:
    """Write tokens (1-D, each in [0, 65535]) as one shard, atomically.

    Published with atomic.atomic_path, so an interrupted write never leaves a file that reads as
    a whole shard. Raises ValueError for tokens outside uint16 or an empty array, DiskFullError
    when the disk fills up.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"a shard needs a non-empty 1-D token array, got shape {tokens.shape}")
    if tokens.dtype != TOKEN_DTYPE:
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"token ids must fit in uint16 for {path}")
        tokens = tokens.astype(TOKEN_DTYPE)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    return path


def read_shard(path: str | Path) -> np.memmap:
    """Validate a shard's header and return its tokens as a read-only uint16 memmap.

    Raises ShardError for a missing file, a wrong magic, wrong version,
    or a size that does not match the token count in the header (truncated or padded file).
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: magic number {header[0]} is not {MAGIC}; not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: version {header[1]} is not supported (expected {VERSION})")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(
            f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
            "truncated or corrupt"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def _how_to_make(data_dir: Path) -> str:
    """The command that makes `data_dir`: the built-in corpus's for its usual name (as `make demo`
    runs it), else prepare_data.py's general form."""
    if data_dir.name == "shakespeare":
        return (f"make it with python prepare_data.py --dataset shakespeare --out {data_dir} "
                f"(the built-in corpus; make demo does this too)")
    return f"make it with python prepare_data.py --out {data_dir} and --input FILE..., --hf_dataset NAME or --dataset NAME"


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split in data_dir, in name order.

    Raises ShardError if data_dir is missing, holds no shard of the split, or is marked as an
    unfinished prepare_data.py output.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ShardError(f"data directory not found: {data_dir}; {_how_to_make(data_dir)}")
    if (data_dir / INCOMPLETE_MARKER).exists():
        raise ShardError(
            f"{data_dir} is an unfinished prepare_data.py output ({INCOMPLETE_MARKER} is there: the run was "
            f"killed or failed); run prepare_data.py again with --out {data_dir} --overwrite"
        )
    pattern = shard_pattern(split)
    paths = sorted(p for p in data_dir.iterdir() if pattern.fullmatch(p.name) and p.is_file())
    if not paths:
        raise ShardError(
            f"no {split}_*.bin shards in {data_dir}; create them with prepare_data.py --out {data_dir}"
        )
    return paths


def max_token_id(paths: list[Path]) -> int:
    """The largest token id in the given shards (a vectorised pass over each memmap)."""
    return max((int(read_shard(p).max(initial=0)) for p in paths), default=0)


class ShardWriter:
    """Streams token arrays into consecutive shards of at most shard_tokens tokens each.

    Memory stays bounded by one shard's buffer. `close()` writes the last partial shard and
    returns every path written.
    """

    def __init__(self, out_dir: str | Path, split: str, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_tokens = shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
        self.filled = 0
        self.paths: list[Path] = []
        self.total_tokens = 0

    def add(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
            raise ValueError("token ids must fit in uint16")
        start = 0
        while start < tokens.size:
            take = min(self.shard_tokens - self.filled, tokens.size - start)
            self.buffer[self.filled : self.filled + take] = tokens[start : start + take]
            self.filled += take
            start += take
            if self.filled == self.shard_tokens:
                self._flush()
        self.total_tokens += tokens.size

    def _flush(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self.paths))
        write_shard(path, self.buffer[: self.filled])
        self.paths.append(path)
        self.filled = 0

    def close(self) -> list[Path]:
        if self.filled:
            self._flush()
        return self.paths


def is_own_file(name: str) -> bool:
    """Whether a file name in a data directory is one ShardDir writes (and may replace with
    overwrite): a shard as `shard_name` spells it, meta.json, the marker, or one of their
    temporaries."""
    name = name.removesuffix(atomic.TMP_SUFFIX)
    if name in (META_FILE, INCOMPLETE_MARKER):
        return True
    split, _, rest = name.rpartition("_")
    index = rest.removesuffix(".bin")
    return split in SPLITS and index.isdigit() and name == shard_name(split, int(index))


class ShardDir:
    """The data directory prepare_data.py writes, owned for one run.

        with ShardDir(out, overwrite) as shard_dir:   # locked, and checked (see `check`)
            ... read the first document (an error here leaves out untouched) ...
            with shard_dir.writing():                 # earlier files cleared, marker written
                ... shard_dir.writer("train", n) ... shard_dir.publish(meta)

    Raises DataError (naming --out) for a directory that cannot be used; see `check`.
    """

    def __init__(self, path: str | Path, overwrite: bool):
        self.path, self.overwrite = Path(path), overwrite
        self.lock: locks.DirLock | None = None

    def __enter__(self) -> "ShardDir":
        self.lock = locks.lock_dir(self.path, DataError, "--out")  # one writer at a time, held until the end
        try:
            self.check()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != locks.LOCK_FILE)

    def check(self) -> None:
        """Raises DataError if the directory is not empty and overwrite is off, or (with it) holds
        files a reader would take as shards that this tool did not write."""
        entries = self._entries()
        if entries and not self.overwrite:
            unfinished = " (an interrupted earlier run)" if INCOMPLETE_MARKER in entries else ""
            raise DataError(f"--out {self.path} is not empty{unfinished}: {len(entries)} entries, e.g. "
                            f"{', '.join(entries[:3])}; pass --overwrite to replace this tool's shards and "
                            "meta.json there, or choose another --out")
        patterns = [shard_pattern(split) for split in SPLITS]
        foreign = [name for name in entries if not is_own_file(name) and any(p.fullmatch(name) for p in patterns)]
        if foreign:
            raise DataError(f"--out {self.path} holds {len(foreign)} shard-named files this tool did not write "
                            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); train.py would read "
                            "them with the new shards. Move them away or choose another --out; nothing was changed")

    def _remove_own_files(self) -> list[str]:
        removed = []
        for path in sorted(self.path.iterdir()):
            if path.is_file() and is_own_file(path.name):
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    @contextlib.contextmanager
    def writing(self) -> Iterator["ShardDir"]:
        """Remove an earlier run's files (reported on stderr, with what else is left in place),
        mark the directory unfinished, and yield. If the block fails or is interrupted, every
        file of this run is removed again (shards, temporaries, marker, a meta.json)."""
        removed = self._remove_own_files()
        if removed:
            print(f"removed {len(removed)} files of an earlier run from {self.path}", file=sys.stderr)
        kept = self._entries()
        if kept:
            print(f"warning: {self.path} also holds {len(kept)} entries this tool did not write, left in place: "
                  f"{', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}", file=sys.stderr)
        atomic.write_text(self.path / INCOMPLETE_MARKER,
                          f"prepare_data.py started writing {self.path} at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                          f"(pid {os.getpid()}). If it is no longer running, it was interrupted: run it again "
                          "with --overwrite.\n")
        try:
            yield self
        except BaseException:
            # The earlier run's files went above, so every own file here now is this run's
            # (also a shard published a moment before the interruption).
            self._remove_own_files()
            raise

    def writer(self, split: str, shard_tokens: int) -> "ShardWriter":
        return ShardWriter(self.path, split, shard_tokens)

    def publish(self, meta: dict) -> Path:
        """Write meta.json (atomically), then remove the marker: the directory is complete.
        Returns meta.json's path."""
        path = self.path / META_FILE
        atomic.write_json(path, meta)
        (self.path / INCOMPLETE_MARKER).unlink()
        atomic.fsync_dir(self.path)
        return path


class ShardLoader:
    """(x, y) batches of token windows from a split's shards, shared out across processes.

    A window is block_size + 1 consecutive tokens inside one shard; x is its first block_size
    tokens, y the last block_size. Windows start every block_size tokens, so each token is a
    target exactly once per epoch. Every epoch visits all windows in an order fixed by
    (seed, epoch) (or in file order when shuffle=False); micro-step k of process `rank` takes
    windows [(k * world_size + rank) * B, ... + B) of that order, so processes read disjoint
    windows and no window repeats within an epoch. The leftover windows that do not fill a
    micro-step for every process are skipped that epoch.

    The position is `state_dict()` / `load_state_dict()`: a resumed run continues with exactly
    the batches a straight run would have seen.

    pin_memory: build each micro-batch in pinned (page-locked) host memory, for a CUDA target
    (devices.pin_batches says when; pinning needs CUDA). Only then can `next_batch(device)`'s copy
    run asynchronously, overlapping the GPU's work on the step before.
    """

    def __init__(
        self,
        paths: list[Path],
        block_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = [read_shard(p) for p in paths]
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        windows_per_shard = np.array([max(len(s) - 1, 0) // block_size for s in self.shards])
        self.first_window = np.concatenate([[0], np.cumsum(windows_per_shard)])  # (n_shards + 1,)
        self.num_windows = int(self.first_window[-1])
        self.windows_per_micro_step = micro_batch_size * world_size
        self.steps_per_epoch = self.num_windows // self.windows_per_micro_step
        if self.steps_per_epoch == 0:
            raise ShardError(
                f"{len(paths)} shard(s) starting {paths[0]} hold {self.num_windows} windows of "
                f"block_size+1={block_size + 1} tokens, fewer than micro_batch_size x world_size = "
                f"{self.windows_per_micro_step}; use more data, a smaller block_size or micro_batch_size"
            )
        self.epoch = 0
        self.micro_step = 0  # micro-steps taken in this epoch (per process)
        self._order_epoch = None
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_windows)
            else:
                self._order = np.arange(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def window_ids(self) -> np.ndarray:
        """The global window ids of the next micro-batch for this rank (B,), without advancing."""
        start = (self.micro_step * self.world_size + self.rank) * self.micro_batch_size
        return self._epoch_order()[start : start + self.micro_batch_size]

    def read_windows(self, ids: np.ndarray) -> torch.Tensor:
        """Window ids (B,) -> tokens (B, block_size + 1) as int64, one contiguous tensor (pinned
        with pin_memory), each window converted straight into its row."""
        import torch

        shard = np.searchsorted(self.first_window, ids, side="right") - 1
        starts = (ids - self.first_window[shard]) * self.block_size
        T1 = self.block_size + 1
        tokens = torch.empty((len(ids), T1), dtype=torch.int64, pin_memory=self.pin_memory)
        rows = tokens.numpy()  # the same memory
        for i, (s, o) in enumerate(zip(shard, starts)):
            rows[i] = self.shards[s][o : o + T1]
        return tokens

    def next_windows(self) -> torch.Tensor:
        """The next micro-batch of windows, (B, block_size + 1) int64 on the CPU; moves to the next
        epoch at the end."""
        tokens = self.read_windows(self.window_ids())  # (B, T + 1)
        self.micro_step += 1
        if self.micro_step == self.steps_per_epoch:
            self.epoch += 1
            self.micro_step = 0
        return tokens

    def next_batch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (B, block_size) int64: inputs and next-token targets, on the CPU
        or on `device`. Moved as one tensor in one copy, non-blocking (asynchronous where the
        loader pins its batches), x and y its overlapping views there: two copies of the views
        would each gather a strided block first, and only a pinned source copies asynchronously."""
        tokens = self.next_windows()  # (B, T + 1)
        if device is not None:
            tokens = tokens.to(device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:]

    def rewind(self) -> None:
        """Back to the first micro-batch of epoch 0 (evaluation reads the same windows each time)."""
        self.epoch, self.micro_step = 0, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "windows_consumed": self.micro_step * self.windows_per_micro_step,
            "num_windows": self.num_windows,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. Raises ShardError if it belongs to other data or a
        global micro-batch of another size."""
        if state["num_windows"] != self.num_windows:
            raise ShardError(
                f"the saved loader position is for {state['num_windows']} windows but the shards "
                f"now hold {self.num_windows}; the data or block_size changed since the checkpoint"
            )
        consumed = state["windows_consumed"]
        if consumed % self.windows_per_micro_step:
            raise ShardError(
                f"the saved loader position ({consumed} windows) is not a whole number of "
                f"micro-steps of {self.windows_per_micro_step} windows (micro_batch_size x processes)"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.micro_step = consumed // self.windows_per_micro_step
        if self.micro_step >= self.steps_per_epoch:
            self.epoch, self.micro_step = self.epoch + 1, 0


def check_vocab(data_dir: str, paths: list[Path], vocab_size: int) -> None:
    """Every token id in the data must be below the model's vocab_size. meta.json (prepare_data.py)
    says which vocabulary the shards use; foreign shards (llm.c, modded-nanogpt) have none, so
    their largest id is read (a vectorised pass over the memmaps)."""
    meta = Path(data_dir) / META_FILE
    if meta.is_file():
        try:
            data_vocab = json.loads(meta.read_text()).get("vocab_size")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise ShardError(f"{meta} is not a readable JSON object ({err}); run prepare_data.py again") from None
        if data_vocab is not None and (not isinstance(data_vocab, int) or isinstance(data_vocab, bool)):
            raise ShardError(f"{meta}: vocab_size={data_vocab!r} is not a whole number; run prepare_data.py again")
        if data_vocab is not None and data_vocab > vocab_size:
            raise ConfigError(f"{meta} has vocab_size {data_vocab}, larger than the model's vocab_size={vocab_size}")
        return
    largest = max_token_id(paths)
    if largest >= vocab_size:
        raise ConfigError(f"the shards in {data_dir} hold token id {largest}, but the model's vocab_size={vocab_size} "
                          f"only covers ids below it; raise vocab_size or use other data")
