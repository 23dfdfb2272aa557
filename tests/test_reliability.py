"""train.py never loses a user's files or keeps a bad checkpoint: non-finite steps are never
saved, a new run deletes only its own outputs, resume falls back past damaged checkpoints and
keeps the global batch when the number of processes changes, a full disk or a kill leaves
nothing that looks whole, and every user mistake is one line with exit status 2.

Real runs throughout: train.main in-process, `python train.py` and torchrun as subprocesses."""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import atomic
import checkpoints
import conftest
import run_dir
import train_config
from conftest import (ROOT, VOCAB, assert_one_line_error, env, failure, latest, run_command, snapshot, tiny_args,
                      train_main as main, wait_until)
from errors import ConfigError, DivergenceError, ShardError
from shards import write_shard


def losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run_dir.read_log(out_dir / "log.jsonl") if "loss" in r}


def torchrun(args, **env_extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 train.py ARGS` (with ACCELERATE_USE_CPU=1 unless env_extra drops it)."""
    return conftest.torchrun("train.py", *args, env_extra=env_extra)


def all_finite(ckpt) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())


# ------------------------------------------------------------------ divergence


def test_a_diverging_run_keeps_its_last_finite_checkpoint(data_dir, tmp_path):
    """lr=1e3: step 2's loss is finite (measured before the update) but its gradient norm is not.
    Its update is not applied, nothing is saved, step 1's checkpoint is not pruned, and the error
    names it."""
    out = tmp_path / "run"
    with pytest.raises(DivergenceError) as info:
        main(*tiny_args(data_dir, out, "--learning_rate=1e3", "--ckpt_interval=1", "--keep_last_ckpts=1",
                        "--log_interval=1"))
    assert re.search(r"the gradient norm (nan|inf) \(the update was not applied\) at step 2", str(info.value))
    named = re.search(r"last good checkpoint is (\S+) \(", str(info.value)).group(1)
    assert checkpoints.list_checkpoints(out) == [checkpoints.step_dir(out, 1)]
    assert named == str(checkpoints.step_dir(out, 1))
    model = checkpoints.load_model(checkpoints.step_dir(out, 1))
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    assert all_finite(checkpoints.step_dir(out, 1))


def test_non_finite_weights_are_never_saved(data_dir, tmp_path):
    """lr=1e40 overflows the weights in step 1's update, though its loss and gradients are finite:
    the checkpoint of step 1 is refused."""
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match="weights are no longer all finite at step 1.*No checkpoint"):
        main(*tiny_args(data_dir, out, "--learning_rate=1e40", "--ckpt_interval=1"))
    assert not (out / "ckpt").exists() or not list((out / "ckpt").iterdir())


# ------------------------------------------------------------------ out_dir


def test_a_new_run_never_deletes_or_overwrites_what_it_did_not_write(data_dir, tmp_path):
    out = tmp_path / "run"
    (out / "ckpt" / "old_model").mkdir(parents=True)
    (out / "ckpt" / "notes.txt").write_text("mine")
    (out / "ckpt" / "old_model" / "weights.pt").write_bytes(b"weights")
    (out / "README.md").write_text("about this run")
    foreign = snapshot(out)
    for extra in ([], ["--overwrite=true"]):  # ckpt/ holds what no run wrote: refused either way, untouched
        with pytest.raises(ConfigError, match=r"not checkpoints this project wrote .*ckpt/notes\.txt, ckpt/old_model"):
            main(*tiny_args(data_dir, out, "--max_steps=2", *extra))
        assert snapshot(out) == foreign, "a refused run changes nothing"

    shutil.rmtree(out / "ckpt")  # the user moves their files away; README.md stays beside the run
    foreign = snapshot(out)
    main(*tiny_args(data_dir, out, "--max_steps=2"))  # nothing of a run was there: it starts beside it
    assert {k: v for k, v in snapshot(out).items() if k in foreign} == foreign

    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"already holds .*ckpt/step_0000002.*--init_from=resume.*--overwrite=true"):
        main(*tiny_args(data_dir, out, "--max_steps=1"))
    assert snapshot(out) == before, "a refused run changes nothing"

    main(*tiny_args(data_dir, out, "--max_steps=1", "--overwrite=true"))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in foreign} == foreign, "--overwrite removes only the run's outputs"
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_0000001"]
    assert max(losses(out)) == 1


def test_a_crashed_runs_logs_are_not_silently_replaced(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"step": 0, "val_loss": 5.5}\n')
    with pytest.raises(ConfigError, match=r"already holds .*config\.json, log\.jsonl"):
        main(*tiny_args(data_dir, out, "--max_steps=1"))
    assert (out / "log.jsonl").read_text() == '{"step": 0, "val_loss": 5.5}\n'


# ------------------------------------------------------------------ resume fallback


def _truncate_weights(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_optimizer(ckpt):  # same size, flipped bytes in the middle: only the CRC can tell
    path = ckpt / "state" / "optimizer.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (_truncate_weights, "model.safetensors"),
    "missing state": (lambda ckpt: shutil.rmtree(ckpt / "state"), "state"),
    "corrupt optimizer state": (_corrupt_optimizer, "optimizer.bin"),
    "bad meta.json": (lambda ckpt: (ckpt / "meta.json").write_text("{not json"), "meta.json"),
}
COMMON = ["--max_steps=6", "--lr_decay_steps=6", "--ckpt_interval=2", "--keep_last_ckpts=3", "--log_interval=1",
          "--eval_interval=100", "--dropout=0.1"]


@pytest.fixture(scope="module")
def straight_losses(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    main(*tiny_args(data_dir, out, *COMMON))
    return losses(out)


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_past_a_damaged_checkpoint(data_dir, tmp_path, capsys, straight_losses, damage):
    out = tmp_path / "run"
    main(*tiny_args(data_dir, out, *COMMON, "--max_steps=4"))
    damage_fn, named = DAMAGE[damage]
    damage_fn(checkpoints.step_dir(out, 4))
    capsys.readouterr()
    main(*tiny_args(data_dir, out, *COMMON, "--init_from=resume"))
    printed = capsys.readouterr().out
    warning = next(line for line in printed.splitlines() if "skipping damaged checkpoint" in line)
    assert "step_0000004" in warning and named in warning
    assert f"resumed from {checkpoints.step_dir(out, 2)} at step 2" in printed
    assert losses(out) == straight_losses, "steps 3-6 repeat the straight run exactly"
    assert latest(out) == checkpoints.step_dir(out, 6) and all_finite(checkpoints.step_dir(out, 6))


def test_resume_with_no_loadable_checkpoint_is_one_line(data_dir, tmp_path):
    out = tmp_path / "run"
    main(*tiny_args(data_dir, out, *COMMON, "--max_steps=4"))
    _truncate_weights(checkpoints.step_dir(out, 4))
    (checkpoints.step_dir(out, 2) / "meta.json").write_text("[]")
    proc = run_command("train.py", *tiny_args(data_dir, out, *COMMON, "--init_from=resume"))
    assert_one_line_error(proc, "no loadable checkpoint", "step_0000004", "step_0000002")


# ------------------------------------------------------------------ number of processes


def test_resume_with_another_number_of_processes_keeps_the_global_batch(data_dir, tmp_path):
    """2 -> 1 and 1 -> 2 processes: the accumulation is re-derived so every step still sees
    the same 256 tokens, and the losses follow a run that never changed (rtol 1e-5)."""
    common = ["--max_steps=8", "--lr_decay_steps=8", "--log_interval=1", "--eval_interval=100", "--ckpt_interval=4",
              "--micro_batch_size=2"]
    main(*tiny_args(data_dir, tmp_path / "ref", *common, "--grad_accum_steps=2"))
    reference = losses(tmp_path / "ref")

    # 2 -> 1: the config still says grad_accum_steps=1, which would halve the global batch
    first = torchrun(tiny_args(data_dir, tmp_path / "a", *common, "--grad_accum_steps=1", "--max_steps=4"))
    assert first.returncode == 0, failure(first)
    assert "DDP over gloo, 2 processes" in first.stdout
    main(*tiny_args(data_dir, tmp_path / "a", *common, "--grad_accum_steps=1", "--init_from=resume"))
    effective = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert (effective["grad_accum_steps"], effective["tokens_per_step"]) == (2, 256)

    # 1 -> 2, with an FSDP request that Accelerate can only honour on GPUs: the start line says what runs
    main(*tiny_args(data_dir, tmp_path / "b", *common, "--grad_accum_steps=2", "--max_steps=4"))
    second = torchrun(tiny_args(data_dir, tmp_path / "b", *common, "--grad_accum_steps=2", "--init_from=resume"),
                      ACCELERATE_USE_FSDP="true")
    assert second.returncode == 0, failure(second)
    assert "grad_accum_steps=1 keeps the checkpoint's 256 tokens per step" in second.stdout
    assert "FSDP was requested" in second.stdout and "DDP over gloo, 2 processes" in second.stdout
    effective = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert (effective["grad_accum_steps"], effective["tokens_per_step"]) == (1, 256)

    for run in ("a", "b"):
        got = losses(tmp_path / run)
        assert sorted(got) == sorted(reference)
        np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(reference)], rtol=1e-5)

    # a global batch that cannot be kept (256 tokens in micro-batches of 3 x 64) is refused, naming both counts
    with pytest.raises(ConfigError, match=r"cannot resume .*step_0000008, saved by 2 process\(es\), with 1: .*tokens_per_step=256"):
        main(*tiny_args(data_dir, tmp_path / "b", *common, "--micro_batch_size=3", "--max_steps=10",
                        "--lr_decay_steps=10", "--init_from=resume"))


def test_torchrun_without_gpus_or_cpu_flag_stops_at_once(data_dir, tmp_path):
    proc = torchrun(tiny_args(data_dir, tmp_path / "run"), ACCELERATE_USE_CPU=None)
    assert proc.returncode != 0
    assert "error: the launcher started 2 processes (WORLD_SIZE=2)" in proc.stderr
    assert "ACCELERATE_USE_CPU=1" in proc.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ full disk, kills, torn logs


def test_full_disk_while_checkpointing(data_dir, small_disk):
    """600 KiB holds the logs but not a checkpoint (1.5 MB): one line, exit 2, no temporaries."""
    out = small_disk(600) / "run"
    proc = run_command("train.py", *tiny_args(data_dir, out, "--max_steps=2"))
    assert_one_line_error(proc, "disk full", str(checkpoints.step_dir(out, 2)))
    assert not list(out.rglob("*.tmp")) and not checkpoints.leftovers(out) and not checkpoints.list_checkpoints(out)


def test_kill_while_pruning_leaves_nothing_listed_that_does_not_load(data_dir, tmp_path):
    """SIGKILL while an old checkpoint (made large here) is being deleted: every listed checkpoint
    still loads, and the next start removes the half-deleted one."""
    out = tmp_path / "run"
    main(*tiny_args(data_dir, out, "--max_steps=1", "--lr_decay_steps=6", "--ckpt_interval=1"))
    bulk = checkpoints.step_dir(out, 1) / "state" / "bulk"  # slows its deletion down to a second or two
    bulk.mkdir()
    meta = json.loads((checkpoints.step_dir(out, 1) / "meta.json").read_text())
    for i in range(60_000):
        (bulk / str(i)).touch()
        # in the manifest, so step 1 stays a checkpoint this project wrote (checkpoints.is_own), which prune removes
        meta["files"][f"state/bulk/{i}"], meta["sha256"][f"state/bulk/{i}"] = 0, hashlib.sha256(b"").hexdigest()
    (checkpoints.step_dir(out, 1) / "meta.json").write_text(json.dumps(meta))
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(data_dir, out, "--max_steps=2", "--lr_decay_steps=6",
                             "--ckpt_interval=1", "--keep_last_ckpts=1", "--init_from=resume")],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def being_deleted() -> bool:  # step 1's files have started to go (however the prune goes about it)
        try:
            return len(os.listdir(bulk)) < 60_000
        except FileNotFoundError:
            return True

    assert wait_until(being_deleted, timeout=120, interval=0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    half_deleted = [p for p in checkpoints.leftovers(out) if p.name.startswith(atomic.DELETING_PREFIX)]
    assert half_deleted, "killed during the prune, which had moved step 1 aside first"
    for ckpt in checkpoints.list_checkpoints(out):
        checkpoints.verify(ckpt, need_state=True)
        checkpoints.load_model(ckpt)
    main(*tiny_args(data_dir, out, "--max_steps=3", "--lr_decay_steps=6", "--ckpt_interval=1", "--init_from=resume"))
    assert not checkpoints.leftovers(out)
    assert [p.name for p in checkpoints.list_checkpoints(out)][-1] == "step_0000003"


def test_a_torn_log_line_is_dropped_with_a_warning(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    main(*tiny_args(data_dir, out, "--max_steps=2", "--lr_decay_steps=6", "--log_interval=1"))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    capsys.readouterr()
    main(*tiny_args(data_dir, out, "--max_steps=4", "--lr_decay_steps=6", "--log_interval=1", "--init_from=resume",
                    "--plot=true"))
    assert "dropping line" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (out / "loss.png").stat().st_size > 0


# ------------------------------------------------------------------ one-line errors


def test_shard_too_small_for_block_size(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "train_000000.bin", np.arange(100) % VOCAB)
    write_shard(data / "val_000000.bin", np.arange(100) % VOCAB)
    with pytest.raises(ShardError, match="fewer than micro_batch_size"):
        main(*tiny_args(data, tmp_path / "run"))


def test_data_changed_since_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    main(*tiny_args(data_dir, out, "--max_steps=1", "--lr_decay_steps=6"))
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train_000000.bin", "val_000000.bin"):
        shutil.copy(data_dir / name, other / name)
    with pytest.raises(ShardError, match="changed since the checkpoint"):
        main(*tiny_args(other, out, "--max_steps=2", "--lr_decay_steps=6", "--init_from=resume"))


def test_token_ids_beyond_the_vocabulary_without_meta_json(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "train_000000.bin", np.arange(5000) % 300)  # llm.c-style: no meta.json
    write_shard(data / "val_000000.bin", np.arange(2000) % 300)
    proc = run_command("train.py", *tiny_args(data, tmp_path / "run"))
    assert_one_line_error(proc, "token id 299", "vocab_size=256")


def test_out_dir_that_is_a_file(data_dir, tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file"):
        main(*tiny_args(data_dir, tmp_path / "run"))
    assert (tmp_path / "run").read_text() == "not a directory"


def test_help_lists_every_field_and_exits_0():
    proc = run_command("train.py", "--help")
    assert proc.returncode == 0, proc.stderr
    for key in train_config.config_keys():
        assert f"--{key}=" in proc.stdout, key
    assert re.search(r"--learning_rate=0\.0006 +float\. peak", proc.stdout)
    assert re.search(r"--grad_accum_steps=None +int or None\.", proc.stdout)
    assert "executed" in proc.stdout  # a config file is Python


def test_max_steps_below_warmup_runs_with_a_note(data_dir, tmp_path, capsys):
    _, state = main(*tiny_args(data_dir, tmp_path / "run", "--max_steps=2"))  # tiny.py: warmup_steps=5
    assert state["step"] == 2
    assert "warmup_steps=5 is more than max_steps=2" in capsys.readouterr().out
    effective = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert effective["warmup_steps"] == 2 and math.isclose(losses(tmp_path / "run")[2], state["loss"])


def test_errors_are_one_line_from_the_command_line(data_dir, tmp_path):
    proc = run_command("train.py", *tiny_args(data_dir, tmp_path / "run", "--max_steps=1", "--learnig_rate=1"))
    assert_one_line_error(proc, "unknown config key 'learnig_rate'", "did you mean 'learning_rate'")
    proc = run_command("train.py", *tiny_args(data_dir, tmp_path / "run", "--init_from=resume"))
    assert_one_line_error(proc, "holds no checkpoint")


class _Payload:
    """Pickles as a call that creates a directory: what a malicious state file would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.makedirs, (self.path,))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_resume_never_runs_code_from_state_files(data_dir, tmp_path, name):
    out = tmp_path / "run"
    main(*tiny_args(data_dir, out, "--max_steps=1", "--lr_decay_steps=6"))
    hacked = tmp_path / "hacked"
    ckpt = checkpoints.step_dir(out, 1)
    torch.save({"state": _Payload(hacked)}, ckpt / "state" / name)
    meta = json.loads((ckpt / "meta.json").read_text())  # a forger updates the recorded size and hash too
    meta["files"][f"state/{name}"] = (ckpt / "state" / name).stat().st_size
    meta["sha256"][f"state/{name}"] = checkpoints.file_sha256(ckpt / "state" / name)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    proc = run_command("train.py", *tiny_args(data_dir, out, "--max_steps=2", "--lr_decay_steps=6", "--init_from=resume"))
    assert not hacked.exists(), "a state file's pickled code ran"
    assert_one_line_error(proc, "no loadable checkpoint", f"cannot load {ckpt / 'state' / name}")
