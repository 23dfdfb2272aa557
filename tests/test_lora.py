"""LoRA fine-tuning (lora.py, through peft): a tiny random GPT-2 directory, fine-tuned with
lora_rank=4 for a few steps on the Markov corpus. The base stays byte-identical, the checkpoint
holds the adapter in PEFT's layout, peft loads it onto transformers' GPT2LMHeadModel with the
logits of this project's merged model, a resume repeats the straight run, 2 processes match 1,
sample/eval/serve load the run, and a moved base or a bad config value is a one-line error."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

import checkpoints
import lora
import train
from conftest import (ROOT, assert_one_line_error, env, failure, latest, read_log, run_command, torchrun,
                      train_losses, wait_until)
from errors import CheckpointError, ConfigError
from model import GPT, GPTConfig

peft = pytest.importorskip("peft")

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)  # GPT-2's vocabulary: sample and serve tokenize


def lora_args(data_dir, base, out_dir, *extra) -> list[str]:
    # No config file: its n_layer/n_embd would contradict the base's shape on a resume.
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--init_from={base}", "--block_size=32",
            "--lora_rank=4", "--lora_alpha=8", "--learning_rate=1e-2", "--min_lr=1e-3", "--max_steps=4", "--lr_decay_steps=4", "--warmup_steps=1",
            "--log_interval=1", "--eval_interval=2", "--eval_steps=2", "--ckpt_interval=2", "--micro_batch_size=2",
            *extra]


def tree_hashes(directory) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("lora_base") / "gpt2-tiny"
    GPT(GPTConfig(**SHAPE)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run(base, data_dir, tmp_path_factory):
    """A finished LoRA run: (out_dir, the base's file hashes before it, its console lines)."""
    before = tree_hashes(base)
    out = tmp_path_factory.mktemp("lora_run") / "run"
    lines = []
    AcceleratorState._reset_state(reset_partial_state=True)
    import tqdm.auto

    write = tqdm.auto.tqdm.write
    tqdm.auto.tqdm.write = lambda msg, *a, **k: (lines.append(msg), write(msg, *a, **k))
    try:
        train.main(lora_args(data_dir, base, out))
    finally:
        tqdm.auto.tqdm.write = write
        AcceleratorState._reset_state(reset_partial_state=True)
    return out, before, lines


def test_run_trains_the_adapter_only_and_checkpoints_it_in_peft_layout(run, base):
    out, before, lines = run
    assert tree_hashes(base) == before  # the base directory is byte-identical
    start = [line for line in lines if line.startswith("LoRA rank 4 on c_attn,c_proj,c_fc: ")]
    # per block: c_attn 4 x (32 + 96), attn.c_proj 4 x (32 + 32), c_fc 4 x (32 + 128), mlp.c_proj 4 x (128 + 32)
    assert start and start[0].split(": ")[1].startswith(f"{2 * 4 * (128 + 64 + 160 + 160):,} trainable of "), lines
    ckpt = latest(out)
    names = set(tree_hashes(ckpt))
    assert {lora.ADAPTER_CONFIG_FILE, lora.ADAPTER_WEIGHTS_FILE, lora.BASE_FILE, "meta.json",
            "train_config.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names  # not a copy of the weights
    meta = checkpoints.verify(ckpt, need_state=True)
    assert set(meta["files"]) == names - {"meta.json"}  # hashed like every checkpoint
    config = json.loads((ckpt / lora.ADAPTER_CONFIG_FILE).read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 4
    assert config["base_model_name_or_path"] == str(base.resolve())
    record = json.loads((ckpt / lora.BASE_FILE).read_text())
    assert record["sha256"] == hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    losses = train_losses(out)
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_peft_on_gpt2lmheadmodel_matches_the_export(run, base, tmp_path):
    transformers = pytest.importorskip("transformers")
    import export

    out, _, _ = run
    ckpt = latest(out)
    export.export(out, tmp_path / "exported")
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    assert not (tmp_path / "exported" / "state").exists()
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(base)
    adapted = peft.PeftModel.from_pretrained(hf_base, ckpt).eval()  # as it is
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    ours = checkpoints.load_model(ckpt).eval()
    assert any(float(p.abs().max()) > 0 for n, p in adapted.named_parameters() if "lora_B" in n)  # it trained
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = exported(idx).logits
        torch.testing.assert_close(adapted(idx).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(idx)[0], want, atol=1e-5, rtol=1e-5)
        plain = transformers.GPT2LMHeadModel.from_pretrained(base).eval()  # from_pretrained above adapted hf_base in place
        assert not torch.allclose(plain(idx).logits, want, atol=1e-4)  # the adapter changed something


def test_resume_equals_straight(base, data_dir, tmp_path):
    common = ["--lora_dropout=0.1"]  # the RNG state must come back too
    train.main(lora_args(data_dir, base, tmp_path / "straight", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(lora_args(data_dir, base, tmp_path / "resumed", *common, "--max_steps=2"))
    AcceleratorState._reset_state(reset_partial_state=True)
    args = lora_args(data_dir, base, tmp_path / "resumed", *common)
    train.main([a if not a.startswith("--init_from=") else "--init_from=resume" for a in args])
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")  # bit for bit
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ConfigError, match="lora_rank=0 .*rank 4"):
        train.main([a if not a.startswith("--init_from=") else "--init_from=resume" for a in args]
                   + ["--lora_rank=0", "--max_steps=6", "--lr_decay_steps=6"])


def test_two_processes_match_one(base, data_dir, tmp_path):
    common = ["--micro_batch_size=1"]
    result = torchrun(ROOT / "train.py", *lora_args(data_dir, base, tmp_path / "ddp", *common, "--grad_accum_steps=1",
                                                    "--micro_batch_size=1"))
    assert result.returncode == 0, failure(result)
    train.main(lora_args(data_dir, base, tmp_path / "single", *common, "--grad_accum_steps=2"))
    np.testing.assert_allclose(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single"), rtol=1e-5)


@pytest.mark.parametrize("value, key", [("--lora_rank=-1", "lora_rank=-1"),
                                        ("--lora_targets=c_attn,wte", "lora_targets='c_attn,wte'"),
                                        ("--lora_alpha=0", "lora_alpha=0"),
                                        ("--optimizer=muon", "optimizer=muon")])
def test_bad_values_are_one_line_errors(base, data_dir, tmp_path, value, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")) as err:
        train.main(lora_args(data_dir, base, tmp_path / "run", value))
    assert "\n" not in str(err.value)


def test_bad_value_from_the_command_line(base, data_dir, tmp_path):
    proc = run_command("train.py", *lora_args(data_dir, base, tmp_path / "run", "--lora_alpha=0"))
    assert_one_line_error(proc, "lora_alpha=0")


def test_sample_and_eval_load_the_run(run, data_dir):
    out, _, _ = run
    proc = run_command("sample.py", "--checkpoint", out, "--prompt", "Hello", "--max_new_tokens", "4",
                       "--device", "cpu", "--dtype", "float32", "--seed", "1")
    assert proc.returncode == 0, failure(proc)
    assert f"loaded {latest(out)}" in proc.stderr
    proc = run_command("eval.py", "--checkpoint", out, "--device", "cpu", "--dtype", "float32", "--task", "val",
                       "--data", data_dir, "--limit", "4", "--batch_size", "2", "--block_size", "32")
    assert proc.returncode == 0, failure(proc)
    assert f"loaded {latest(out)}" in proc.stderr


def test_serve_loads_the_run(run):
    import socket
    import urllib.request

    out, _, _ = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(out), "--port", str(port), "--device",
                             "cpu", "--dtype", "float32"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
            except OSError:
                return proc.poll() is not None

        assert wait_until(up, timeout=120, interval=0.2) and proc.poll() is None, proc.stderr.read()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                         data=json.dumps({"prompt": "Hi", "max_tokens": 3}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and json.loads(response.read())["choices"]
    finally:
        proc.kill()
        proc.wait()


def test_a_moved_base_is_a_one_line_error(run, base, tmp_path):
    out, _, _ = run
    moved = base.with_name(base.name + "-moved")
    base.rename(moved)
    try:
        proc = run_command("sample.py", "--checkpoint", latest(out), "--max_new_tokens", "2", "--device", "cpu")
        assert_one_line_error(proc, str(base / "model.safetensors"), "moved")
        with pytest.raises(CheckpointError, match="base model .* is gone"):
            checkpoints.load_model(latest(out))
    finally:
        moved.rename(base)


def test_a_changed_base_is_an_error(run, base, tmp_path):
    out, _, _ = run
    copy = tmp_path / "ckpt"
    shutil.copytree(latest(out), copy)
    record = json.loads((copy / lora.BASE_FILE).read_text())
    (copy / lora.BASE_FILE).write_text(json.dumps({**record, "sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="changed"):
        checkpoints.load_model(copy)


def test_a_missing_peft_is_a_one_line_error(run, base, data_dir, tmp_path, monkeypatch):
    out, _, _ = run
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, find_spec finds nothing
    with pytest.raises(ConfigError, match=r"lora_rank > 0 needs peft: pip install -e '\.\[lora\]'"):
        train.main(lora_args(data_dir, base, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[lora\]'"):
        checkpoints.load_model(latest(out))


def test_fsdp_is_refused_with_lora(base, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="lora_rank > 0 does not run under FSDP"):
        train.main(lora_args(data_dir, base, tmp_path / "run"))


# ------------------------------------------------------------------ a base with no directory of its own


def scratch_args(data_dir, out_dir, *extra) -> list[str]:
    shape = [f"--{k}={v}" for k, v in SHAPE.items()]
    return lora_args(data_dir, "scratch", out_dir, *shape, *extra)


def train_main(args):
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def scratch_run(data_dir, tmp_path_factory):
    """A finished LoRA run with init_from=scratch: its out_dir."""
    out = tmp_path_factory.mktemp("lora_scratch") / "run"
    train_main(scratch_args(data_dir, out))
    return out


def test_scratch_run_saves_its_base_and_names_it(scratch_run):
    from accelerate.utils import set_seed

    base = scratch_run / lora.RUN_BASE_SUBDIR
    assert checkpoints.is_weights_dir(base) and {"config.json", "model.safetensors"} <= set(tree_hashes(base))
    ckpt = latest(scratch_run)
    assert json.loads((ckpt / lora.ADAPTER_CONFIG_FILE).read_text())["base_model_name_or_path"] == str(base.resolve())
    assert json.loads((ckpt / lora.BASE_FILE).read_text())["path"] == str(base.resolve())
    set_seed(1337)  # the base is the seeded random model of any scratch run with this shape
    fresh = GPT(GPTConfig(**SHAPE)).state_dict()
    saved = checkpoints.load_model(base).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in fresh.items())
    val = [r["val_loss"] for r in read_log(scratch_run) if "val_loss" in r]
    assert len(train_losses(scratch_run)) == 4 and val[-1] < val[0]  # the adapter alone lowers the loss


def test_scratch_run_loads_in_peft_and_sample(scratch_run):
    transformers = pytest.importorskip("transformers")
    ckpt = latest(scratch_run)
    hf_base = transformers.GPT2LMHeadModel.from_pretrained(scratch_run / lora.RUN_BASE_SUBDIR)
    adapted = peft.PeftModel.from_pretrained(hf_base, ckpt).eval()
    assert any(float(p.abs().max()) > 0 for n, p in adapted.named_parameters() if "lora_B" in n)  # it trained
    ours = checkpoints.load_model(ckpt).eval()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], adapted(idx).logits, atol=1e-5, rtol=1e-5)
    proc = run_command("sample.py", "--checkpoint", scratch_run, "--prompt", "Hello", "--max_new_tokens", "4",
                       "--device", "cpu", "--dtype", "float32", "--seed", "1")
    assert proc.returncode == 0, failure(proc)
    assert f"loaded {ckpt}" in proc.stderr


def test_scratch_resume_equals_straight(data_dir, tmp_path):
    common = ["--lora_dropout=0.1"]
    train_main(scratch_args(data_dir, tmp_path / "straight", *common))
    train_main(scratch_args(data_dir, tmp_path / "resumed", *common, "--max_steps=2"))
    base = tree_hashes(tmp_path / "resumed" / lora.RUN_BASE_SUBDIR)
    args = scratch_args(data_dir, tmp_path / "resumed", *common)
    train_main([a if not a.startswith("--init_from=") else "--init_from=resume" for a in args])
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")  # bit for bit
    assert tree_hashes(tmp_path / "resumed" / lora.RUN_BASE_SUBDIR) == base  # written once, used by the resume


def test_scratch_overwrite_replaces_the_base(data_dir, tmp_path):
    out = tmp_path / "run"
    train_main(scratch_args(data_dir, out, "--max_steps=2"))
    before = tree_hashes(out / lora.RUN_BASE_SUBDIR)
    with pytest.raises(ConfigError, match="already holds"):
        train_main(scratch_args(data_dir, out, "--max_steps=2", "--seed=7"))
    train_main(scratch_args(data_dir, out, "--max_steps=2", "--seed=7", "--overwrite=true"))
    after = tree_hashes(out / lora.RUN_BASE_SUBDIR)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]
    checkpoints.load_model(latest(out))  # the new adapter names the new base, hash and all


def test_a_foreign_lora_base_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    (out / lora.RUN_BASE_SUBDIR / "mine").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"{lora.RUN_BASE_SUBDIR}.*nothing was changed"):
        train_main(scratch_args(data_dir, out))
    assert (out / lora.RUN_BASE_SUBDIR / "mine").is_dir()


def test_scratch_needs_bias(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="bias=true") as err:
        train_main(scratch_args(data_dir, tmp_path / "run", "--bias=false"))
    assert "\n" not in str(err.value)


def test_a_lora_checkpoint_as_init_from(run, data_dir, tmp_path):
    """Its base and adapter, merged, are the new run's frozen base, saved in its out_dir."""
    parent = latest(run[0])
    out = tmp_path / "child"
    train_main(lora_args(data_dir, parent, out, "--max_steps=2"))
    merged = checkpoints.load_model(parent).eval()
    base = checkpoints.load_model(out / lora.RUN_BASE_SUBDIR).eval()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in merged.state_dict().items())
    record = json.loads((latest(out) / lora.BASE_FILE).read_text())
    assert record["path"] == str((out / lora.RUN_BASE_SUBDIR).resolve())
    checkpoints.load_model(latest(out))
    train_main(lora_args(data_dir, parent, tmp_path / "full", "--max_steps=2", "--lora_rank=0"))  # a full fine-tune
    assert not (tmp_path / "full" / lora.RUN_BASE_SUBDIR).exists()
