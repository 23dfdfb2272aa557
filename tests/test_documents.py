"""documents.py, through prepare_data.py's command line: each reader's bad input (a missing path,
an unsupported file, a damaged JSONL line, gzip or Parquet file, a missing column, an unreachable
hub dataset) fails with one `error:` line naming the file, line or column, and writes nothing.
The round trips of every input kind are in test_data.py."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import error_line, run_prepare_data

ROOT = Path(__file__).resolve().parent.parent


def test_missing_path_glob_and_unsupported_type(tmp_path, capsys):
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "nope.txt", "--out", tmp_path / "out")
    assert code == 2 and "input not found" in error_line(err) and "nope.txt" in err
    code, _, err = run_prepare_data(capsys, "--input", str(tmp_path / "*.jsonl"), "--out", tmp_path / "out")
    assert code == 2 and "matched no files" in error_line(err)
    (tmp_path / "notes.rst").write_text("text")
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "notes.rst", "--out", tmp_path / "out")
    assert code == 2 and "unsupported file type" in error_line(err)
    (tmp_path / "empty_dir").mkdir()
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "empty_dir", "--out", tmp_path / "out")
    assert code == 2 and "holds no" in error_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"body": "x"}', "no field 'text'"),
    ('{"text": 3}', "not a string"),
    ('["text"]', "not an object"),
])
def test_jsonl_errors_name_file_and_line(line, message, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    code, _, err = run_prepare_data(capsys, "--input", path, "--out", tmp_path / "out")
    assert code == 2
    assert f"{path}:3:" in error_line(err) and message in err


def test_damaged_gzip_and_parquet(tmp_path, capsys):
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "bad.jsonl.gz", "--out", tmp_path / "out")
    assert code == 2 and "gzip" in error_line(err) and "bad.jsonl.gz" in err
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "bad.parquet", "--out", tmp_path / "out")
    assert code == 2 and "Parquet" in error_line(err)


def test_parquet_without_the_column(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "c.parquet", "--out", tmp_path / "out")
    assert code == 2 and "no column 'text'" in error_line(err) and "body" in err
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    code, _, err = run_prepare_data(capsys, "--input", tmp_path / "n.parquet", "--out", tmp_path / "out")
    assert code == 2 and "not strings" in error_line(err)


def test_offline_hub_name_says_to_pass_a_local_path(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "prepare_data.py", "--hf_dataset", "HuggingFaceFW/fineweb-edu", "--hf_config", "sample-10BT",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "local path" in error_line(proc.stderr) and "fineweb-edu" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_hf_missing_local_path(tmp_path, capsys):
    code, _, err = run_prepare_data(capsys, "--hf_dataset", tmp_path / "no" / "such", "--out", tmp_path / "out")
    assert code == 2 and "no such local directory" in error_line(err)
