"""Train GPT-2 on token shards with a hand-written loop that Accelerate carries to any hardware.

    python train.py configs/small.py [--field=value ...]
    accelerate launch train.py configs/small.py --micro_batch_size=16
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train.py configs/tiny.py
    python train.py --help                # every field with its type, default and meaning

Owns: the loop (fit, train_step, accumulate_gradients, the evals), then the setup it runs on (the
model, the data, the optimizers: AdamW, or Muon + AdamW; the warmup + cosine schedule), the one
Accelerator built from the TrainConfig of train_config.py, and main. The run directory (lock,
claim, resume, when and what to save, prune, log.jsonl) is run_dir.py's RunDir; the checkpoint
layout, its checks and publishing belong to checkpoints.py.

A config file is Python, executed as it is read (as in nanoGPT): trust it like a script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

import checkpoints
import devices
import lora
import precision
import scoring
import shards
from errors import ConfigError, DivergenceError, exit_status
from model import GPT
from run_dir import (PLOT_FILE, SHAPE_KEYS, Resume, RunDir, TrainState, all_ranks, plot_losses, resumed_shape,
                     runtime_overrides, skip_model_weights_in_state)
from shards import ShardLoader, list_shards
from tokenizer import VOCAB_SIZE, gpt2_tokenizer
from train_config import TrainConfig, config_help, config_values, with_derived

# -------------------------------------------------------------------------- the loop


def fit(cfg: TrainConfig, accelerator: Accelerator, run_dir: RunDir, resume: Resume | None,
        stop: StopSignal) -> tuple[GPT, dict]:
    """Run training to cfg.max_steps (or a signal caught by `stop`): after each step the log line,
    the evals and a checkpoint when each is due.

    Returns the trained model (unwrapped) and the final TrainState as a dict (step, tokens_seen,
    loss, val_loss, loader position). Raises DivergenceError for a non-finite step, Interrupted
    for a signal before training started.
    """
    trainer = setup_trainer(cfg, accelerator, run_dir, resume, stop)
    cfg, state, model, throughput = trainer.cfg, trainer.state, trainer.model, Throughput(trainer)
    # disable=None: tqdm draws the bar only when stderr is a terminal; a log file gets the log lines alone.
    with tqdm(total=cfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
              disable=None if accelerator.is_main_process else True) as bar:
        if state.step == 0:
            run_evals(trainer)
        model.train()
        while state.step < cfg.max_steps:
            stats = train_step(model, trainer.optimizers, accelerator, trainer.train_loader, cfg, state.step, stop)
            if not stats.applied:
                raise run_dir.divergence_error(state.step + 1, f"the loss is {stats.loss} and the gradient norm "
                                                               f"{stats.grad_norm} (the update was not applied)")
            state.advance(stats.loss, cfg.tokens_per_step, trainer.train_loader)
            throughput.step()
            bar.update(1)
            last_step = state.step == cfg.max_steps
            if state.step % cfg.log_interval == 0 or last_step:
                throughput.log(stats)
            if state.step % cfg.eval_interval == 0 or last_step:
                run_evals(trainer)
            # the run directory decides whether a checkpoint is due (ckpt_interval, the last step)
            saved = run_dir.save(state, model, trainer.raw_model, last_step=last_step or stats.stop_requested)
            if saved is not None:
                trainer.log(f"saved {saved}")
            if stats.stop_requested:
                trainer.log(f"stopped by {stop.received or 'a signal on another process'} after step {state.step}. "
                            f"To continue, run the same command with --init_from=resume")
                break
    del model  # release_wrapped_model drops the last references to the wrapper
    release_wrapped_model(trainer)
    accelerator.end_training()  # destroys the process group
    if cfg.plot and accelerator.is_main_process:
        plot_losses(run_dir.log_path, run_dir.path / PLOT_FILE)
    return trainer.raw_model, state.state_dict()


@dataclass
class Trainer:
    """Everything a training run holds once set up: what the loop and its helpers work on."""

    cfg: TrainConfig
    accelerator: Accelerator
    run_dir: RunDir
    raw_model: GPT  # unwrapped and uncompiled: what checkpoints are saved from
    model: torch.nn.Module | None  # as prepared by Accelerate (DDP/FSDP, compiled); None once released
    optimizers: list[torch.optim.Optimizer]  # make_optimizers' list, prepared: AdamW, then Muon with optimizer=muon
    train_loader: ShardLoader
    state: TrainState
    evaluators: list[Callable[[], dict[str, float]]]  # each returns named figures, e.g. {"val_loss": 3.2}
    flops_per_step: float  # counted before prepare(): FSDP shards the parameters
    log: Callable[[str], None]  # console, main process only

    def record(self, values: dict, console: str) -> None:
        """One record to log.jsonl, the console and the trackers."""
        if self.accelerator.is_main_process:
            self.run_dir.append_log({"step": self.state.step, **values})
            self.log(console)
        self.accelerator.log({k: v for k, v in values.items() if v is not None}, step=self.state.step)


def train_step(model, optimizers: list, accelerator: Accelerator, loader: ShardLoader, cfg: TrainConfig,
               step: int, stop: StopSignal) -> StepStats:
    """Accumulate gradients, clip, and apply one update of every optimizer at the rates of `step`:
    the schedule scales each optimizer's peak (peak_lrs) by the same factor.

    The update is applied only when the loss and the gradient norm are finite on every process
    (under fp16 an overflowing gradient is the GradScaler's to skip, so only the loss counts).
    """
    lr = lr_at(step, cfg)
    for optimizer, peak in zip(optimizers, peak_lrs(cfg)):
        for group in optimizer.param_groups:
            group["lr"] = lr * (peak / cfg.learning_rate)  # AdamW: lr * 1.0, exactly lr
    loss = accumulate_gradients(model, accelerator, loader, cfg.grad_accum_steps)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure, don't clip
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)  # FSDP2: a DTensor, replicated
    grad_norm = torch.as_tensor(getattr(grad_norm, "full_tensor", lambda: grad_norm)(), device=loss.device)
    # One all-reduce carries the loss, the norm and any stop request, so every process agrees on all three.
    stop_flag = torch.tensor(float(stop.received is not None), device=loss.device)
    loss, grad_norm, stopped = accelerator.reduce(torch.stack([loss, grad_norm.float(), stop_flag]), "mean").tolist()
    applied = math.isfinite(loss) and (math.isfinite(grad_norm) or cfg.mixed_precision == "fp16")
    for optimizer in optimizers:
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=loss, grad_norm=grad_norm, lr=lr, stop_requested=stopped > 0, applied=applied)


@dataclass
class StepStats:
    """One optimizer step, as every process agrees on it."""

    loss: float  # mean over micro-steps and processes, measured before the update
    grad_norm: float  # global, before clipping
    lr: float
    stop_requested: bool  # a stop signal reached some process
    applied: bool  # False: loss or gradient norm was not finite, so the update was skipped


def accumulate_gradients(model, accelerator: Accelerator, loader: ShardLoader, micro_steps: int) -> torch.Tensor:
    """Forward and backward over micro_steps micro-batches; returns their mean loss (detached).

    Inside `accelerator.accumulate` the gradient all-reduce happens only on the last micro-step,
    and `accelerator.backward` divides each loss by the accumulation steps, so the gradients
    equal those of one batch micro_steps times larger.
    """
    loss_sum = torch.zeros((), device=accelerator.device)
    for _ in range(micro_steps):
        x, y = loader.next_batch(accelerator.device)  # one non-blocking copy, from pinned memory on CUDA
        with accelerator.accumulate(model):
            _, loss = model(x, y)
            accelerator.backward(loss)
        loss_sum += loss.detach().float()
    assert accelerator.sync_gradients, "the last micro-step must synchronise gradients"
    return loss_sum / micro_steps


def run_evals(trainer: Trainer) -> None:
    """Every evaluator's figures, as one record."""
    figures = {name: value for evaluator in trainer.evaluators for name, value in evaluator().items()}
    trainer.state.val_loss = figures.get("val_loss", trainer.state.val_loss)
    trainer.record(figures, f"step {trainer.state.step}: " + " | ".join(f"{k} {v:.4f}" for k, v in figures.items()))


@torch.no_grad()
def val_loss(model, loader: ShardLoader, accelerator: Accelerator, eval_steps: int) -> float:
    """Mean loss per token over the same eval_steps micro-batches every time (scoring.py's
    window_losses, as eval.py --task val computes it), over every process's windows."""
    model.eval()
    loader.rewind()
    batches = (loader.next_windows() for _ in range(eval_steps))
    total, count = scoring.window_losses(model, batches, accelerator.device, contextlib.nullcontext())
    model.train()
    sums = accelerator.reduce(torch.tensor([total, count], device=accelerator.device), reduction="sum")
    return (sums[0] / sums[1]).item()


def hellaswag_evaluator(model, max_len: int, examples: list, accelerator: Accelerator,
                        batch_size: int) -> Callable[[], dict[str, float]]:
    """An evaluator of zero-shot HellaSwag (scoring.py): the examples are shared out across
    processes, the counts summed over them. Every process scores the same number of examples
    (the short shares repeat their first one, uncounted), so each calls the model equally often,
    as FSDP needs."""
    rank, world = accelerator.process_index, accelerator.num_processes
    share = examples[rank::world]
    padded = share + share[:1] * (math.ceil(len(examples) / world) - len(share))

    @torch.no_grad()
    def run() -> dict[str, float]:
        model.eval()
        scores = scoring.score_choices(model, padded, batch_size, accelerator.device, contextlib.nullcontext(),
                                       max_len=max_len)
        model.train()
        counts = torch.tensor(scoring.hellaswag_counts(scores[: len(share)], share), dtype=torch.float64,
                              device=accelerator.device)
        n, correct, correct_norm = accelerator.reduce(counts, reduction="sum").tolist()
        return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}

    return run


class Throughput:
    """Tokens/s and MFU over the steps since the last log line."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.start = trainer, time.time()
        self.window_start, self.window_steps = self.start, 0

    def step(self) -> None:
        self.window_steps += 1

    def log(self, stats: StepStats) -> None:
        trainer, cfg = self.trainer, self.trainer.cfg
        elapsed = time.time() - self.window_start
        tokens_per_sec = self.window_steps * cfg.tokens_per_step / elapsed
        peak = cfg.peak_flops * trainer.accelerator.num_processes
        mfu = trainer.flops_per_step * self.window_steps / elapsed / peak if cfg.peak_flops else None
        values = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_per_sec": tokens_per_sec,
                  "mfu": mfu, "tokens_seen": trainer.state.tokens_seen, "elapsed_sec": time.time() - self.start}
        mfu_text = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
        trainer.record(values, f"step {trainer.state.step}/{cfg.max_steps} | loss {stats.loss:.4f} | "
                               f"lr {stats.lr:.2e} | grad_norm {stats.grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s"
                               f"{mfu_text} | {_format_time(values['elapsed_sec'])}")
        self.window_start, self.window_steps = time.time(), 0


def _format_time(seconds: float) -> str:
    return "{}m{:02d}s".format(*divmod(int(seconds), 60))


def release_wrapped_model(trainer: Trainer) -> None:
    """Drop and collect the DDP/FSDP-wrapped model while the process group still exists.

    Otherwise DDP's Reducer can outlive destroy_process_group and hold the last reference to the
    gloo process group. Its destructor then joins gloo's worker threads while holding the GIL, and a
    worker still releasing the last collective waits for the GIL: the process never exits, after
    saving its last checkpoint (tests/test_train.py's two-process run checks no wrapper is left).
    """
    trainer.model = None
    trainer.evaluators.clear()  # their closures hold the wrapped model
    trainer.accelerator.free_memory()  # Accelerate's own references; it collects before dropping them
    gc.collect()  # the wrapper sits in reference cycles


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


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived before training started: nothing in out_dir was changed."""


# --------------------------------------------------------------------- setup


def setup_trainer(cfg: TrainConfig, accelerator: Accelerator, run_dir: RunDir, resume: Resume | None,
                  stop: StopSignal) -> Trainer:
    """Model, data, out_dir, optimizer, Accelerate and the starting TrainState, each checked
    before anything is written; an earlier run's outputs are removed only after that. Raises
    Interrupted, before writing anything, when a stop signal arrived during the setup."""
    log = (lambda msg: tqdm.write(msg)) if accelerator.is_main_process else (lambda msg: None)
    if resume is None:
        run_dir.claim(cfg.overwrite)
    accelerator.wait_for_everyone()  # every process has looked before the main process writes there

    raw_model, cfg = build_model(cfg, resume, log)
    train_loader, val_loader = load_data(cfg, accelerator, raw_model.config.vocab_size)
    where = dict(num_processes=accelerator.num_processes, device=accelerator.device.type)
    state = TrainState(train_loader=train_loader.state_dict(), **where)
    if resume is not None:
        state = dataclasses.replace(resume.state, **where)
        train_loader.load_state_dict(state.train_loader)
    examples = (scoring.load_hellaswag(cfg.hellaswag_data, gpt2_tokenizer(), cfg.hellaswag_limit or None)
                if cfg.hellaswag_data else None)
    if examples is not None:
        scoring.check_vocab(examples, raw_model.config.vocab_size, cfg.hellaswag_data)
    n_params = raw_model.num_params()
    flops_per_step = raw_model.flops_per_token(cfg.model.block_size) * cfg.tokens_per_step
    model, optimizers = prepare_training(cfg, accelerator, raw_model, resume, log)

    if not all_ranks(accelerator, stop.received is None):
        raise Interrupted(f"stopped by {stop.received or 'a signal on another process'} before training started; "
                          f"nothing in {run_dir.path} was changed")
    # only now may anything be removed; from here on run_dir saves with this cfg and accelerator
    run_dir.start(cfg, accelerator, resume.state.step if resume is not None else None, raw_model)
    accelerator.wait_for_everyone()
    if resume is not None:
        log(f"resumed from {resume.ckpt} at step {state.step}{resume.rng_note(accelerator.device)}")
    if cfg.log_with:
        accelerator.init_trackers(run_dir.path.name, config=cfg.to_flat())
    tf32 = devices.allow_tf32(accelerator.device)  # None off CUDA
    log(f"{n_params / 1e6:.2f}M parameters | {describe_processes(accelerator)} | "
        f"{cfg.tokens_per_step:,} tokens/step = {cfg.micro_batch_size} seq x {cfg.model.block_size} tok x "
        f"{cfg.grad_accum_steps} accum x {accelerator.num_processes} proc | mixed_precision={cfg.mixed_precision}"
        + (f" | {tf32}" if tf32 else ""))
    evaluators = [lambda: {"val_loss": val_loss(model, val_loader, accelerator, cfg.eval_steps)}]
    if examples is not None:
        # HellaSwag's lengths vary (a compiled model would recompile): the plain module scores, except under FSDP
        scorer = model if accelerator.distributed_type == DistributedType.FSDP else raw_model
        evaluators.append(hellaswag_evaluator(scorer, raw_model.config.block_size, examples, accelerator,
                                              cfg.micro_batch_size))
        log(f"HellaSwag at every eval: {len(examples):,} examples from {cfg.hellaswag_data}")
    return Trainer(cfg, accelerator, run_dir, raw_model, model, optimizers, train_loader, state, evaluators,
                   flops_per_step, log)


def build_model(cfg: TrainConfig, resume: Resume | None, log) -> tuple[GPT, TrainConfig]:
    """The model for cfg.init_from (new, the resumed checkpoint's, or a GPT-2 directory's) and the
    config it trains under: a fine-tune's shape comes from the weights, as a new TrainConfig."""
    if resume is not None:
        model = resume.model
        # block_size is the training window: at most the model's context (a fine-tune may train shorter windows)
        mismatched = [f"{k}={getattr(cfg.model, k)} (checkpoint: {getattr(model.config, k)})" for k in SHAPE_KEYS
                      if k != "block_size" and getattr(cfg.model, k) != getattr(model.config, k)]
        if cfg.model.block_size > model.config.block_size:
            mismatched.append(f"block_size={cfg.model.block_size} (the checkpoint's context: {model.config.block_size})")
        if mismatched:
            raise ConfigError(f"config does not match the checkpoint {resume.ckpt}: " + ", ".join(mismatched))
        return lora.for_run(model, cfg, None, log), cfg  # LoRA: checks the resumed adapter against cfg
    if cfg.init_from == "scratch":
        return lora.for_run(GPT(cfg.model), cfg, None, log), cfg  # LoRA: the frozen base is saved at start
    log(f"fine-tuning from {cfg.init_from}")
    model = checkpoints.load_model(Path(cfg.init_from), **runtime_overrides(cfg))
    # The shape comes from the weights; block_size, the training window, may be shorter than the
    # model's context (e.g. 512-token windows for a 1024-token GPT-2, to save memory).
    if cfg.model.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.model.block_size} exceeds the context of {cfg.init_from} "
                          f"({model.config.block_size} tokens)")
    model = lora.for_run(model, cfg, Path(cfg.init_from), log)  # LoRA: freeze the base, add the adapter
    return model, dataclasses.replace(cfg, model=dataclasses.replace(model.config, block_size=cfg.model.block_size))


def load_data(cfg: TrainConfig, accelerator: Accelerator, vocab_size: int) -> tuple[ShardLoader, ShardLoader]:
    """The train and val loaders of this process, after checking that every token id is below
    vocab_size and that the val split holds eval_steps micro-batches. Raises ConfigError or ShardError."""
    rank, world = accelerator.process_index, accelerator.num_processes
    train_paths, val_paths = list_shards(cfg.data_dir, "train"), list_shards(cfg.data_dir, "val")
    shards.check_vocab(cfg.data_dir, train_paths + val_paths, vocab_size)
    if vocab_size >= VOCAB_SIZE:
        gpt2_tokenizer()  # every checkpoint holds GPT-2's tokenizer (hf_dir.py): fail now, not at the first save
    window, batch = cfg.model.block_size, cfg.micro_batch_size
    pin = devices.pin_batches(accelerator.device)
    train_loader = ShardLoader(train_paths, window, batch, rank, world, seed=cfg.seed, shuffle=True, pin_memory=pin)
    val_loader = ShardLoader(val_paths, window, batch, rank, world, seed=cfg.seed, shuffle=False, pin_memory=pin)
    if val_loader.steps_per_epoch < cfg.eval_steps:
        raise ConfigError(
            f"eval_steps={cfg.eval_steps} needs {cfg.eval_steps * val_loader.windows_per_micro_step} val "
            f"windows but {cfg.data_dir} has {val_loader.num_windows}; lower eval_steps"
        )
    return train_loader, val_loader


def make_optimizers(model: GPT, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """[AdamW] for optimizer=adamw; [AdamW, Muon] for optimizer=muon, Muon taking muon_params.
    The order is fixed: checkpoints hold the states in it, and peak_lrs follows it."""
    # The fused kernel does the whole update in one pass; CUDA and CPU have it (torch >= 2.4).
    fused = device.type in ("cuda", "cpu")
    matrices = muon_params(model) if cfg.optimizer == "muon" else []
    adamw = torch.optim.AdamW(param_groups(model, cfg.weight_decay, exclude=matrices), lr=cfg.learning_rate,
                              betas=(cfg.beta1, cfg.beta2), fused=fused)
    if cfg.optimizer == "adamw":
        return [adamw]
    # torch's Muon: Nesterov momentum, 5 Newton-Schulz steps in bf16, then the rate scaled per matrix
    # by adjust_lr_fn and decoupled weight decay (Jordan et al. 2024; Liu et al. 2025 for match_rms_adamw).
    muon = torch.optim.Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum,
                            nesterov=cfg.muon_nesterov, adjust_lr_fn=cfg.muon_adjust_lr)
    return [adamw, muon]


def muon_params(model: GPT) -> list[torch.nn.Parameter]:
    """The matrices Muon trains: every 2-D weight inside the blocks (attn.c_attn, attn.c_proj,
    mlp.c_fc, mlp.c_proj). Embeddings (and the tied head), biases and LayerNorm stay on AdamW, as
    in the modded-nanogpt speedrun (Jordan et al. 2024): Muon is for hidden layers."""
    return [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]


def param_groups(model: torch.nn.Module, weight_decay: float, exclude: list[torch.nn.Parameter] = ()) -> list[dict]:
    """AdamW groups: decay on matrices (matmul weights, embeddings), none on biases and LayerNorm.
    `exclude`: parameters another optimizer trains (Muon's)."""
    skip = {id(p) for p in exclude}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]  # a tied matrix appears once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def peak_lrs(cfg: TrainConfig) -> list[float]:
    """Each optimizer's peak rate, in make_optimizers' order. Taken from the config at every step
    (never from a checkpoint), so a resumed run follows its own config, as learning_rate always did."""
    return [cfg.learning_rate] + ([cfg.muon_lr] if cfg.optimizer == "muon" else [])


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


def prepare_training(cfg: TrainConfig, accelerator: Accelerator, raw_model: GPT, resume: Resume | None,
                     log: Callable[[str], None] = print):
    """The model and optimizers as Accelerate prepares them (DDP/FSDP, compiled with compile=true),
    with a resumed checkpoint's optimizer, RNG and scaler state (Resume.restore, which says through `log`
    which of the config's optimizer settings replace the checkpoint's)."""
    optimizers = make_optimizers(raw_model, cfg, accelerator.device)
    model, *optimizers = accelerator.prepare(raw_model, *optimizers)
    skip_model_weights_in_state(accelerator)  # the weights live once, in model.safetensors
    if resume is not None:
        resume.restore(accelerator, optimizers, log)
    return model, optimizers


def describe_processes(accelerator: Accelerator) -> str:
    """How the run is spread: '1 process on cpu', 'DDP over gloo, 2 processes', 'FSDP over nccl, 8 processes'."""
    kind = accelerator.distributed_type
    if kind == DistributedType.NO:
        return f"1 process on {accelerator.device}"
    name = "FSDP" if kind == DistributedType.FSDP else "DDP" if kind.name.startswith("MULTI_") else kind.name
    return f"{name} over {accelerator.state.backend}, {accelerator.num_processes} processes on {accelerator.device.type}"


# ---------------------------------------------------------------------- main


def start_processes() -> PartialState:
    """Join the processes a launcher started (or none). Raises ConfigError when the launcher
    started several but Accelerate would run each alone: torchrun on a machine without GPUs
    needs ACCELERATE_USE_CPU=1 for DDP over gloo."""
    # ACCELERATE_USE_CPU (set by `accelerate launch --cpu`) must reach PartialState here, as it
    # would reach the Accelerator.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise ConfigError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate found no GPU to "
            f"join them on, so each would train alone into the same out_dir; on a machine without GPUs set "
            f"ACCELERATE_USE_CPU=1 for DDP over gloo (ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} train.py ...)"
        )
    return state


def check_optimizer_fits(cfg: TrainConfig, resume: Resume | None) -> None:
    """Raise ConfigError when cfg.optimizer cannot run here: a checkpoint holds the state of the
    optimizer it was trained with, and Muon's whole-matrix Newton-Schulz step cannot run on the
    parameter shards of FSDP (requested through ACCELERATE_USE_FSDP, as accelerate launch does)."""
    saved = resume.train_config.get("optimizer", "adamw") if resume is not None else cfg.optimizer
    if saved != cfg.optimizer:
        raise ConfigError(f"cannot resume {resume.ckpt} with optimizer={cfg.optimizer}: it was trained with "
                          f"optimizer={saved}, whose state it holds; resume with --optimizer={saved} or start a new run")
    if cfg.optimizer == "muon" and parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise ConfigError("optimizer=muon does not run under FSDP (Muon orthogonalises whole matrices, FSDP holds "
                          "shards of them); use DDP, or optimizer=adamw with FSDP")


def derive_for_processes(cfg: TrainConfig, world_size: int, resume: Resume | None, log) -> TrainConfig:
    """with_derived for this run, keeping a resumed checkpoint's global batch. Raises ConfigError,
    naming the checkpoint when the number of processes changed and its batch cannot be kept."""
    saved_tokens_per_step = resume.train_config.get("tokens_per_step") if resume else None
    try:
        return with_derived(cfg, world_size, log, resume_tokens_per_step=saved_tokens_per_step)
    except ConfigError as err:
        if resume is None or resume.state.num_processes in (None, world_size):
            raise
        raise ConfigError(f"cannot resume {resume.ckpt}, saved by {resume.state.num_processes} process(es), with "
                          f"{world_size}: {err}") from None


def resolve_mixed_precision(cfg: TrainConfig, processes: PartialState, log) -> str:
    """cfg.mixed_precision with "auto" decided (precision.mixed_precision may time bf16 against fp32):
    the main process decides, so every process trains alike; its note goes through log."""
    choice = [precision.mixed_precision(cfg.mixed_precision, processes.device, precision.Workload.of("batched", cfg.model))
              if processes.is_main_process else None]
    broadcast_object_list(choice)  # a no-op with one process
    setting, note = choice[0]
    if note:
        log(note)
    return setting


def check_fsdp(accelerator: Accelerator) -> None:
    """Raise ConfigError for FSDP settings this loop cannot run: FSDP1 without use_orig_params swaps
    in flat parameters in prepare(), after the optimizers were built over the originals (which would
    never see a gradient); a sharded state dict saves per-process folders, not verified whole files."""
    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if plugin is None:
        return
    if getattr(plugin, "fsdp_version", 1) == 1 and not plugin.use_orig_params:
        raise ConfigError("FSDP1 needs use_orig_params=true here (FSDP_USE_ORIG_PARAMS=true, or fsdp_use_orig_params "
                          "in accelerate config): the optimizers are built before prepare(); or use fsdp_version: 2")
    if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        raise ConfigError(f"FSDP's state_dict_type is {plugin.state_dict_type}; checkpoints need FULL_STATE_DICT "
                          f"(FSDP_STATE_DICT_TYPE=FULL_STATE_DICT, or fsdp_state_dict_type in accelerate config)")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The one Accelerator. With compile=true it compiles the model in prepare(), after wrapping it
    in DDP or FSDP, as Accelerate expects; checkpoints are saved from the uncompiled module."""
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                       log_with=cfg.log_with or None, project_dir=cfg.out_dir,
                       dynamo_backend="inductor" if cfg.compile else "no")


def main(argv: list[str] | None = None) -> tuple[GPT, dict] | None:
    """Parse the config, start the processes, lock out_dir, pick the checkpoint to resume, build
    the Accelerator, train. Returns what `fit` returns (None after --help)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(config_help(__doc__.split("\n\n")[1]))
        return None
    values = config_values(argv)
    cfg = TrainConfig.from_flat(**values)
    with StopSignal() as stop:  # from here on, SIGINT/SIGTERM stop the run between steps, or before it writes
        processes = start_processes()
        run_dir = RunDir(cfg.out_dir, processes.is_main_process)
        # One run at a time in out_dir: the main process holds its lock until it exits; the run's other
        # processes wait for it, so none of them reads out_dir while another run may be writing there.
        with run_dir.locked():
            processes.wait_for_everyone()
            return _main(cfg, processes, run_dir, stop, frozenset(values))


def _main(cfg: TrainConfig, processes: PartialState, run_dir: RunDir, stop: StopSignal,
          set_keys: frozenset[str] = frozenset()) -> tuple[GPT, dict] | None:
    log = run_dir.log
    resume = run_dir.load(cfg, make_optimizers) if cfg.init_from == "resume" else None
    if resume is not None:
        cfg = resumed_shape(cfg, resume, set_keys, log)
    check_optimizer_fits(cfg, resume)
    cfg = derive_for_processes(cfg, processes.num_processes, resume, log)
    if resume is not None and resume.state.step >= cfg.max_steps:
        log(f"nothing to train: {resume.ckpt} is at step {resume.state.step} and max_steps={cfg.max_steps}; "
            f"raise max_steps (and lr_decay_steps) to train further. Nothing in {cfg.out_dir} was changed")
        return resume.model, resume.state.state_dict()
    cfg = dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg, processes, log))
    accelerator = make_accelerator(cfg)
    check_fsdp(accelerator)
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        log(f"warning: FSDP was requested (ACCELERATE_USE_FSDP) but Accelerate runs FSDP only on GPUs; this run "
            f"uses {describe_processes(accelerator)}")
    set_seed(cfg.seed)  # same initial weights on every process
    return fit(cfg, accelerator, run_dir, resume, stop)


if __name__ == "__main__":
    try:
        sys.exit(exit_status(main))  # bad input: one line, status 2
    except DivergenceError as err:  # the last good checkpoint is kept
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        sys.exit(143 if "SIGTERM" in str(err) else 130)
