"""eval.py, the command line over scoring.py: held-out loss equal to train.py's eval, bits per
byte from prepare_data's byte counts, HellaSwag from JSONL or save_to_disk data (and during
training, alike across process counts), --out, and every bad input as one line. HellaSwag-format
fixtures are written here (test_scoring.ROWS); nothing is downloaded. scoring.py's functions
are tested in test_scoring.py."""

import json
import math

import numpy as np
import pytest

import checkpoints
import prepare_data
import run_dir
import train
from conftest import assert_one_line_error, failure, run_command, tiny_args, torchrun
from eval import main
from test_scoring import ROWS


@pytest.fixture(scope="module")
def hellaswag_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def run_cli(capsys, *argv):
    """eval.main on argv, on the CPU unless argv says otherwise (the references are CPU fp32)."""
    code = main(["--device", "cpu", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ HellaSwag


def test_jsonl_and_save_to_disk_give_the_same_figures(capsys, gpt2_dir, hellaswag_jsonl, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{**row, "label": str(row["label"])} for row in ROWS]  # the hub's labels are strings
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hs_disk"))
    results = []
    for data in (hellaswag_jsonl, tmp_path / "hs_disk"):
        out = tmp_path / f"{data.name}.json"
        code, stdout, err = run_cli(capsys, "--checkpoint", gpt2_dir, "--task", "hellaswag", "--data", data,
                                    "--out", out, "--dtype", "float32")
        assert code == 0, err
        assert "acc_norm" in stdout
        results.append(json.loads(out.read_text()))
    assert results[0]["task"] == "hellaswag" and results[0]["examples"] == len(ROWS)
    for key in ("examples", "acc", "acc_norm"):
        assert results[0][key] == results[1][key]
    code, _, _ = run_cli(capsys, "--checkpoint", gpt2_dir, "--task", "hellaswag", "--data", hellaswag_jsonl,
                         "--limit", "2", "--out", tmp_path / "two.json")
    assert code == 0 and json.loads((tmp_path / "two.json").read_text())["examples"] == 2


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "holds no HellaSwag examples"),
    ('{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "label": 0}\n', "no field 'endings'"),
    ('{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["w", "x", "y", "z"], "label": 4}\n',
     "out of range"),
    ('{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["w", "x", "y", "z"], "label": "one"}\n',
     "not an integer"),
    ("[1, 2]\n", "not an object"),
    ('{"activity_label": "a", "ctx_a": "b", "ctx_b": null, "endings": ["w", "x", "y", "z"], "label": 0}\n',
     "'ctx_b' is None, not a string"),
    ('{"activity_label": 7, "ctx_a": "b", "ctx_b": "c", "endings": ["w", "x", "y", "z"], "label": 0}\n',
     "'activity_label' is 7, not a string"),
    ('{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": 1}\n',
     "must be a list of 4 strings"),
    (b'{"activity_label": "caf\xe9", "ctx_a": "b", "ctx_b": "c", "endings": ["w", "x", "y", "z"], "label": 0}\n',
     "hs.jsonl:1: not UTF-8"),
])
def test_bad_hellaswag_data_is_one_line(capsys, gpt2_dir, tmp_path, content, message):
    path = tmp_path / "hs.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, _, err = run_cli(capsys, "--checkpoint", gpt2_dir, "--task", "hellaswag", "--data", path)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_errors_from_the_command_line_are_one_line(tmp_path, gpt2_dir):
    proc = run_command("eval.py", "--checkpoint", tmp_path / "nothing", "--task", "val", "--data", tmp_path)
    assert_one_line_error(proc, "no such checkpoint")
    proc = run_command("eval.py", "--checkpoint", gpt2_dir, "--task", "val", "--data", tmp_path / "none")
    assert_one_line_error(proc, "data directory not found")


# ------------------------------------------------------------------ held-out loss


def test_val_task_equals_train_eval(data_dir, tmp_path, capsys):
    """configs/tiny.py evaluates 2 micro-batches of 4 windows of 64 tokens, in file order: eval.py
    over the same 8 windows gives the same loss."""
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--max_steps=3", "--lr_decay_steps=6"))
    logged = [r["val_loss"] for r in run_dir.read_log(out / "log.jsonl") if "val_loss" in r][-1]
    code, _, err = run_cli(capsys, "--checkpoint", out, "--task", "val", "--data", data_dir, "--limit", 8,
                           "--batch_size", 3, "--out", tmp_path / "val.json", "--dtype", "float32")
    assert code == 0, err
    figures = json.loads((tmp_path / "val.json").read_text())
    assert figures["loss"] == pytest.approx(logged, abs=1e-5)
    assert figures["tokens"] == 8 * 64 and figures["perplexity"] == pytest.approx(math.exp(figures["loss"]))
    assert figures["bits_per_byte"] is None  # the Markov shards have no meta.json
    assert figures["checkpoint"] == str(checkpoints.step_dir(out, 3))


def test_bits_per_byte_from_prepare_datas_byte_count(tmp_path, enc, gpt2_dir, capsys):
    docs = [f"Document {i}: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e and plain words, " * 20 for i in range(30)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with_out = prepare_data.prepare(tmp_path / "data", inputs=[str(tmp_path / "c.jsonl")], val_fraction=0.2,
                                    progress=False)
    capsys.readouterr()
    val_ids = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in sorted((tmp_path / "data").glob("val_*"))])
    val_text = enc.decode([int(t) for t in val_ids if t != 50256])
    assert with_out["val"]["bytes"] == len(val_text.encode()) and with_out["train"]["bytes"] > 0
    code, _, err = run_cli(capsys, "--checkpoint", gpt2_dir, "--task", "val", "--data", tmp_path / "data",
                           "--out", tmp_path / "val.json")
    assert code == 0, err
    figures = json.loads((tmp_path / "val.json").read_text())
    expected = figures["loss"] / math.log(2) * with_out["val"]["tokens"] / with_out["val"]["bytes"]
    assert figures["bits_per_byte"] == pytest.approx(expected)


# ------------------------------------------------------------------ during training


@pytest.fixture(scope="module")
def gpt2_tokens(tmp_path_factory):
    """Shards of GPT-2 ids (prepare_data on a few hundred KB of text) for runs with the real vocabulary."""
    root = tmp_path_factory.mktemp("gpt2_tokens")
    text = "".join(f"{row['ctx_a']} {row['ctx_b']} {' '.join(row['endings'])} ({i})\n\n" for i in range(400) for row in ROWS)
    (root / "corpus.txt").write_text(text)
    prepare_data.prepare(root / "data", inputs=[str(root / "corpus.txt")], val_fraction=0.1, progress=False)
    return root / "data"


def test_hellaswag_during_training_matches_across_process_counts(gpt2_tokens, hellaswag_jsonl, tmp_path):
    """hellaswag_data adds the figures to each eval (log.jsonl); with 2 processes each scores half
    the examples and the counts are summed, so at step 0 (identical weights) both runs agree."""
    common = ["--vocab_size=50257", f"--hellaswag_data={hellaswag_jsonl}", "--max_steps=2", "--lr_decay_steps=6",
              "--eval_interval=2", "--micro_batch_size=2", "--grad_accum_steps=1", "--eval_steps=1"]
    train.main(tiny_args(gpt2_tokens, tmp_path / "one", *common))
    proc = torchrun("train.py", *tiny_args(gpt2_tokens, tmp_path / "two", *common))
    assert proc.returncode == 0, failure(proc)
    figures = {}
    for run in ("one", "two"):
        records = [r for r in run_dir.read_log(tmp_path / run / "log.jsonl") if "hellaswag_acc_norm" in r]
        assert [r["step"] for r in records] == [0, 2]
        figures[run] = records[0]
    for key in ("hellaswag_acc", "hellaswag_acc_norm"):
        assert figures["one"][key] == figures["two"][key]
        assert figures["one"][key] * len(ROWS) == round(figures["one"][key] * len(ROWS))  # a count of 5


# ------------------------------------------------------------------ --out and bad inputs


def test_out_is_checked_before_the_evaluation_and_never_replaced_silently(capsys, gpt2_dir, hellaswag_jsonl, tmp_path):
    args = ["--checkpoint", gpt2_dir, "--task", "hellaswag", "--data", hellaswag_jsonl, "--limit", "1"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "missing" / "r.json")
    assert code == 2 and "the directory" in err and "does not exist" in err and "loaded" not in err, err
    (tmp_path / "r.json").write_text("mine")
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "r.json")
    assert code == 2 and "already exists; pass --overwrite" in err and "loaded" not in err, err
    assert (tmp_path / "r.json").read_text() == "mine"
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "r.json", "--overwrite")
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["examples"] == 1, err
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")  # dangling: still an existing output
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "link.json")
    assert code == 2 and "already exists (a symlink to" in err and "loaded" not in err, err
    assert not (tmp_path / "target.json").exists()
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "link.json", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "target.json").read_text())["examples"] == 1
    proc = run_command("eval.py", *args, "--out", "/dev/stdout")
    assert proc.returncode == 0, failure(proc)
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["examples"] == 1


def test_bad_inputs_to_eval_are_one_line(capsys, gpt2_dir, tmp_path):
    def assert_one_line(argv, *needles):
        code, _, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        for needle in needles:
            assert needle in lines[0], lines[0]

    data = tmp_path / "data"
    data.mkdir()
    from shards import write_shard

    write_shard(data / "val_000000.bin", np.full(500, 60000))
    assert_one_line(["--checkpoint", gpt2_dir, "--task", "val", "--data", data], "token id 60000", "vocab_size=50257")
    write_shard(data / "val_000000.bin", np.arange(500))
    (data / "meta.json").write_text('{"val": {"tokens": "many"}}')
    assert_one_line(["--checkpoint", gpt2_dir, "--task", "val", "--data", data], "meta.json", "'tokens' and 'bytes'")
    import shutil

    for field, value, rule in [("n_layer", "2", "must be a positive integer"),
                               ("n_layer", 10**9, "does not match the weights"),
                               ("n_embd", 10**6, "does not match the weights")]:
        bad = tmp_path / f"bad_{field}_{value}"
        shutil.copytree(gpt2_dir, bad)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, field: value}))
        assert_one_line(["--checkpoint", bad, "--task", "val", "--data", data], f"{field}=", rule)
