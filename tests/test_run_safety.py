"""One run per output directory (an OS lock), nothing removed before everything is checked, only
this project's outputs removed, every file a resume loads verified (with fallback past any that
does not load), and the divergence and resume messages naming what holds.

Real runs of configs/tiny.py on the Markov corpus: train.main in-process, `python train.py` as a
subprocess where a second process must hold the lock."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import atomic
import checkpoints
import locks
import prepare_data
import run_dir
from conftest import (ROOT, assert_one_line_error, env, run_command, snapshot, tiny_args, train_main as main,
                      wait_until)
from errors import ConfigError, DataError, DivergenceError


COMMON = ["--max_steps=4", "--lr_decay_steps=8", "--ckpt_interval=2", "--keep_last_ckpts=3", "--log_interval=1",
          "--eval_interval=100", "--dropout=0.1"]  # dropout: a resume repeats only with the RNG state restored


@pytest.fixture(scope="module")
def run4(data_dir, tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("run4") / "run"
    main(*tiny_args(data_dir, out, *COMMON))
    return out


@pytest.fixture
def run_copy(run4, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run4, out)
    return out


# ------------------------------------------------------------------ the lock


def test_a_second_run_into_a_locked_out_dir_is_refused_naming_the_holder(data_dir, tmp_path):
    """A real run holds out_dir: a second start (new or resume) exits 2 naming its pid and touches
    nothing, also after its .lock file was deleted (the lock is on the directory); once the holder
    is killed with -9, the kernel has released the lock and a resume runs."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "train.py", *tiny_args(data_dir, out, "--max_steps=100000",
                               "--ckpt_interval=1", "--eval_interval=100000", "--log_interval=1000")],
                              cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: len(checkpoints.list_checkpoints(out)) >= 1, timeout=120)
        for extra in ([], ["--init_from=resume"], ["--overwrite=true"]):
            proc = run_command("train.py", *tiny_args(data_dir, out, "--max_steps=1", *extra))
            assert_one_line_error(proc, f"out_dir={out} is in use by another run (pid {holder.pid} ", "started")
        # The lock is the directory's, not the .lock file's: deleting that file lets nobody in.
        (out / locks.LOCK_FILE).unlink()
        proc = run_command("train.py", *tiny_args(data_dir, out, "--max_steps=1", "--overwrite=true"))
        assert_one_line_error(proc, f"out_dir={out} is in use by another run (pid {holder.pid} ", "started",
                              f"({locks.LOCK_FILE} was deleted)")
        assert not (out / locks.LOCK_FILE).exists(), "a refused run writes no lock file"
        assert (out / "log.jsonl").is_file() and (out / "train_config.json").is_file()
        newest = checkpoints.step_of(checkpoints.list_checkpoints(out)[-1])
        assert wait_until(lambda: checkpoints.step_of(checkpoints.list_checkpoints(out)[-1]) > newest, timeout=120)
        assert holder.poll() is None, "the holder runs on"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    step = checkpoints.step_of(checkpoints.list_checkpoints(out)[-1])
    _, state = main(*tiny_args(data_dir, out, f"--max_steps={step + 1}", "--init_from=resume"))
    assert state["step"] == step + 1
    assert not (out / locks.LOCK_FILE).exists(), "a finished run removes its lock file"


def test_the_lock_is_taken_before_out_dir_is_read(data_dir, run_copy):
    before = snapshot(run_copy)
    with locks.lock_dir(run_copy, ConfigError, "out_dir"):
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} "):
            main(*tiny_args(data_dir, run_copy, "--max_steps=1", "--overwrite=true"))
        with pytest.raises(ConfigError, match="in use by another run"):
            main(*tiny_args(data_dir, run_copy, "--max_steps=6", "--init_from=resume"))
    assert snapshot(run_copy) == before


def test_prepare_data_locks_its_out_dir(tmp_path):
    out = tmp_path / "data"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 50)
    with locks.lock_dir(out, DataError, "--out"):
        with pytest.raises(DataError, match=rf"--out={out} is in use by another run \(pid {os.getpid()} "):
            prepare_data.prepare(out, inputs=[str(corpus)], num_workers=1, progress=False)
    assert not out.exists(), "the lock's holder made the directory and removed it again"
    prepare_data.prepare(out, inputs=[str(corpus)], num_workers=1, progress=False)  # released: it runs
    assert (out / "meta.json").is_file()


def test_out_dir_under_a_file_is_one_line(data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_command("train.py", *tiny_args(data_dir, tmp_path / "file" / "run"))
    assert_one_line_error(proc, f"out_dir={tmp_path / 'file' / 'run'} cannot be used")
    proc = run_command("prepare_data.py", "--input", tmp_path / "file", "--out", tmp_path / "file" / "data")
    assert_one_line_error(proc, f"--out={tmp_path / 'file' / 'data'} cannot be used")


def test_a_dangling_symlink_is_an_existing_output_everywhere(data_dir, tmp_path):
    """train's out_dir, prepare_data's --out and save_pretrained's directory: a symlink to nothing is
    refused, naming it, and nothing is created through it (eval's --out: tests/test_eval.py)."""
    from model import GPT, GPTConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 50)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=rf"out_dir={link} is a symlink to {tmp_path / 'nowhere'}, which does not"):
        main(*tiny_args(data_dir, link, "--max_steps=1"))
    with pytest.raises(DataError, match=rf"--out={link} is a symlink to .*, which does not exist"):
        prepare_data.prepare(link, inputs=[str(corpus)], num_workers=1, progress=False)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))
    with pytest.raises(FileExistsError, match=rf"{link} is a symlink to .*, which does not exist"):
        model.save_pretrained(link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_progress_bars_only_on_a_terminal(data_dir, tmp_path):
    """With stderr a pipe or a file (`make demo > demo.log`), train, eval and prepare_data write their
    log lines and no progress bar (no carriage-return updates); on a terminal the bar shows."""
    import fcntl
    import pty
    import struct
    import termios

    out, corpus = tmp_path / "run", tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 2000)
    runs = [("train.py", *tiny_args(data_dir, out, "--max_steps=3", "--log_interval=1", "--eval_interval=100")),
            ("eval.py", "--checkpoint", out, "--task", "val", "--data", data_dir, "--batch_size", 1,
             "--dtype", "float32"),
            ("prepare_data.py", "--input", corpus, "--out", tmp_path / "data", "--num_workers", 1)]
    log = tmp_path / "demo.log"
    for argv in runs:
        with open(log, "wb") as f:  # bytes: a text-mode pipe would turn the bar's \r into \n
            code = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env(), stdout=f, stderr=f,
                                  timeout=300).returncode
        written = log.read_bytes()
        assert code == 0 and b"\r" not in written, (argv[0], written[-1000:])
        assert argv[0] != "train.py" or b"step 3/3 | loss" in written, written[-1000:]  # the log lines stay
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a bar needs columns
    proc = subprocess.Popen([sys.executable, "prepare_data.py", "--input", corpus, "--out", tmp_path / "data2",
                             "--num_workers", "1"], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
        while chunk := os.read(controller, 4096):
            shown += chunk
    os.close(controller)
    assert proc.wait(timeout=120) == 0
    assert b"encoding" in shown and b"\r" in shown, shown[-500:]


# ------------------------------------------------------------------ nothing removed before everything is checked


def test_overwrite_removes_nothing_when_an_input_is_bad(data_dir, run_copy, tmp_path):
    before = snapshot(run_copy)
    bad = tmp_path / "hs.jsonl"
    bad.write_text(json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": None, "endings": ["w", "x", "y", "z"],
                               "label": 0}) + "\n")
    proc = run_command("train.py", *tiny_args(data_dir, run_copy, "--overwrite=true", f"--hellaswag_data={bad}"))
    assert_one_line_error(proc, f"{bad}:1", "'ctx_b' is None, not a string")
    proc = run_command("train.py", *tiny_args(data_dir, run_copy, "--overwrite=true", "--log_with=bogus"))
    assert_one_line_error(proc, "log_with='bogus' must be one of")
    assert snapshot(run_copy) == before


def test_a_gpt2_directory_as_out_dir_is_refused(data_dir, run4, tmp_path):
    import shutil

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(checkpoints.step_dir(run4, 4), gpt2, ignore=shutil.ignore_patterns("state", "meta.json",
                                                                                      "train_config.json"))
    before = snapshot(gpt2)
    for extra in ([], ["--overwrite=true"]):
        with pytest.raises(ConfigError, match=r"holds model weights this project did not write .*config\.json"):
            main(*tiny_args(data_dir, gpt2, "--max_steps=1", *extra))
    assert snapshot(gpt2) == before
    checkpoints.load_model(gpt2)


def test_overwrite_keeps_a_users_files_with_run_names(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(ConfigError, match=r"holds files this project did not write .*config\.json"):
        main(*tiny_args(data_dir, out, "--max_steps=1", "--overwrite=true"))
    assert (out / "config.json").read_text() == '{"model_type": "gpt2", "n_layer": 2}'


def test_overwrite_removes_only_checkpoints_whose_manifest_verifies(data_dir, run_copy):
    """A user's directory that merely looks like a checkpoint (a step_ name and a meta.json), or a
    real checkpoint with a file added, makes --overwrite refuse, naming it, and change nothing."""
    thesis = checkpoints.step_dir(run_copy, 99)
    thesis.mkdir()
    (thesis / "meta.json").write_text('{"step": 99}')
    (thesis / "thesis.txt").write_text("four years of work")
    (checkpoints.step_dir(run_copy, 2) / "notes.txt").write_text("mine")
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match=r"not checkpoints this project wrote .*ckpt/step_0000002, "
                                          r"ckpt/step_0000099\), which a run would not touch"):
        main(*tiny_args(data_dir, run_copy, "--max_steps=1", "--overwrite=true"))
    assert snapshot(run_copy) == before
    (checkpoints.step_dir(run_copy, 2) / "notes.txt").unlink()
    with pytest.raises(ConfigError, match=r"ckpt/step_0000099\)"):
        main(*tiny_args(data_dir, run_copy, "--max_steps=1", "--overwrite=true"))
    assert (thesis / "thesis.txt").read_text() == "four years of work"
    import shutil

    shutil.move(thesis, run_copy.parent / "thesis")  # what the message asks for: then the run replaces the rest
    main(*tiny_args(data_dir, run_copy, "--max_steps=1", "--ckpt_interval=1", "--overwrite=true"))
    assert [p.name for p in checkpoints.list_checkpoints(run_copy)] == ["step_0000001"]


# ------------------------------------------------------------------ every file a resume loads is verified


def _zero_tail(path, count=22):
    data = bytearray(path.read_bytes())
    data[-count:] = bytes(count)
    path.write_bytes(bytes(data))


def _meta_with(**fields):
    def damage(ckpt):
        meta = json.loads((ckpt / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps({**meta, **fields}))
    return damage


DAMAGE = {
    "optimizer tail": (lambda ckpt: _zero_tail(ckpt / "state" / "optimizer.bin"), "optimizer.bin"),
    "rng tail": (lambda ckpt: _zero_tail(ckpt / "state" / "random_states_0.pkl"), "random_states_0.pkl"),
    "meta field type": (_meta_with(tokens_seen="many"), "tokens_seen='many'"),
    "meta loader type": (_meta_with(train_loader="start"), "train_loader='start'"),
}


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    main(*tiny_args(data_dir, out, *COMMON, "--max_steps=6"))
    return {r["step"]: r["loss"] for r in run_dir.read_log(out / "log.jsonl") if "loss" in r}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_past_any_file_that_does_not_verify(data_dir, run_copy, capsys, straight, damage):
    out = run_copy
    damage_fn, named = DAMAGE[damage]
    damage_fn(checkpoints.step_dir(out, 4))
    capsys.readouterr()
    main(*tiny_args(data_dir, out, *COMMON, "--max_steps=6", "--init_from=resume"))
    printed = capsys.readouterr().out
    warning = next(line for line in printed.splitlines() if "skipping damaged checkpoint" in line)
    assert "step_0000004" in warning and named in warning
    assert f"resumed from {checkpoints.step_dir(out, 2)} at step 2" in printed
    got = {r["step"]: r["loss"] for r in run_dir.read_log(out / "log.jsonl") if "loss" in r}
    assert got == straight, "bit-exact with the straight run, RNG included"


def test_divergence_names_the_newest_checkpoint_that_verifies(data_dir, run_copy):
    _zero_tail(checkpoints.step_dir(run_copy, 4) / "state" / "optimizer.bin")
    with pytest.raises(DivergenceError) as info:
        main(*tiny_args(data_dir, run_copy, *COMMON, "--max_steps=6", "--init_from=resume", "--learning_rate=1e40",
                        "--min_lr=0"))
    assert f"last good checkpoint is {checkpoints.step_dir(run_copy, 2)} " in str(info.value)


def test_resume_past_max_steps_says_so_and_changes_nothing(data_dir, run_copy, capsys):
    before = snapshot(run_copy)
    _, state = main(*tiny_args(data_dir, run_copy, *COMMON, "--max_steps=3", "--init_from=resume"))
    assert state["step"] == 4
    assert re.search(r"nothing to train: .*step_0000004 is at step 4 and max_steps=3", capsys.readouterr().out)
    assert snapshot(run_copy) == before


def test_resume_takes_the_configs_optimizer_settings_and_says_which_changed(data_dir, run_copy, capsys):
    """Loading an optimizer's state puts back the checkpoint's settings; a resume that sets others
    keeps the config's (named in one line) and the next checkpoint holds them."""
    import torch

    capsys.readouterr()
    main(*tiny_args(data_dir, run_copy, *COMMON, "--max_steps=6", "--init_from=resume", "--weight_decay=0.05",
                    "--beta2=0.9"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resume: the config's optimizer"))
    assert "step_0000004's" in line and "weight_decay 0.1 -> 0.05" in line and "betas (0.9, 0.95) -> (0.9, 0.9)" in line
    saved = torch.load(checkpoints.step_dir(run_copy, 6) / checkpoints.STATE_SUBDIR / "optimizer.bin", weights_only=True)
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.05, 0.0]  # matrices; biases and LayerNorms
    assert all(tuple(g["betas"]) == (0.9, 0.9) for g in saved["param_groups"])


def test_a_run_directory_of_an_earlier_version_resumes(data_dir, run_copy):
    """Earlier versions wrote the run's config as config.json: such a directory still counts as a
    run's outputs, and a resume continues it, writing train_config.json in that file's place."""
    (run_copy / "train_config.json").rename(run_copy / "config.json")
    with pytest.raises(ConfigError, match=r"already holds .*config\.json.*--overwrite=true"):
        main(*tiny_args(data_dir, run_copy, *COMMON))
    _, state = main(*tiny_args(data_dir, run_copy, *COMMON, "--max_steps=5", "--init_from=resume"))
    assert state["step"] == 5 and checkpoints.list_checkpoints(run_copy)[-1].name == "step_0000005"
    assert not (run_copy / "config.json").exists()
    assert json.loads((run_copy / "train_config.json").read_text())["max_steps"] == 5


def test_checkpoint_files_are_published_with_the_usual_mode(run4):
    mode = atomic.file_mode()
    for path in checkpoints.step_dir(run4, 4).rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == mode, path
    assert (run4 / "train_config.json").stat().st_mode & 0o777 == mode


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux shows the umask in /proc/self/status")
def test_file_mode_reads_the_umask_without_changing_it(monkeypatch):
    """os.umask can only be read by setting it, which races with threads creating files (serve.py)."""
    umask = os.umask(0o022)
    os.umask(umask)

    def set_umask(mask):
        raise AssertionError(f"os.umask({mask:o}) changes the umask of every thread")

    monkeypatch.setattr(os, "umask", set_umask)
    assert atomic.file_mode() == 0o666 & ~umask


def test_every_published_file_has_the_umasks_mode(data_dir, tmp_path):
    """save_pretrained (the Python API), a training checkpoint, prepare_data's shards and meta.json
    and eval --out all publish files with the mode a plain open() gives under the umask (0640
    under umask 027), never the 0600 a writer such as safetensors chooses."""
    import eval as eval_cli
    from model import GPT, GPTConfig

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 50)
    previous = os.umask(0o027)
    try:
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)).save_pretrained(tmp_path / "api")
        prepare_data.prepare(tmp_path / "data", inputs=[str(corpus)], num_workers=1, progress=False)
        main(*tiny_args(data_dir, tmp_path / "run", "--max_steps=1", "--ckpt_interval=1"))
        assert eval_cli.main(["--checkpoint", str(tmp_path / "run"), "--task", "val", "--data", str(data_dir),
                              "--limit", "2", "--dtype", "float32", "--out", str(tmp_path / "val.json")]) == 0
    finally:
        os.umask(previous)
    published = [p for p in tmp_path.rglob("*") if p.is_file() and p != corpus]
    for name in ("api/model.safetensors", "data/meta.json", "run/ckpt/step_0000001/model.safetensors",
                 "run/ckpt/step_0000001/state/optimizer.bin", "run/train_config.json", "val.json"):
        assert tmp_path / name in published, name
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in published if
            p.stat().st_mode & 0o777 != 0o640} == {}


# ------------------------------------------------------------------ one line and exit 2, or a clean stop


@pytest.mark.parametrize("content, message", [
    (b"n_layer = (\n", "is not valid Python at line"),
    (b"n_layer = 1 // 0\n", "raised ZeroDivisionError at line 1: integer division or modulo by zero"),
    (b"# caf\xe9\nn_layer = 2\n", "is not UTF-8 text"),
])
def test_a_broken_config_file_is_one_line(data_dir, tmp_path, content, message):
    config = tmp_path / "broken.py"
    config.write_bytes(content)
    proc = run_command("train.py", config, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}")
    assert_one_line_error(proc, f"config file {config}", message)


def test_a_string_vocab_size_in_the_datas_meta_json_is_one_line(data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "meta.json").write_text('{"vocab_size": "50257"}')
    proc = run_command("train.py", *tiny_args(data, tmp_path / "run", "--max_steps=1"))
    assert_one_line_error(proc, "vocab_size='50257' is not a whole number")


def test_a_signal_during_setup_stops_before_anything_is_written(data_dir, run_copy, tmp_path):
    """SIGINT while HellaSwag is being tokenized: exit 130 with one line, the earlier run intact."""
    rows = [{"activity_label": "Cooking", "ctx_a": f"A chef chops onions on board {i}.", "ctx_b": "She",
             "endings": ["adds them to a pan.", "throws the board.", "sings loudly.", "sleeps."], "label": 0}
            for i in range(30_000)]
    hellaswag = tmp_path / "hs.jsonl"
    hellaswag.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(run_copy)
    args = [a for a in tiny_args(data_dir, run_copy, "--overwrite=true", f"--hellaswag_data={hellaswag}")
            if not a.startswith("--vocab_size")]  # GPT-2's vocabulary, which HellaSwag's tokens need
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lock = run_copy / locks.LOCK_FILE
    assert wait_until(lambda: lock.is_file() and lock.read_text().strip(), timeout=120)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT before training started" in err, err[-3000:]
    assert snapshot(run_copy) == before


def test_only_an_opaque_error_on_a_full_file_system_counts_as_disk_full(small_disk):
    import errno

    full = small_disk(64)
    with pytest.raises(OSError):
        (full / "filler").write_bytes(b"x" * (128 << 10))
    assert atomic.is_disk_full(RuntimeError("unexpected pos 123"), full)  # torch.save's only word for it
    assert atomic.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), Path("/"))
    assert not atomic.is_disk_full(PermissionError(errno.EACCES, "Permission denied"), full)
    assert not atomic.is_disk_full(KeyError("weight"), full)
    assert not atomic.is_disk_full(ValueError("bad shape"), full)
