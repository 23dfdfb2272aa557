"""Whole runs on every device at hand, through the commands' own entry points: training at each
precision, compiled, resumed, with gradient checkpointing, and spread by Accelerate (DDP, FSDP);
the engine's greedy tokens against transformers; serve.py answering the openai client; eval.py's
val loss. Each test takes a `device`, "cpu" always and "cuda" where there is one (marked `cuda`,
which `make gpu-check` selects; skipped elsewhere with a reason naming CUDA), as in
tests/test_cuda.py. Where a CPU variant cannot run, its skip says why.

Training picks its device the way Accelerate does: a GPU where there is one, unless
ACCELERATE_USE_CPU is set, which the `device` fixture sets or clears. The models are
configs/tiny.py-sized on the Markov corpus of tests/conftest.py, so each CUDA variant takes
seconds (the compiled run: its compilation)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

import devices
import eval as eval_cli
import train
from conftest import FSDP_ENV, ROOT, env, failure, read_log, save_weights, tiny_args, torchrun, wait_until
from engine import Engine, SamplingParams
from model import GPT, GPTConfig

NO_CUDA = "needs CUDA: torch.cuda.is_available() is False on this machine"
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not devices.cuda_available(), reason=NO_CUDA)]
TWO_GPUS = "needs two CUDA devices: devices.cuda_device_count() < 2 on this machine"
# A short run: 4 steps of configs/tiny.py (2 micro-batches of 4 windows of 64 tokens each),
# every loss logged, dropout on so that the RNG state has to come back on resume.
SHORT = ["--max_steps=4", "--lr_decay_steps=8", "--log_interval=1", "--eval_interval=4", "--eval_steps=1"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request, monkeypatch) -> str:
    """The device's name; in-process training runs there (ACCELERATE_USE_CPU set for "cpu", unset
    for "cuda", where Accelerate then takes the GPU)."""
    if request.param == "cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    else:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    return request.param


def train_run(data_dir, out, *extra) -> list[dict]:
    """train.main on configs/tiny.py with `extra`, as a fresh process would run it; its log records."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train.main(tiny_args(data_dir, out, *extra))
    return read_log(out)


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def val_losses(records: list[dict]) -> list[float]:
    return [r["val_loss"] for r in records if "val_loss" in r]


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_loss_falls_at_each_precision(device, precision, data_dir, tmp_path, capsys):
    """30 steps at mixed_precision=`precision` (fp16: Accelerate's GradScaler, which may skip the
    first steps while it finds its scale) take the val loss from ln(256) = 5.55 down by 0.25 at
    least (fp32 on the CPU: by 0.44); the start line names the device and the precision."""
    if device == "cpu" and precision == "fp16":
        pytest.skip("fp16 with a GradScaler is a GPU path: on the CPU Accelerate builds no GradScaler "
                    "(Accelerator.scaler stays None), so mixed_precision=fp16 would test neither")
    records = train_run(data_dir, tmp_path / "run", "--max_steps=30", "--lr_decay_steps=30", "--log_interval=1",
                        "--eval_interval=30", "--eval_steps=2", f"--mixed_precision={precision}")
    out = capsys.readouterr().out
    assert f"on {device}" in out and f"mixed_precision={precision}" in out, out[-2000:]
    val = val_losses(records)
    assert val[0] == pytest.approx(math.log(256), abs=0.3)
    assert val[-1] < val[0] - 0.25, val
    assert all(math.isfinite(x) for x in losses(records))


def test_compiled_run_trains_as_the_eager_one(device, data_dir, tmp_path):
    """compile=true (inductor, compiled by Accelerate in prepare) gives the eager run's losses over
    4 steps within 1e-3 relative: fused kernels sum in other orders (fp32 differences ~1e-6),
    while a compiled graph that trained differently (a stale graph, a lost update) moves them by
    more than 1e-2."""
    if device == "cpu":
        pytest.skip("inductor's CPU compile takes ~30 s on a 2-core machine; tests/test_train.py::"
                    "test_compiled_run_saves_plain_gpt2_weights_and_resumes covers compile=true on the CPU")
    eager = losses(train_run(data_dir, tmp_path / "eager", *SHORT))
    compiled = losses(train_run(data_dir, tmp_path / "compiled", *SHORT, "--compile=true"))
    assert len(compiled) == len(eager) == 4
    np.testing.assert_allclose(compiled, eager, rtol=1e-3, atol=0)
    assert compiled[-1] < compiled[0]


def test_resumed_run_equals_the_straight_one(device, data_dir, tmp_path):
    """8 steps straight, or 4 then resumed for 4 (dropout 0.1, so the RNG state must come back).
    CPU: the same losses bit for bit. CUDA: within 1e-4 relative, not exact: SDPA's flash and
    memory-efficient backward kernels add in a nondeterministic order (fp32 differences ~1e-6 per
    step); a resume that lost the optimizer state, the data position or the RNG moves them by
    1e-3 or more."""
    common = ["--max_steps=8", "--lr_decay_steps=8", "--log_interval=1", "--eval_interval=4", "--eval_steps=1",
              "--ckpt_interval=4", "--dropout=0.1"]
    straight = train_run(data_dir, tmp_path / "straight", *common)
    train_run(data_dir, tmp_path / "resumed", *common, "--max_steps=4")
    resumed = train_run(data_dir, tmp_path / "resumed", *common, "--init_from=resume")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    if device == "cpu":
        assert losses(resumed) == losses(straight)
        assert val_losses(resumed) == val_losses(straight)
    else:
        np.testing.assert_allclose(losses(resumed), losses(straight), rtol=1e-4, atol=0)
        np.testing.assert_allclose(val_losses(resumed), val_losses(straight), rtol=1e-4, atol=0)


def test_gradient_checkpointing_trains_as_plain_blocks(device, data_dir, tmp_path):
    """4 steps with gradient_checkpointing=true against plain blocks, dropout 0.1 (the recompute
    must replay each block's dropout mask). CPU: the same losses bit for bit (the recompute runs
    the same kernels in the same order). CUDA: within 1e-4 relative (SDPA's nondeterministic
    backward, as for resume)."""
    common = [*SHORT, "--dropout=0.1"]
    plain = losses(train_run(data_dir, tmp_path / "plain", *common))
    checkpointed = losses(train_run(data_dir, tmp_path / "checkpointed", *common, "--gradient_checkpointing=true"))
    assert len(plain) == 4
    if device == "cpu":
        assert checkpointed == plain
    else:
        np.testing.assert_allclose(checkpointed, plain, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- DDP and FSDP


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_launched_run_equals_one_process(device, strategy, nproc, data_dir, tmp_path):
    """torchrun with `nproc` processes under Accelerate (DDP, or FSDP with full sharding), each
    reading 4 windows / nproc per micro-batch, against one in-process run accumulating the same
    windows: the same losses over 4 steps. CPU (gloo): within 1e-5 relative. CUDA (NCCL): within
    1e-4 relative (SDPA's nondeterministic backward; the all-reduce or reduce-scatter sums in its
    own order)."""
    if device == "cpu" and strategy == "fsdp":
        pytest.skip("FSDP is CUDA-only: on a CPU Accelerate turns an FSDP request into DDP "
                    "(tests/test_reliability.py checks that it says so)")
    if device == "cpu" and nproc == 2:
        pytest.skip("2 processes over gloo on the CPU: tests/test_train.py::test_two_processes_match_one")
    if device == "cuda" and nproc > devices.cuda_device_count():
        pytest.skip(TWO_GPUS)
    common = [*SHORT, f"--micro_batch_size={4 // nproc}"]
    launched_env = {"ACCELERATE_USE_CPU": "1" if device == "cpu" else None, **(FSDP_ENV if strategy == "fsdp" else {})}
    result = torchrun("train.py", *tiny_args(data_dir, tmp_path / "launched", *common, "--grad_accum_steps=2"),
                      nproc=nproc, env_extra=launched_env, timeout=240)
    assert result.returncode == 0, failure(result)
    # Accelerate runs a launched process as distributed even alone (torchrun sets LOCAL_RANK)
    backend = "gloo" if device == "cpu" else "nccl"
    spread = f"{'FSDP' if strategy == 'fsdp' else 'DDP'} over {backend}, {nproc} processes on {device}"
    assert spread in result.stdout, result.stdout[-2000:]
    launched = losses(read_log(tmp_path / "launched"))
    single = losses(train_run(data_dir, tmp_path / "single", *SHORT, "--micro_batch_size=4", "--grad_accum_steps=2"))
    assert len(launched) == 4
    np.testing.assert_allclose(launched, single, rtol=1e-5 if device == "cpu" else 1e-4, atol=0)


# --------------------------------------------------------------------------- inference


def tiny_hf(seed: int = 0):
    """A random transformers GPT-2 with the full GPT-2 vocabulary (the tokenizer's), its weights
    spread (x0.3) so that greedy tokens vary with the context and no two logits nearly tie."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf.eval()


PROMPTS = [[464, 2068, 7586], [50256], [15496, 11, 995, 0, 314, 716]]


@torch.no_grad()
def test_engine_greedy_equals_transformers(device, tmp_path):
    """The engine's greedy tokens (KV cache, one batch of three ragged prompts, fp32 with TF32
    off) equal transformers' GPT2LMHeadModel.generate on the same device, 16 tokens each, the
    weights moved into ours by the project's own loader (GPT.from_pretrained)."""
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).to(device).eval()
    hf = hf.to(device)
    with devices.exact_fp32():
        got = Engine(ours, max_batch=4).generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0.0))
        want = [hf.generate(torch.tensor([p], device=device), max_new_tokens=16, do_sample=False,
                            pad_token_id=50256)[0, len(p):].tolist() for p in PROMPTS]
    assert got == want
    assert all(len(set(tokens)) > 2 for tokens in got)  # the tokens vary: a broken model would repeat one


def test_serve_on_the_device_answers_the_openai_client(device, tmp_path):
    """serve.py --device `device` (fp32) answers a greedy completion through the openai client with
    transformers' greedy text on the CPU (8 tokens; TF32 on CUDA moves logits by ~1e-3, far less
    than the spread weights' gaps between the top two), and names the device in its start line."""
    import openai

    from tokenizer import gpt2_tokenizer

    hf = tiny_hf()
    run_dir = tmp_path / "tiny"
    hf.save_pretrained(tmp_path / "hf")
    save_weights(run_dir, 1, GPT.from_pretrained(tmp_path / "hf"))  # moved by the project's loader
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(run_dir), "--port", "0",
                             "--device", device, "--max_batch", "2"],
                            cwd=ROOT, env={**env(), "SERVE_API_KEY": "k"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    try:
        assert wait_until(lambda: any("http://" in line for line in lines) or proc.poll() is not None,
                          timeout=120, interval=0.2), "".join(lines)
        start = next((line for line in lines if "http://" in line), None)
        assert start is not None and proc.poll() is None, "".join(lines)
        assert f" {device}" in start, start
        base = start.rsplit("http://", 1)[1].split()[0].rstrip(".,)")
        client = openai.OpenAI(base_url=f"http://{base}/v1", api_key="k", max_retries=0, timeout=60)
        enc = gpt2_tokenizer()
        prompt = "Hello, world"
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        ids = enc.encode_ordinary(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=50256)
        assert answer.choices[0].text == enc.decode(want[0, len(ids):].tolist())
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 8
    finally:
        proc.kill()
        proc.wait()


def test_eval_val_on_the_device_equals_the_cpu(device, data_dir, tmp_path, capsys):
    """eval.py --task val over 10 windows (batches of 3, the last ragged) on `device` against the
    CPU in batches of 8, both --dtype float32. CPU: within 1e-6 relative (batching changes only
    the order of a sum). CUDA: within 1e-3 relative (inference allows TF32 matmuls there, 10-bit
    mantissa products summed in fp32: the mean over 640 tokens moves by ~1e-4 at most)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256))
    ckpt = save_weights(tmp_path / "run", 1, model)

    def val_loss(where: str, batch_size: int) -> dict:
        out = tmp_path / f"{where}-{batch_size}.json"
        code = eval_cli.main([str(a) for a in ("--checkpoint", ckpt, "--task", "val", "--data", data_dir,
                                               "--limit", 10, "--batch_size", batch_size, "--out", out,
                                               "--device", where, "--dtype", "float32")])
        assert code == 0, capsys.readouterr().err
        return json.loads(out.read_text())

    with devices.exact_fp32():  # restores the TF32 setting that loading for inference turns on (CUDA)
        got = val_loss(device, 3)
    want = val_loss("cpu", 8)
    assert got["tokens"] == want["tokens"] == 10 * 64
    assert want["loss"] == pytest.approx(math.log(256), abs=0.3)  # an untrained model: near uniform
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6 if device == "cpu" else 1e-3)
