"""train.py's optimizer choice: AdamW alone (the default) or torch.optim.Muon for the blocks'
matrices beside AdamW for the rest. Which parameter goes where, the checks on the muon fields,
one schedule driving both, exact resume, 2 processes = 1, and the refusals (the other
optimizer's checkpoint, FSDP, a torch without Muon). Real runs of configs/tiny.py throughout."""

import json
import math
import re

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import checkpoints
import train
import train_config
from conftest import ROOT, VOCAB, failure, read_log, tiny_args, torchrun, train_losses, train_main as main
from errors import ConfigError
from model import GPT, GPTConfig
from shards import ShardLoader, list_shards
from train import lr_at, make_optimizers, param_groups
from train_config import TrainConfig, with_derived

MUON = ["--optimizer=muon", "--muon_lr=0.02"]  # at tiny.py's width, a rate at which Muon visibly trains


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **overrides))


# ------------------------------------------------------------------ groups and config


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tie_embeddings):
    model = tiny_model(tie_embeddings=tie_embeddings)
    names = {id(p): n for n, p in model.named_parameters()}
    adamw, muon = make_optimizers(model, with_derived(TrainConfig.from_flat(optimizer="muon", learning_rate=1e-3), 1),
                                  torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert on_muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    decay, no_decay = adamw.param_groups
    on_adamw = {names[id(p)] for p in decay["params"]}
    expected = {"transformer.wte.weight", "transformer.wpe.weight"} | ({"lm_head.weight"} if not tie_embeddings else set())
    assert on_adamw == expected and decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name in (names[id(p)] for p in no_decay["params"]):
        assert name.endswith(".bias") or ".ln_" in name or "ln_f" in name, name
    every = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))  # each parameter exactly once
    assert muon.defaults["lr"] == 1e-3  # muon_lr=None: learning_rate


def test_adamw_default_is_todays_single_optimizer():
    model = tiny_model()
    cfg = with_derived(TrainConfig.from_flat(learning_rate=1e-3, weight_decay=0.05), 1)
    assert cfg.optimizer == "adamw" and cfg.muon_lr is None
    (adamw,) = make_optimizers(model, cfg, torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    for built, expected in zip(adamw.param_groups, param_groups(model, 0.05)):
        assert [id(p) for p in built["params"]] == [id(p) for p in expected["params"]]
        assert built["weight_decay"] == expected["weight_decay"]


def test_muon_fields_are_checked_together():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_flat(optimizer="muon", muon_lr=-1.0, muon_adjust_lr="spectral", muon_momentum=1.0,
                              muon_weight_decay=-0.1, mixed_precision="fp16")
    message = str(info.value)
    for text in ("muon_lr=-1.0 must be > 0", "muon_adjust_lr='spectral' must be one of", "muon_momentum=1.0 must be in [0, 1)",
                 "muon_weight_decay=-0.1 must be >= 0", "optimizer=muon does not run with mixed_precision='fp16'"):
        assert text in message, message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"optimizer='sgd' must be one of \('adamw', 'muon'\)"):
        TrainConfig.from_flat(optimizer="sgd")


def test_a_torch_without_muon_is_named(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")  # as in torch < 2.9, which the project still accepts for AdamW
    TrainConfig.from_flat()
    with pytest.raises(ConfigError, match=re.escape(f"optimizer=muon needs torch.optim.Muon, in torch >= 2.9; this "
                                                    f"torch is {torch.__version__}")):
        TrainConfig.from_flat(optimizer="muon")


def test_the_muon_config_is_valid():
    cfg = with_derived(train_config.load_config([str(ROOT / "configs" / "gpt2_124m_muon.py")]), world_size=8)
    assert (cfg.optimizer, cfg.tokens_per_step, cfg.grad_accum_steps) == ("muon", 524_288, 2)


# ----------------------------------------------------------------------------- schedule


def test_the_schedule_scales_each_optimizers_own_peak(data_dir):
    """Warmup and cosine move both optimizers by the same factor; AdamW's rate is lr_at's exactly."""
    cfg = with_derived(TrainConfig.from_flat(optimizer="muon", learning_rate=1e-3, min_lr=1e-4, muon_lr=0.05,
                                             warmup_steps=4, max_steps=20, n_layer=2, n_head=2, n_embd=32,
                                             block_size=32, vocab_size=VOCAB, micro_batch_size=2), 1)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB))
    accelerator = Accelerator(cpu=True)
    model, *optimizers = accelerator.prepare(model, *make_optimizers(model, cfg, accelerator.device))
    loader = ShardLoader(list_shards(data_dir, "train"), 32, 2, shuffle=True, seed=0)
    with train.StopSignal() as stop:
        for step in (0, 3, 12, 19):
            stats = train.train_step(model, optimizers, accelerator, loader, cfg, step, stop)
            adamw, muon = ([g["lr"] for g in opt.param_groups] for opt in optimizers)
            assert stats.lr == lr_at(step, cfg) and adamw == [lr_at(step, cfg)] * 2
            assert muon == [pytest.approx(lr_at(step, cfg) * 50)], step  # muon_lr / learning_rate = 50
    assert muon[0] == pytest.approx(0.05 * 0.1 + 0.5 * (1 + math.cos(math.pi * 15 / 16)) * (0.05 - 0.005))


# ------------------------------------------------------------------------- whole runs


def test_muon_resume_is_exact_and_the_other_optimizer_is_refused(data_dir, tmp_path):
    common = ["--max_steps=8", "--lr_decay_steps=8", "--log_interval=1", "--eval_interval=4", "--ckpt_interval=4",
              "--dropout=0.1", *MUON]
    main(*tiny_args(data_dir, tmp_path / "straight", *common))
    main(*tiny_args(data_dir, tmp_path / "resumed", *common, "--max_steps=4"))
    state = checkpoints.step_dir(tmp_path / "resumed", 4) / checkpoints.STATE_SUBDIR
    assert (state / "optimizer.bin").is_file() and (state / "optimizer_1.bin").is_file()  # AdamW's and Muon's
    muon_state = torch.load(state / "optimizer_1.bin", weights_only=True)
    assert len(muon_state["state"]) == 8 and all("momentum_buffer" in s for s in muon_state["state"].values())
    main(*tiny_args(data_dir, tmp_path / "resumed", *common, "--init_from=resume"))
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")  # bit for bit
    assert [r["val_loss"] for r in resumed if "val_loss" in r] == [r["val_loss"] for r in straight if "val_loss" in r]
    assert json.loads((tmp_path / "resumed" / "train_config.json").read_text())["optimizer"] == "muon"

    with pytest.raises(ConfigError, match=r"cannot resume .*step_0000008 with optimizer=adamw: it was trained with "
                                          r"optimizer=muon.*--optimizer=muon"):
        main(*tiny_args(data_dir, tmp_path / "resumed", "--max_steps=10", "--init_from=resume"))
    main(*tiny_args(data_dir, tmp_path / "adamw", "--max_steps=1"))
    with pytest.raises(ConfigError, match=r"with optimizer=muon: it was trained with optimizer=adamw"):
        main(*tiny_args(data_dir, tmp_path / "adamw", "--max_steps=2", "--init_from=resume", *MUON))


def test_muon_two_processes_match_one_and_learn(data_dir, tmp_path):
    """DDP all-reduces the gradients in backward, before Muon orthogonalises them: 2 processes with
    micro-batch 2 follow 1 process accumulating 2 micro-batches of 2, and both ranks end with the
    same weights. The tolerance is looser than AdamW's 1e-5: gradients equal to ~1e-7 can round
    apart in the bf16 Newton-Schulz iteration."""
    common = ["--max_steps=20", "--lr_decay_steps=20", "--log_interval=1", "--eval_interval=20",
              "--micro_batch_size=2", *MUON]
    result = torchrun(ROOT / "tests" / "ddp_worker.py", tmp_path / "ranks",
                      *tiny_args(data_dir, tmp_path / "ddp", *common, "--grad_accum_steps=1"))
    assert result.returncode == 0, failure(result)
    assert "DDP over gloo, 2 processes" in result.stdout
    main(*tiny_args(data_dir, tmp_path / "single", *common, "--grad_accum_steps=2"))

    np.testing.assert_allclose(train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single"), rtol=1e-3)
    rank0, rank1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt") for r in (0, 1))
    for name in rank0["weights"]:
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
    val = [r["val_loss"] for r in read_log(tmp_path / "single") if "val_loss" in r]
    assert val[-1] < val[0] - 0.2, val  # from ln(256) = 5.55 towards the corpus's ln(4) = 1.39


def test_muon_under_fsdp_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    with pytest.raises(ConfigError, match="optimizer=muon does not run under FSDP"):
        main(*tiny_args(data_dir, tmp_path / "run", "--max_steps=1", *MUON))
    assert not (tmp_path / "run").exists()
