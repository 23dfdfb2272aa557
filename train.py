"""Train GPT-2 on token shards with a hand-written loop that Accelerate carries to any hardware.

    python train.py configs/small.py [--field=value ...]
    accelerate launch train.py configs/small.py --micro_batch_size=16
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train.py configs/tiny.py

setup: config -> Accelerator -> model -> optimizer -> data; fit: the loop; evaluate; checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, get_args, get_origin, get_type_hints

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from model import GPT, GPTConfig
from shards import ShardError, ShardLoader, list_shards

CKPT_SUBDIR = "ckpt"
STATE_SUBDIR = "state"  # optimizer, RNG and scaler state, written by Accelerate


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Every training knob with its default. Config files and --field=value set these."""

    # data and outputs
    data_dir: str = "data/shakespeare"  # holds train_*.bin and val_*.bin (prepare_data.py)
    out_dir: str = "out/run"  # checkpoints, log.jsonl, config.json
    init_from: str = "scratch"  # "scratch", "resume" (latest checkpoint in out_dir) or a GPT-2 dir
    overwrite: bool = False  # let a scratch run replace the checkpoints already in out_dir
    seed: int = 1337
    # model shape (with init_from a GPT-2 dir the shape comes from its weights, and block_size,
    # the training window, may be shorter than its context)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"  # "sdpa" or "manual"
    gradient_checkpointing: bool = False  # recompute blocks in backward: less memory, one more forward
    # batch: one optimizer step sees micro_batch_size x grad_accum_steps x processes sequences
    micro_batch_size: int = 8
    grad_accum_steps: Optional[int] = None  # None: 1, or derived from tokens_per_step
    tokens_per_step: Optional[int] = None  # global batch in tokens; sets grad_accum_steps
    # optimizer and schedule (step = one optimizer update)
    max_steps: int = 1000
    warmup_steps: int = 100
    lr_decay_steps: Optional[int] = None  # end of the cosine; None: max_steps
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between evals (also at step 0 and the last step)
    eval_steps: int = 20  # micro-batches per eval, per process
    log_interval: int = 10
    ckpt_interval: int = 500  # steps between checkpoints (also at the last step)
    keep_last_ckpts: int = 2
    # speed
    mixed_precision: str = "no"  # "no", "bf16", "fp16", or "auto" (bf16 where the device runs it natively)
    compile: bool = False  # torch.compile (inductor; works on CPU too)
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU in the logs; 0: MFU not shown
    # extras
    log_with: str = ""  # an Accelerate tracker: "tensorboard", "wandb", ...
    plot: bool = False  # write out_dir/loss.png at the end (needs matplotlib)


MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")


class ConfigError(ValueError):
    """A config problem the user must fix; the message names every bad key."""


def _field_types() -> dict[str, type]:
    return get_type_hints(TrainConfig)


def _closest(name: str) -> str:
    match = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(TrainConfig)], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _convert(name: str, value, from_string: bool):
    """Check (config file) or convert (command line) one value to its field's type."""
    hint = _field_types()[name]
    optional = get_origin(hint) is not None and type(None) in get_args(hint)
    base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    if from_string:
        text = value.strip()
        if optional and text.lower() in ("none", "null", ""):
            return None
        if base is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"--{name}={value!r}: expected a bool (true/false)")
        try:
            if base is int:
                number = float(text)  # accepts 1e6 style too, but only whole numbers
                if not number.is_integer():
                    raise ValueError
                return int(number)
            return base(text)
        except ValueError:
            raise ConfigError(f"--{name}={value!r}: expected {base.__name__}") from None
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{name}={value!r}: expected {base.__name__}, got {type(value).__name__}")
    return value


def load_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from an optional config file (first argument) and --field=value overrides.

    A config file is Python whose top-level assignments set fields. Unknown names, values of the
    wrong type and malformed arguments raise ConfigError naming them.
    """
    values: dict = {}
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = Path(args.pop(0))
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        scope: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), scope)
        names = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
                 and type(v).__name__ != "module"}
        for key, value in names.items():
            if key not in _field_types():
                raise ConfigError(f"{path}: unknown config key {key!r}{_closest(key)}")
            values[key] = _convert(key, value, from_string=False)
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --field=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in _field_types():
            raise ConfigError(f"unknown config key {key!r}{_closest(key)}")
        values[key] = _convert(key, value, from_string=True)
    return TrainConfig(**values)


def validate(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Check every value and derive grad_accum_steps, lr_decay_steps, tokens_per_step.

    Collects all problems into one ConfigError. Returns the completed config.
    """
    problems = []

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "micro_batch_size",
                 "max_steps", "eval_interval", "eval_steps", "log_interval", "ckpt_interval",
                 "keep_last_ckpts"):
        need(getattr(cfg, name) >= 1, f"{name}={getattr(cfg, name)} must be >= 1")
    need(cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps} must be >= 0")
    need(cfg.n_embd % cfg.n_head == 0, f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
    need(0.0 <= cfg.dropout < 1.0, f"dropout={cfg.dropout} must be in [0, 1)")
    need(cfg.learning_rate > 0, f"learning_rate={cfg.learning_rate} must be > 0")
    need(0 <= cfg.min_lr <= cfg.learning_rate, f"min_lr={cfg.min_lr} must be in [0, learning_rate={cfg.learning_rate}]")
    need(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} must be >= 0")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, f"beta1={cfg.beta1}, beta2={cfg.beta2} must be in [0, 1)")
    need(cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip} must be >= 0 (0 disables)")
    need(cfg.mixed_precision in MIXED_PRECISION, f"mixed_precision={cfg.mixed_precision!r} must be one of {MIXED_PRECISION}")
    need(cfg.attention in ("sdpa", "manual"), f"attention={cfg.attention!r} must be 'sdpa' or 'manual'")
    need(cfg.peak_flops >= 0, f"peak_flops={cfg.peak_flops} must be >= 0")
    need(cfg.init_from in ("scratch", "resume") or Path(cfg.init_from).is_dir(),
         f"init_from={cfg.init_from!r} must be 'scratch', 'resume' or an existing GPT-2 directory")

    sequences_per_micro_step = cfg.micro_batch_size * world_size
    if cfg.tokens_per_step is not None:
        per_micro = sequences_per_micro_step * cfg.block_size
        if cfg.tokens_per_step % per_micro:
            problems.append(
                f"tokens_per_step={cfg.tokens_per_step} is not divisible by micro_batch_size x "
                f"block_size x processes = {cfg.micro_batch_size} x {cfg.block_size} x {world_size} = {per_micro}"
            )
        else:
            derived = cfg.tokens_per_step // per_micro
            if cfg.grad_accum_steps not in (None, derived):
                problems.append(
                    f"grad_accum_steps={cfg.grad_accum_steps} contradicts tokens_per_step="
                    f"{cfg.tokens_per_step}, which needs {derived} on {world_size} process(es)"
                )
            cfg.grad_accum_steps = derived
    if cfg.grad_accum_steps is None:
        cfg.grad_accum_steps = 1
    need(cfg.grad_accum_steps >= 1, f"grad_accum_steps={cfg.grad_accum_steps} must be >= 1")
    cfg.tokens_per_step = sequences_per_micro_step * cfg.block_size * cfg.grad_accum_steps

    if cfg.lr_decay_steps is None:
        cfg.lr_decay_steps = cfg.max_steps
    need(cfg.lr_decay_steps >= cfg.warmup_steps,
         f"lr_decay_steps={cfg.lr_decay_steps} must be >= warmup_steps={cfg.warmup_steps}")
    if cfg.plot:
        import importlib.util

        need(importlib.util.find_spec("matplotlib") is not None,
             "plot=true needs matplotlib: pip install -e '.[plot]'")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


# ------------------------------------------------------------------ optimisation


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup to learning_rate over warmup_steps (step 0 gets learning_rate / warmup_steps,
    step warmup_steps - 1 the full rate), then cosine decay to min_lr at lr_decay_steps, then flat.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= cfg.lr_decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (cfg.lr_decay_steps - cfg.warmup_steps)  # in [0, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (matmul weights, embeddings), none on biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied matrix appears once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel does the whole update in one pass; CUDA and CPU have it (torch >= 2.4).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused
    )


# ------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in out_dir/ckpt, oldest first (temporary directories excluded)."""
    root = Path(out_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "meta.json").is_file())


def find_checkpoint(path: str | Path) -> Path:
    """A directory with GPT-2 weights: a checkpoint, a HF GPT-2 dir, or a run's latest checkpoint.

    Raises FileNotFoundError naming the path when it holds none of these.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    if (path / "config.json").is_file() and path.is_dir() and any(
        (path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")
    ):
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(
            f"{path} holds no checkpoint: expected config.json + model.safetensors, or {CKPT_SUBDIR}/step_*/"
        )
    return found[-1]


def save_checkpoint(accelerator: Accelerator, model, cfg: TrainConfig, progress: dict, raw_model: GPT) -> Path:
    """Write out_dir/ckpt/step_XXXXXXX atomically; keep the last keep_last_ckpts.

    Layout: config.json + model.safetensors (GPT-2's HF format, from the unwrapped model, so the
    directory works with sample.py, init_from and transformers), state/ (optimizer, RNG, scaler,
    from Accelerate), train_config.json and meta.json (step, tokens seen, loader position).
    Everything goes into a temporary directory that is renamed into place when complete.
    """
    root = Path(cfg.out_dir) / CKPT_SUBDIR
    final = root / f"step_{progress['step']:07d}"
    tmp = root / f".tmp_step_{progress['step']:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash mid-save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_SUBDIR))
    full_weights = accelerator.get_state_dict(model)  # collective under FSDP: every process calls it
    if accelerator.is_main_process:
        raw_model.save_pretrained(tmp, state_dict=full_weights)
        (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps(progress, indent=2) + "\n")
        if final.exists():  # the same step saved before: swap, so one complete copy always exists
            previous = root / f".old_step_{progress['step']:07d}"
            final.rename(previous)
            tmp.rename(final)
            shutil.rmtree(previous)
        else:
            tmp.rename(final)
        for old in checkpoint_dirs(cfg.out_dir)[: -cfg.keep_last_ckpts]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _skip_model_weights_in_state(accelerator: Accelerator) -> None:
    """Let Accelerate's save/load_state handle optimizer and RNG state but not the weights, which
    live once in the checkpoint's HF-format model.safetensors. FSDP keeps its own handling."""

    def on_save(models, weights, output_dir):
        weights.clear()

    def on_load(models, input_dir):
        models.clear()  # the weights were already loaded from model.safetensors before prepare()

    if accelerator.distributed_type != DistributedType.FSDP:
        accelerator.register_save_state_pre_hook(on_save)
        accelerator.register_load_state_pre_hook(on_load)


# ------------------------------------------------------------------------- setup


def build_model(cfg: TrainConfig, log) -> tuple[GPT, Path | None]:
    """The model for cfg.init_from, and the checkpoint to resume from (or None)."""
    runtime = dict(dropout=cfg.dropout, gradient_checkpointing=cfg.gradient_checkpointing, attention=cfg.attention)
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_FIELDS}, **runtime)), None
    if cfg.init_from == "resume":
        found = checkpoint_dirs(cfg.out_dir)
        if not found:
            raise ConfigError(f"init_from=resume but {cfg.out_dir}/{CKPT_SUBDIR} holds no checkpoint")
        ckpt = found[-1]
        model = GPT.from_pretrained(ckpt, **runtime)
        mismatched = [f"{k}={getattr(cfg, k)} (checkpoint: {getattr(model.config, k)})"
                      for k in MODEL_FIELDS if getattr(cfg, k) != getattr(model.config, k)]
        if mismatched:
            raise ConfigError(f"config does not match the checkpoint {ckpt}: " + ", ".join(mismatched))
        return model, ckpt
    log(f"fine-tuning from {cfg.init_from}")
    model = GPT.from_pretrained(cfg.init_from, **runtime)
    # The shape comes from the weights; block_size, the training window, may be shorter than the
    # model's context (e.g. 512-token windows for a 1024-token GPT-2, to save memory).
    if cfg.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.block_size} exceeds the context of {cfg.init_from} "
                          f"({model.config.block_size} tokens)")
    for k in MODEL_FIELDS:
        if k != "block_size":
            setattr(cfg, k, getattr(model.config, k))
    return model, None


def prepare_out_dir(cfg: TrainConfig, is_main: bool) -> None:
    """Refuse to start a new run over existing checkpoints unless overwrite is set; a new run
    starts with an empty ckpt/, log.jsonl and loss.png."""
    out = Path(cfg.out_dir)
    if cfg.init_from == "resume":
        return
    if checkpoint_dirs(out) and not cfg.overwrite:
        raise ConfigError(
            f"{out} already holds checkpoints; continue it with --init_from=resume, pick another "
            f"--out_dir, or pass --overwrite=true to replace it"
        )
    if not is_main:  # every process checks (and raises together); one deletes
        return
    shutil.rmtree(out / CKPT_SUBDIR, ignore_errors=True)
    for name in ("log.jsonl", "loss.png"):
        (out / name).unlink(missing_ok=True)


def check_vocab(data_dir: str, vocab_size: int) -> None:
    meta = Path(data_dir) / "meta.json"
    if meta.is_file():
        data_vocab = json.loads(meta.read_text()).get("vocab_size")
        if data_vocab is not None and data_vocab > vocab_size:
            raise ConfigError(f"{meta} has vocab_size {data_vocab}, larger than the model's {vocab_size}")


# -------------------------------------------------------------------------- loop


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a context manager that
    puts the previous handlers back on exit)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


@torch.no_grad()
def evaluate(model, loader: ShardLoader, accelerator: Accelerator, eval_steps: int) -> float:
    """Mean loss over the same eval_steps micro-batches every time, averaged over processes."""
    model.eval()
    loader.rewind()
    total = torch.zeros((), device=accelerator.device)
    for _ in range(eval_steps):
        x, y = loader.next_batch()
        _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
        total += loss.float()
    model.train()
    return accelerator.reduce(total / eval_steps, reduction="mean").item()


def accumulate_gradients(model, accelerator: Accelerator, loader: ShardLoader, micro_steps: int) -> torch.Tensor:
    """Forward and backward over micro_steps micro-batches; returns their mean loss (detached).

    Inside `accelerator.accumulate` the gradient all-reduce happens only on the last micro-step,
    and `accelerator.backward` divides each loss by the accumulation steps, so the gradients
    equal those of one batch micro_steps times larger.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(micro_steps):
        x, y = loader.next_batch()
        x = x.to(accelerator.device, non_blocking=True)
        y = y.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            _, loss = model(x, y)
            accelerator.backward(loss)
        loss_sum += loss.detach().float()
    assert accelerator.sync_gradients, "the last micro-step must synchronise gradients"
    return loss_sum / micro_steps


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past `step`: a resumed run logs those steps again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def fit(cfg: TrainConfig, accelerator: Accelerator) -> tuple[GPT, dict]:
    """Run training to cfg.max_steps (or a stop signal).

    Returns the trained model (unwrapped) and the final progress record (step, tokens_seen,
    loss, val_loss, loader position)."""
    is_main = accelerator.is_main_process
    log = (lambda msg: tqdm.write(msg)) if is_main else (lambda msg: None)
    out_dir = Path(cfg.out_dir)

    model, resume_from = build_model(cfg, log)
    raw_model = model
    check_vocab(cfg.data_dir, model.config.vocab_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_loader = ShardLoader(list_shards(cfg.data_dir, "train"), cfg.block_size, cfg.micro_batch_size,
                               rank, world, seed=cfg.seed, shuffle=True)
    val_loader = ShardLoader(list_shards(cfg.data_dir, "val"), cfg.block_size, cfg.micro_batch_size,
                             rank, world, seed=cfg.seed, shuffle=False)
    if val_loader.steps_per_epoch < cfg.eval_steps:
        raise ConfigError(
            f"eval_steps={cfg.eval_steps} needs {cfg.eval_steps * val_loader.windows_per_micro_step} val "
            f"windows but {cfg.data_dir} has {val_loader.num_windows}; lower eval_steps"
        )

    # Only now, with the model and data known to be good, may an old run be cleared.
    prepare_out_dir(cfg, is_main)
    accelerator.wait_for_everyone()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if cfg.compile:
        model.compile()  # in place: no wrapper, so state_dict keys stay GPT-2's
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    _skip_model_weights_in_state(accelerator)

    progress = {"step": 0, "tokens_seen": 0, "train_loader": train_loader.state_dict()}
    if resume_from is not None:
        accelerator.load_state(str(resume_from / STATE_SUBDIR))
        progress = json.loads((resume_from / "meta.json").read_text())
        train_loader.load_state_dict(progress["train_loader"])
        if is_main:
            truncate_log(out_dir / "log.jsonl", progress["step"])
        log(f"resumed from {resume_from} at step {progress['step']}")
    if cfg.log_with:
        accelerator.init_trackers(out_dir.name, config=dataclasses.asdict(cfg))

    n_params = raw_model.num_params()
    flops_per_step = raw_model.flops_per_token(cfg.block_size) * cfg.tokens_per_step
    log(f"{n_params / 1e6:.2f}M parameters | {world} process(es) on {accelerator.device} | "
        f"{cfg.tokens_per_step:,} tokens/step = {cfg.micro_batch_size} seq x {cfg.block_size} tok x "
        f"{cfg.grad_accum_steps} accum x {world} proc | mixed_precision={cfg.mixed_precision}")

    log_path = out_dir / "log.jsonl"
    step = progress["step"]
    start_time = time.time()
    window_time, window_tokens = time.time(), 0
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)

    def run_eval():
        val_loss = evaluate(model, val_loader, accelerator, cfg.eval_steps)
        progress["val_loss"] = val_loss
        if is_main:
            append_log(log_path, {"step": step, "val_loss": val_loss})
            log(f"step {step}: val loss {val_loss:.4f}")
        accelerator.log({"val_loss": val_loss}, step=step)

    if step == 0:
        run_eval()
    model.train()
    with StopSignal() as stop:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = accumulate_gradients(model, accelerator, train_loader, cfg.grad_accum_steps)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure, don't clip
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += cfg.tokens_per_step
            # One all-reduce carries the loss and any stop request, so every process agrees on both.
            stop_flag = torch.tensor(float(stop.received is not None), device=accelerator.device)
            flags = torch.stack([loss, stop_flag])
            flags = accelerator.reduce(flags, reduction="mean")
            step_loss, stop_requested = flags[0].item(), flags[1].item() > 0
            if not math.isfinite(step_loss):
                last = checkpoint_dirs(cfg.out_dir)
                raise FloatingPointError(
                    f"loss is {step_loss} at step {step}; stopping. "
                    + (f"Last good checkpoint: {last[-1]}" if last else "No checkpoint was saved yet.")
                )
            progress = {**progress, "step": step, "tokens_seen": progress["tokens_seen"] + cfg.tokens_per_step,
                        "train_loader": train_loader.state_dict(), "loss": step_loss}
            bar.update(1)
            last_step = step == cfg.max_steps
            if step % cfg.log_interval == 0 or last_step:
                elapsed = time.time() - window_time
                tokens_per_sec = window_tokens / elapsed
                mfu = flops_per_step * (window_tokens / cfg.tokens_per_step) / elapsed / (cfg.peak_flops * world) \
                    if cfg.peak_flops else None
                record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens_per_sec": tokens_per_sec, "mfu": mfu, "tokens_seen": progress["tokens_seen"],
                          "elapsed_sec": time.time() - start_time}
                if is_main:
                    append_log(log_path, record)
                    mfu_text = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
                    log(f"step {step}/{cfg.max_steps} | loss {step_loss:.4f} | lr {lr:.2e} | "
                        f"grad_norm {float(grad_norm):.3f} | {tokens_per_sec:,.0f} tok/s{mfu_text} | "
                        f"{_format_time(record['elapsed_sec'])}")
                accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
                window_time, window_tokens = time.time(), 0
            if step % cfg.eval_interval == 0 or last_step:
                run_eval()
            if step % cfg.ckpt_interval == 0 or last_step or stop_requested:
                path = save_checkpoint(accelerator, model, cfg, progress, raw_model)
                log(f"saved {path}")
            if stop_requested:
                log(f"stopped by {stop.received or 'a signal on another process'} after step {step}. "
                    f"To continue, run the same command with --init_from=resume")
                break
    bar.close()
    accelerator.end_training()
    if cfg.plot and is_main:
        plot_losses(log_path, out_dir / "loss.png")
    return raw_model, progress


def _format_time(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes}m{sec:02d}s"


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Train and val loss against steps, from log.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png_path)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) here: CUDA with bf16 support, or a CPU with AMX or
    AVX512-BF16. Elsewhere, e.g. an AVX2-only CPU, bf16 is emulated and much slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def resolve_mixed_precision(cfg: TrainConfig, device: torch.device, log) -> None:
    """Replace mixed_precision="auto" by what this device runs fastest; warn about slow bf16."""
    if cfg.mixed_precision == "auto":
        cfg.mixed_precision = "bf16" if native_bf16(device) else "no"
        log(f"mixed_precision=auto -> {cfg.mixed_precision} on {device.type}"
            + ("" if cfg.mixed_precision == "bf16" else " (no native bf16 on this device)"))
    elif cfg.mixed_precision == "bf16" and not native_bf16(device):
        log(f"warning: mixed_precision=bf16 on a {device.type} without native bf16: expect it to be slower than fp32")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.log_with or None,
        project_dir=cfg.out_dir,
    )


def main(argv: list[str] | None = None) -> tuple[GPT, dict]:
    """Parse the config, build the Accelerator, train. Returns what `fit` returns."""
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    # PartialState starts the process group (if launched distributed) so the world size is
    # known before the config is completed; the Accelerator below shares it. ACCELERATE_USE_CPU
    # (set by `accelerate launch --cpu`) must reach it here, as it would reach the Accelerator.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    cfg = validate(cfg, state.num_processes)
    resolve_mixed_precision(cfg, state.device, print if state.is_main_process else (lambda msg: None))
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)  # same initial weights on every process
    return fit(cfg, accelerator)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError, ShardError) as err:  # bad input: say what, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:  # diverged: the last good checkpoint is kept
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
