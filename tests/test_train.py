"""train.py: schedule, optimizer groups, accumulation, resume, multi-process, signals."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import train
from model import GPT, GPTConfig
from shards import ShardLoader, list_shards
from errors import DivergenceError
from errors import ConfigError
from train import accumulate_gradients, lr_at, param_groups
from train_config import TrainConfig, with_derived

from conftest import ROOT, VOCAB, env as _env, failure, latest, tiny_args, torchrun


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def train_losses(out_dir):
    return [r["loss"] for r in read_log(out_dir) if "loss" in r]


# ---------------------------------------------------------- schedule and groups


def test_lr_schedule_endpoints():
    cfg = with_derived(TrainConfig.from_flat(warmup_steps=10, max_steps=200, lr_decay_steps=110, learning_rate=1.0,
                                              min_lr=0.1), 1)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # 1/10 of the peak on the first step
    assert lr_at(9, cfg) == pytest.approx(1.0)  # end of warmup: the peak
    assert lr_at(10, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the decay: the midpoint
    assert lr_at(110, cfg) == pytest.approx(0.1)  # lr_decay_steps: min_lr
    assert lr_at(199, cfg) == pytest.approx(0.1)  # and flat after
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_param_groups_cover_each_parameter_once():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    for name in (names[id(p)] for p in no_decay["params"]):
        assert name.endswith(".bias") or ".ln_" in name or "ln_f" in name, name


# ---------------------------------------------------------------- accumulation


def test_accumulation_matches_one_big_batch(data_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB))
    accelerator = Accelerator(cpu=True)
    paths = list_shards(data_dir, "train")

    def grads(micro_batch_size, micro_steps):
        model.zero_grad(set_to_none=True)
        accelerator.gradient_accumulation_steps = micro_steps
        loader = ShardLoader(paths, 32, micro_batch_size, shuffle=True, seed=3)
        loss = accumulate_gradients(model, accelerator, loader, micro_steps)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_accum, g_accum = grads(micro_batch_size=2, micro_steps=4)
    loss_big, g_big = grads(micro_batch_size=8, micro_steps=1)
    assert loss_accum.item() == pytest.approx(loss_big.item(), rel=1e-6)
    for name in g_big:
        torch.testing.assert_close(g_accum[name], g_big[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------- whole runs


def test_loss_falls_on_tiny_config(data_dir, tmp_path):
    model, progress = train.main(tiny_args(data_dir, tmp_path / "run", "--max_steps=120", "--eval_interval=120"))
    records = read_log(tmp_path / "run")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[0] == pytest.approx(math.log(VOCAB), abs=0.3)  # untrained: uniform over the vocabulary
    assert val[-1] < val[0] - 0.5
    assert progress["step"] == 120 and progress["tokens_seen"] == 120 * 4 * 64 * 2
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec"):
        assert key in records[1]
    effective = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert effective["max_steps"] == 120 and effective["tokens_per_step"] == 512
    # the final checkpoint is a GPT-2 directory holding the trained weights
    ckpt = latest(tmp_path / "run")
    assert ckpt.name == "step_0000120"
    reloaded = GPT.from_pretrained(ckpt)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_resume_is_exact(data_dir, tmp_path):
    common = ["--max_steps=8", "--lr_decay_steps=8", "--log_interval=1", "--eval_interval=4",
              "--ckpt_interval=4", "--dropout=0.1"]  # dropout: the RNG state must come back too
    train.main(tiny_args(data_dir, tmp_path / "straight", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(tiny_args(data_dir, tmp_path / "resumed", *common, "--max_steps=4"))
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(tiny_args(data_dir, tmp_path / "resumed", *common, "--init_from=resume"))
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")  # bit for bit
    assert [r["val_loss"] for r in resumed if "val_loss" in r] == [r["val_loss"] for r in straight if "val_loss" in r]
    kept = sorted(p.name for p in (tmp_path / "resumed" / "ckpt").iterdir())
    assert kept == ["step_0000004", "step_0000008"]  # keep_last_ckpts=2, no temporary leftovers


def test_scratch_run_refuses_a_used_out_dir(data_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--max_steps=2", "--lr_decay_steps=5"))
    before = {p: p.stat().st_mtime_ns for p in (out / "ckpt").rglob("*")}
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ConfigError, match="already holds checkpoints.*--init_from=resume.*--overwrite=true"):
        train.main(tiny_args(data_dir, out, "--max_steps=2", "--lr_decay_steps=5"))
    assert {p: p.stat().st_mtime_ns for p in (out / "ckpt").rglob("*")} == before  # untouched
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(tiny_args(data_dir, out, "--max_steps=1", "--lr_decay_steps=5", "--overwrite=true"))
    assert [p.name for p in (out / "ckpt").iterdir()] == ["step_0000001"]


def test_eval_steps_larger_than_val_split_is_an_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval_steps=1000 needs"):
        train.main(tiny_args(data_dir, tmp_path / "run", "--eval_steps=1000"))


def test_finetune_from_hf_dir_starts_at_its_loss(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(n_positions=64, n_embd=48, n_layer=2, n_head=3, vocab_size=VOCAB,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    # The loss of the HF model itself on the first eval windows (the val split read in order).
    loader = ShardLoader(list_shards(data_dir, "val"), 64, 4, shuffle=False)
    with torch.no_grad():
        batches = [loader.next_batch() for _ in range(2)]  # tiny.py: eval_steps = 2, micro-batch 4
        expected = np.mean([torch.nn.functional.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()).item()
                            for x, y in batches])
    _, progress = train.main(tiny_args(data_dir, tmp_path / "ft", f"--init_from={tmp_path / 'hf'}",
                                       "--max_steps=2", "--lr_decay_steps=5", "--n_layer=7"))
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ConfigError, match="block_size=128 exceeds the context"):
        train.main(tiny_args(data_dir, tmp_path / "ft2", f"--init_from={tmp_path / 'hf'}", "--block_size=128"))
    first_val = read_log(tmp_path / "ft")[0]
    assert first_val["step"] == 0 and first_val["val_loss"] == pytest.approx(expected, abs=1e-4)
    effective = json.loads((tmp_path / "ft" / "train_config.json").read_text())
    assert (effective["n_layer"], effective["n_embd"], effective["n_head"]) == (2, 48, 3)  # from the weights


def test_a_finetune_of_another_shape_resumes_with_the_same_command(data_dir, tmp_path, capsys):
    """configs/finetune_gpt2.py sets no shape: a fine-tune takes it from the weights, and so does its
    resume (from the run's train_config.json), bit for bit as a run that never stopped; a shape
    the command sets that the checkpoint does not have is refused naming both."""
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=3, n_embd=48, block_size=64, vocab_size=VOCAB)).save_pretrained(tmp_path / "hf")
    common = [str(ROOT / "configs" / "finetune_gpt2.py"), f"--data_dir={data_dir}", "--block_size=32",
              "--micro_batch_size=2", "--grad_accum_steps=1", "--lr_decay_steps=4", "--warmup_steps=1", "--eval_interval=2",
              "--eval_steps=1", "--ckpt_interval=2", "--log_interval=1", "--mixed_precision=no"]
    train.main([*common, f"--out_dir={tmp_path / 'straight'}", f"--init_from={tmp_path / 'hf'}", "--max_steps=4"])
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main([*common, f"--out_dir={tmp_path / 'resumed'}", f"--init_from={tmp_path / 'hf'}", "--max_steps=2"])
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    train.main([*common, f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_steps=4"])
    assert "resume: the model's shape as step_0000002 was trained: n_layer=2, n_head=3, n_embd=48, vocab_size=256" \
        in capsys.readouterr().out
    losses = {run: [r["loss"] for r in read_log(tmp_path / run) if "loss" in r] for run in ("straight", "resumed")}
    assert len(losses["straight"]) == 4 and losses["resumed"] == losses["straight"]
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ConfigError, match=r"does not match the checkpoint .*step_0000004: n_layer=3 \(checkpoint: 2\)"):
        train.main([*common, f"--out_dir={tmp_path / 'resumed'}", "--init_from=resume", "--max_steps=6", "--n_layer=3"])


def test_non_finite_loss_stops_with_the_step(data_dir, tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=VOCAB))
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(DivergenceError, match="loss is nan.* at step 1; stopping without saving. No checkpoint"):
        train.main(tiny_args(data_dir, tmp_path / "run", f"--init_from={tmp_path / 'broken'}"))
    assert not (tmp_path / "run" / "ckpt").exists()


# ------------------------------------------------------- real processes


def test_two_processes_match_one(data_dir, tmp_path):
    """torchrun with 2 processes (gloo DDP) and micro-batch 2 sees, per step, the same windows
    as 1 process accumulating 2 micro-batches of 2: the losses agree, the processes read
    disjoint windows and end with identical weights. Each has freed its DDP wrapper before the
    process group is destroyed (the wrapper's last reference to it could hang the exit)."""
    common = ["--max_steps=6", "--lr_decay_steps=6", "--log_interval=1", "--eval_interval=6",
              "--micro_batch_size=2"]
    result = torchrun(ROOT / "tests" / "ddp_worker.py", tmp_path / "ranks",
                      *tiny_args(data_dir, tmp_path / "ddp", *common, "--grad_accum_steps=1"))
    assert result.returncode == 0, failure(result)
    train.main(tiny_args(data_dir, tmp_path / "single", *common, "--grad_accum_steps=2"))

    np.testing.assert_allclose(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single"), rtol=1e-5)
    rank0 = torch.load(tmp_path / "ranks" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ranks" / "rank1.pt")
    assert len(rank0["window_ids"]) == len(rank1["window_ids"]) == 6 * 2
    assert not set(rank0["window_ids"]) & set(rank1["window_ids"])
    for name in rank0["weights"]:
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
    assert rank0["ddp_alive_at_destroy"] == rank1["ddp_alive_at_destroy"] == [0]


def test_sigterm_saves_a_loadable_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"),
         *tiny_args(data_dir, out, "--max_steps=100000", "--log_interval=1", "--ckpt_interval=100000")],
        env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any("loss" in r for r in (read_log(out) if (out / "log.jsonl").exists() else [])):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by SIGTERM" in output and "--init_from=resume" in output
    ckpt = latest(out)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] >= 1 and ckpt.name == f"step_{meta['step']:07d}"
    GPT.from_pretrained(ckpt)  # loads: complete, not half-written
    assert not list((out / "ckpt").glob(".tmp*"))


def test_chunked_and_full_heads_train_alike(data_dir, tmp_path):
    """configs/tiny.py (2 micro-steps of accumulation per step) with either loss head: the same
    losses for 8 steps, within 1e-4."""
    common = ["--max_steps=8", "--lr_decay_steps=8", "--log_interval=1", "--eval_interval=4"]
    train.main(tiny_args(data_dir, tmp_path / "chunked", *common, "--loss_impl=chunked"))
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(tiny_args(data_dir, tmp_path / "full", *common, "--loss_impl=full"))
    np.testing.assert_allclose(train_losses(tmp_path / "chunked"), train_losses(tmp_path / "full"), rtol=0, atol=1e-4)
    val = [[r["val_loss"] for r in read_log(tmp_path / run) if "val_loss" in r] for run in ("chunked", "full")]
    np.testing.assert_allclose(val[0], val[1], rtol=0, atol=1e-4)


def test_compiled_run_saves_plain_gpt2_weights_and_resumes(data_dir, tmp_path):
    """compile=true: Accelerate compiles the prepared model; checkpoints still hold GPT-2's names
    (no torch.compile prefix) and the trained weights, and a compiled run resumes from them."""
    from safetensors.torch import load_file

    common = ["--compile=true", "--lr_decay_steps=6", "--eval_steps=1"]
    model, _ = train.main(tiny_args(data_dir, tmp_path / "run", "--max_steps=2", *common))
    ckpt = latest(tmp_path / "run")
    assert not [k for k in load_file(ckpt / "model.safetensors") if "_orig_mod" in k]
    reloaded = GPT.from_pretrained(ckpt)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    AcceleratorState._reset_state(reset_partial_state=True)
    _, state = train.main(tiny_args(data_dir, tmp_path / "run", "--max_steps=3", "--init_from=resume", *common))
    assert state["step"] == 3 and math.isfinite(state["loss"])


# ------------------------------------------------------------- FSDP and CUDA settings


def test_fsdp_settings_this_loop_cannot_run_are_refused_in_one_line():
    """FSDP runs only on GPUs, so Accelerate's real FSDP plugin sits in a stand-in for the
    Accelerator here: the check reads nothing else of it."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin as Plugin

    def accelerator(plugin):
        return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))

    with pytest.raises(ConfigError, match="FSDP1 needs use_orig_params=true"):
        train.check_fsdp(accelerator(Plugin(fsdp_version=1, use_orig_params=False)))
    with pytest.raises(ConfigError, match="SHARDED_STATE_DICT; checkpoints need FULL_STATE_DICT"):
        train.check_fsdp(accelerator(Plugin(fsdp_version=2)))  # FSDP2's default
    train.check_fsdp(accelerator(Plugin(fsdp_version=1, use_orig_params=True)))
    train.check_fsdp(accelerator(Plugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")))
    train.check_fsdp(Accelerator(cpu=True))  # no FSDP: nothing to check
    AcceleratorState._reset_state(True)


def test_the_resume_line_says_when_no_cuda_random_state_comes_with_the_checkpoint(data_dir, tmp_path):
    from run_dir import Resume, TrainState

    out = tmp_path / "run"
    train.main(tiny_args(data_dir, out, "--max_steps=2"))
    meta = json.loads((latest(out) / "meta.json").read_text())
    assert meta["device"] == "cpu"  # recorded beside the step, for the resume to compare
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    for saved_on in ("cpu", None):
        note = Resume(latest(out), TrainState(device=saved_on), {}, None).rng_note(cuda)
        assert "no CUDA random state" in note and (saved_on or "does not record") in note
    assert Resume(latest(out), TrainState(device="cuda"), {}, None).rng_note(cuda) == ""
    assert Resume(latest(out), TrainState(device="cpu"), {}, None).rng_note(torch.device("cpu")) == ""
