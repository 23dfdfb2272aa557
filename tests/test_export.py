"""export.py: any checkpoint to a clean Hugging Face GPT-2 directory (LoRA runs: tests/test_lora.py).
What it writes loads in transformers with the same logits, holds no training state, and an --out
that is not empty (or is a symlink) is refused; --overwrite replaces only an earlier export."""

from __future__ import annotations

import pytest
import torch

import export
from conftest import assert_one_line_error, run_command, save_weights
from errors import CheckpointError, OptionError
from model import GPT, GPTConfig


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    save_weights(tmp_path / "run", 3, model, {"tokens_seen": 96})
    return tmp_path / "run"


def test_export_writes_a_directory_transformers_loads(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "exported"
    export.export(run_dir, out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    assert not names & {"meta.json", "state", "train_config.json"}
    assert not list(tmp_path.glob(export.TMP_PREFIX + "*"))  # published by a rename, nothing left over
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        ours = GPT.from_pretrained(run_dir / "ckpt" / "step_0000003").eval()(idx)[0]
        theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_a_non_empty_out_needs_overwrite_and_holds_only_an_export(run_dir, tmp_path):
    out = tmp_path / "exported"
    export.export(run_dir, out)
    with pytest.raises(OptionError, match="not empty.*--overwrite"):
        export.export(run_dir, out)
    export.export(run_dir, out, overwrite=True)  # an earlier export is replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match="notes.txt"):
        export.export(run_dir, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # nobody else's file is deleted


def test_a_symlinked_out_is_refused(run_dir, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OptionError, match="symlink"):
        export.export(run_dir, tmp_path / "link", overwrite=True)
    assert not list((tmp_path / "real").iterdir())


def test_non_finite_weights_are_not_exported(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    save_weights(tmp_path / "run", 1, model)
    with pytest.raises(CheckpointError, match="non-finite.*c_fc"):
        export.export(tmp_path / "run", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_the_command_line_errors_in_one_line(run_dir, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = run_command("export.py", "--checkpoint", run_dir, "--out", tmp_path / "full")
    assert_one_line_error(proc, "--out", "not empty")
    proc = run_command("export.py", "--checkpoint", run_dir, "--out", tmp_path / "new")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "new" / "model.safetensors").is_file()
