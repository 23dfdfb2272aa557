"""train_config.py: config files and --key=value overrides, their errors, validation, derivation."""

import dataclasses

import pytest

from conftest import ROOT
from errors import ConfigError
from model import GPTConfig
from train_config import TrainConfig, load_config, with_derived


def test_config_file_and_overrides_convert_types(tmp_path):
    cfg_file = tmp_path / "run.py"
    cfg_file.write_text("max_steps = 7\nlearning_rate = 1  # an int is fine for a float field\n")
    cfg = load_config([str(cfg_file), "--compile=false", "--min_lr=3e-5", "--lr_decay_steps=none",
                       "--micro_batch_size=4", "--mixed_precision=bf16"])
    assert cfg.max_steps == 7 and cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.compile is False and cfg.min_lr == 3e-5 and cfg.lr_decay_steps is None
    assert cfg.micro_batch_size == 4 and cfg.mixed_precision == "bf16"


def test_config_typos_and_type_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'learnig_rate'.*did you mean 'learning_rate'"):
        load_config(["--learnig_rate=1e-3"])
    cfg_file = tmp_path / "run.py"
    cfg_file.write_text("max_step = 10\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_step'.*'max_steps'"):
        load_config([str(cfg_file)])
    cfg_file.write_text("max_steps = '10'\n")
    with pytest.raises(ConfigError, match="max_steps='10': expected int"):
        load_config([str(cfg_file)])
    with pytest.raises(ConfigError, match="--max_steps='ten': expected int"):
        load_config(["--max_steps=ten"])
    with pytest.raises(ConfigError, match="--compile='maybe': expected a bool"):
        load_config(["--compile=maybe"])
    with pytest.raises(ConfigError, match="expected --field=value"):
        load_config(["--max_steps", "10"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "missing.py")])


def test_validate_collects_every_problem_and_derives_accumulation():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_flat(n_embd=100, n_head=3, min_lr=1.0, learning_rate=0.1, mixed_precision="fp8")
    message = str(err.value)
    for part in ("n_embd (100) must be divisible by n_head (3)", "min_lr=1.0", "mixed_precision='fp8'"):
        assert part in message
    with pytest.raises(ConfigError, match="bias=False cannot be checkpointed"):  # before training, not at the first save
        TrainConfig.from_flat(bias=False)
    # tokens_per_step fixes the accumulation for the number of processes
    cfg = with_derived(TrainConfig.from_flat(micro_batch_size=4, block_size=256, tokens_per_step=8192), world_size=2)
    assert cfg.grad_accum_steps == 4 and cfg.tokens_per_step == 8192 and cfg.lr_decay_steps == cfg.max_steps
    with pytest.raises(ConfigError, match="tokens_per_step=10000 is not divisible"):
        with_derived(TrainConfig.from_flat(micro_batch_size=4, block_size=256, tokens_per_step=10000), world_size=2)
    with pytest.raises(ConfigError, match="grad_accum_steps=3 contradicts tokens_per_step=8192"):
        with_derived(TrainConfig.from_flat(micro_batch_size=4, block_size=256, tokens_per_step=8192,
                                          grad_accum_steps=3), 2)


def test_the_config_is_built_once_and_what_is_derived_is_a_new_config():
    cfg = load_config(["--n_layer=4", "--block_size=32", "--micro_batch_size=2", "--max_steps=3"])
    assert cfg.model == GPTConfig(n_layer=4, block_size=32) and not hasattr(cfg, "n_layer")  # the model's fields, once
    derived = with_derived(cfg, world_size=2)
    assert (derived.grad_accum_steps, derived.tokens_per_step, derived.warmup_steps, derived.lr_decay_steps) == \
        (1, 2 * 2 * 32, 3, 3)
    assert (cfg.grad_accum_steps, cfg.tokens_per_step, cfg.warmup_steps, cfg.lr_decay_steps) == (None, None, 100, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_steps = 5
    flat = derived.to_flat()
    assert flat["n_layer"] == 4 and "model" not in flat
    assert TrainConfig.from_flat(**flat) == derived  # train_config.json reads back as the same config


@pytest.mark.parametrize("name", ["tiny", "small", "gpt2_124m", "finetune_gpt2"])
def test_shipped_configs_are_valid(name, tmp_path):
    extra = [f"--init_from={tmp_path}"] if name == "finetune_gpt2" else []
    cfg = with_derived(load_config([str(ROOT / "configs" / f"{name}.py"), *extra]), world_size=1)
    assert cfg.tokens_per_step == cfg.micro_batch_size * cfg.model.block_size * cfg.grad_accum_steps
    if name == "gpt2_124m":  # ~0.5M tokens per step on 1 or 8 GPUs
        assert cfg.tokens_per_step == 524_288
        assert with_derived(load_config([str(ROOT / "configs" / "gpt2_124m.py")]), world_size=8).grad_accum_steps == 2
