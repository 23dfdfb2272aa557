"""FSDP through Accelerate. Accelerate runs FSDP only on GPUs (on a CPU an FSDP request becomes
DDP, which tests/test_reliability.py checks), so this runs where CUDA is present and is skipped
elsewhere: one process, full sharding, a full state dict for the checkpoint's weights."""

import json
import subprocess

import pytest
import torch

import checkpoints
import conftest
import devices
from conftest import failure, latest, tiny_args, torchrun

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not devices.cuda_available(), reason="Accelerate runs FSDP only on GPUs (no CUDA here)")]

FSDP_ENV = {"ACCELERATE_USE_CPU": "false", **conftest.FSDP_ENV}


def torchrun_fsdp(args) -> subprocess.CompletedProcess:
    return torchrun("train.py", *args, nproc=1, env_extra=FSDP_ENV, timeout=600)


def test_fsdp_trains_saves_gpt2_weights_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--lr_decay_steps=6", "--ckpt_interval=2", "--log_interval=1", "--eval_interval=100"]
    first = torchrun_fsdp(tiny_args(data_dir, out, "--max_steps=4", *common))
    assert first.returncode == 0, failure(first)
    assert "FSDP over nccl, 1 processes on cuda" in first.stdout
    ckpt = latest(out)
    model = checkpoints.load_model(ckpt)  # the gathered full weights, in GPT-2's HF layout
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    second = torchrun_fsdp(tiny_args(data_dir, out, "--max_steps=6", "--init_from=resume", *common))
    assert second.returncode == 0, failure(second)
    assert f"resumed from {ckpt} at step 4" in second.stdout
    assert json.loads((latest(out) / "meta.json").read_text())["step"] == 6
