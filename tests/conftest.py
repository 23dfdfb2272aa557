"""Fixtures shared by the test files: a learnable token corpus, a small real file system for
full-disk tests, and helpers for running the commands as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import atomic
import checkpoints
from model import GPT, GPTConfig
from shards import write_shard
from tokenizer import gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
VOCAB = 256  # the synthetic corpus uses 256 ids, which keeps lm_head (and the tests) small


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a fresh `python train.py` would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def in_process_training_on_the_cpu(monkeypatch):
    """train.main in this process trains on the CPU, as the commands run by `env()` do: Accelerate
    would take a GPU where there is one (and with mixed_precision=auto, bf16), and the tests'
    references are CPU fp32 numbers. Tests of the GPU path clear it (tests/test_cuda_runs.py's
    `device` fixture)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory):
    """Where precision.py keeps measured bf16/fp32 rates during the tests (and in the commands they
    run): a temporary directory, never the user's ~/.cache."""
    directory = tmp_path_factory.mktemp("precision_cache")
    os.environ["GPT2_ACCELERATE_CACHE_DIR"] = str(directory)
    return directory


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A learnable corpus: a fixed random Markov chain over 256 ids, 4 successors per id.

    Its entropy is ln 4 = 1.39 nats/token, against ln 256 = 5.55 for a model that knows nothing.
    """
    rng = np.random.default_rng(0)
    successors = rng.integers(0, VOCAB, size=(VOCAB, 4))
    choice = rng.integers(0, 4, size=60_000)
    tokens = np.zeros(60_000, dtype=np.int64)
    for i in range(1, len(tokens)):
        tokens[i] = successors[tokens[i - 1], choice[i]]
    directory = tmp_path_factory.mktemp("markov")
    write_shard(directory / "train_000000.bin", tokens[:40_000])
    write_shard(directory / "train_000001.bin", tokens[40_000:50_000])
    write_shard(directory / "val_000000.bin", tokens[50_000:])
    return directory


def tiny_args(data_dir, out_dir, *extra) -> list[str]:
    """configs/tiny.py on the Markov corpus, as command-line arguments of train.py."""
    return [TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--vocab_size={VOCAB}", *extra]


def latest(path) -> Path:
    """The checkpoint directory `path` stands for that a reader tries first (see checkpoints.candidates)."""
    return checkpoints.candidates(path)[0]


def save_weights(out_dir, step: int, model, meta: dict | None = None) -> Path:
    """Publish a checkpoint out_dir/ckpt/step_N with weights and meta.json but no training state, as
    a model made outside train.py would be saved for sample.py, eval.py and serve.py. Returns it."""
    tmp, final = checkpoints.tmp_dir(out_dir, step), checkpoints.step_dir(out_dir, step)
    with atomic.building_dir(final, tmp):
        model.save_pretrained(tmp)
        checkpoints.finish(tmp, final, {"step": step, **(meta or {})})
    return final


def env() -> dict:
    """The environment of a command run as a subprocess: CPU, one thread, the project importable."""
    result = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result["PYTHONPATH"] = os.pathsep.join([str(ROOT), result.get("PYTHONPATH", "")])
    return result


def run_command(*argv, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python <argv>` in the project root, as a user would run it."""
    return _run([sys.executable, *map(str, argv)], {**env(), **(env_extra or {})}, timeout)


def torchrun(*argv, nproc: int = 2, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC <argv>` in the project root, with ACCELERATE_USE_CPU=1
    unless env_extra sets it to None. --standalone takes a free port, so runs that overlap (another
    checkout's tests on the same machine) never join each other."""
    environment = {k: v for k, v in {**env(), **(env_extra or {})}.items() if v is not None}
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 *map(str, argv)], environment, timeout)


def _run(command: list[str], environment: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run `command` in the project root, capturing its output. A run past `timeout` is killed with
    every process it started (a launcher's workers too), and the test fails showing what it printed."""
    with subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{' '.join(command)} did not finish in {timeout} s\n"
                        f"--- stdout tail ---\n{stdout[-3000:]}\n--- stderr tail ---\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def failure(proc: subprocess.CompletedProcess) -> str:
    """What to show when a command failed: its error lines (from every rank), then its last output."""
    errors = [line for line in proc.stderr.splitlines() if "error:" in line.lower()]
    return "\n".join(errors[:20]) + "\n--- stderr tail ---\n" + proc.stderr[-2000:]


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 2, stderr ending in exactly one `error: ...` line naming `expected`, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    line = error_line(proc.stderr)
    for text in expected:
        assert text in line, line
    return line


def run_prepare_data(capsys, *argv) -> tuple[int, str, str]:
    """prepare_data.main in this process on argv (each made a str): (exit status, stdout, stderr)."""
    import prepare_data

    code = prepare_data.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The one `error: ...` line of stderr text `err` (asserted: exactly one, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.fixture
def small_disk():
    """A function (size_kb) -> directory on a real file system of that size (a tmpfs), where
    writes fail with ENOSPC exactly as on a full disk; unmounted afterwards. Mounting needs
    root (CI and the development machine run as root); elsewhere the test is skipped."""
    mounts = []

    def make(size_kb: int) -> Path:
        directory = Path(tempfile.mkdtemp(prefix="small_disk_"))
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(directory)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            directory.rmdir()
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
        mounts.append(directory)
        return directory

    yield make
    for directory in mounts:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
        with contextlib.suppress(OSError):
            directory.rmdir()


@pytest.fixture(scope="session")
def enc():
    """GPT-2's tokenizer (tiktoken)."""
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with the real vocabulary, as a Hugging Face directory."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # spread-out predictions, so choices differ clearly
    path = tmp_path_factory.mktemp("gpt2") / "tiny"
    model.save_pretrained(path)
    return path


# --------------------------------------------------------------- helpers shared by the test files

# Accelerate's FSDP through the environment: full sharding, Blocks as the units, a full state dict saved.
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
    "FSDP_USE_ORIG_PARAMS": "true",
}


def train_main(*argv):
    """train.main as a fresh `python train.py` would run it. (train, run_dir and accelerate are
    imported here, not at the top: they load peft and transformers, which some test files
    configure first.)"""
    import train
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return train.main([str(a) for a in argv])


def read_log(out_dir) -> list[dict]:
    """The records of out_dir's log.jsonl (run_dir.read_log)."""
    import run_dir

    return run_dir.read_log(Path(out_dir) / "log.jsonl")


def train_losses(out_dir) -> list[float]:
    """The train loss of every logged step of the run in out_dir."""
    return [r["loss"] for r in read_log(out_dir) if "loss" in r]


def snapshot(root):
    """Every file under root, {relative path: bytes}: what a refused or failed command must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
