"""Train GPT-2 on token shards with a hand-written loop that Accelerate carries to any hardware.

    python train.py configs/small.py [--field=value ...]
    accelerate launch train.py configs/small.py --micro_batch_size=16
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train.py configs/tiny.py
    python train.py --help                # every field with its type, default and meaning

Owns: the one Accelerator (built from the TrainConfig of train_config.py), the optimizers (AdamW, or Muon + AdamW), the
warmup + cosine schedule, the loop (TrainState + train_step + fit), evaluation, logs, and the run
directory (RunDir: lock, claim, resume, save, prune, log; the checkpoint layout, its checks and
publishing belong to checkpoints.py).

A config file is Python, executed as it is read (as in nanoGPT): trust it like a script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, get_args, get_type_hints

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

import atomic
import checkpoints
import devices
import evaluation
import lora
import shards
from errors import CheckpointError, ConfigError, DivergenceError, ShardError, exit_status
from model import GPT
from shards import ShardLoader, list_shards
from tokenizer import VOCAB_SIZE, gpt2_tokenizer
from train_config import OPTIMIZERS, TrainConfig, config_help, config_keys, config_values, type_name, with_derived

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


def peak_lrs(cfg: TrainConfig) -> list[float]:
    """Each optimizer's peak rate, in make_optimizers' order. Taken from the config at every step
    (never from a checkpoint), so a resumed run follows its own config, as learning_rate always did."""
    return [cfg.learning_rate] + ([cfg.muon_lr] if cfg.optimizer == "muon" else [])


# ------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Where a run is, besides weights and optimizer: a checkpoint's meta.json holds it, so a
    resumed run continues with the same step, token count and data position."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    train_loader: dict = field(default_factory=dict)  # ShardLoader.state_dict()
    loss: Optional[float] = None  # of the last step, averaged over processes
    val_loss: Optional[float] = None  # of the last eval
    num_processes: Optional[int] = None  # that wrote the checkpoint

    def advance(self, loss: float, tokens: int, loader: ShardLoader) -> None:
        """Account for one optimizer step that consumed `tokens` tokens from `loader`."""
        self.step += 1
        self.tokens_seen += tokens
        self.train_loader = loader.state_dict()
        self.loss = loss

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, meta: dict) -> None:
        """Take the fields a checkpoint's meta.json holds (it holds more: `files`). Raises
        CheckpointError naming a field of the wrong type (a damaged or hand-edited meta.json)."""
        hints = get_type_hints(TrainState)
        for f in dataclasses.fields(self):
            if f.name not in meta:
                continue
            value, hint = meta[f.name], hints[f.name]
            allowed = tuple(float if a is float else a for a in (get_args(hint) or (hint,)))
            if float in allowed:
                allowed += (int,)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed) \
                    or (isinstance(value, int) and value < 0 and f.name != "loss"):
                raise CheckpointError(f"meta.json: {f.name}={value!r} is not a valid {type_name(hint)}")
            setattr(self, f.name, value)


@dataclass
class Resume:
    """The checkpoint a resumed run starts from, checked and loaded (see RunDir.load)."""

    ckpt: Path
    state: TrainState
    train_config: dict
    model: GPT


# ------------------------------------------------------------------- checkpoints


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every local parameter (a shard under FSDP) is finite."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def gathered_weights(accelerator: Accelerator, model) -> dict | None:
    """Under FSDP, the full weights gathered from every process's shard (a collective); elsewhere
    None, since the unwrapped model holds them already. Names without torch.compile's prefix."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return {k.removeprefix("_orig_mod."): v for k, v in accelerator.get_state_dict(model).items()}


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


def runtime_overrides(cfg: TrainConfig) -> dict:
    """Model settings that are not part of the weights, taken from the run's config."""
    return {k: getattr(cfg.model, k) for k in ("dropout", "gradient_checkpointing", "attention", "loss_impl")}


def try_load_training_state(state_dir: Path, model: GPT, optimizer: str) -> None:
    """Load what Accelerate's load_state will load from `state_dir` (each optimizer state into an
    optimizer of `model` built as the checkpoint's `optimizer` setting builds them, this process's
    RNG state, the fp16 scaler's), on the CPU, and drop it:
    a checkpoint whose files verify but do not load counts as damaged before anything is chosen.
    (Accelerate would only log an RNG file that fails to load, and the resume would not repeat.)
    Loads with weights_only, as Accelerate does: a file that holds code is refused, never run.
    Raises CheckpointError naming the file."""
    from accelerate.utils import load as load_state_file

    rng_file = state_dir / f"random_states_{PartialState().process_index}.pkl"
    path = state_dir / "optimizer.bin"
    try:
        # The optimizers' structure is what counts: the defaults stand in for the rates and betas.
        shape_only = TrainConfig(optimizer=optimizer if optimizer in OPTIMIZERS else "adamw",
                                 muon_lr=TrainConfig.learning_rate)
        for i, opt in enumerate(make_optimizers(model, shape_only, torch.device("cpu"))):
            path = state_dir / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin")  # Accelerate's names
            opt.load_state_dict(load_state_file(path, map_location="cpu"))
        if rng_file.exists():  # absent when the run now has more processes than the one that saved it
            path = rng_file
            rng = load_state_file(path)
            missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(rng)
            if missing:
                raise ValueError(f"no {', '.join(sorted(missing))}")
            torch.get_rng_state().copy_(rng["torch_manual_seed"])  # checks its size and type, changes nothing
        if (state_dir / "scaler.pt").exists():
            path = state_dir / "scaler.pt"
            load_state_file(path)
    except Exception as err:  # noqa: BLE001 -- torch.load and load_state_dict raise many types; all mean "cannot load"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot load {path} ({type(err).__name__}: {first_line[:200]})") from None


# ------------------------------------------------------------------- the run directory

RUN_CONFIG_FILE = checkpoints.TRAIN_CONFIG_FILE  # the run's effective TrainConfig, named as inside each checkpoint
LEGACY_RUN_CONFIG_FILE = checkpoints.HF_CONFIG_FILE  # its name in run directories of earlier versions
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
RUN_FILES = (RUN_CONFIG_FILE, LEGACY_RUN_CONFIG_FILE, LOG_FILE, PLOT_FILE)  # besides ckpt/: what a run writes


def _all_ranks(accelerator: Accelerator, ok: bool) -> bool:
    """True when `ok` holds on every process (one all-reduce), so all of them take the same branch."""
    flag = torch.tensor(0.0 if ok else 1.0, device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


class RunDir:
    """The one owner of a run's out_dir: its lock, claiming it for a new run (with or without
    overwrite), picking and loading the checkpoint to resume (`load`), saving and pruning
    checkpoints (`save`), train_config.json and log.jsonl. Paths and the checkpoint layout come
    from checkpoints.py; the loop never builds a path itself.

    Every process holds one; only the main process writes (`save` is collective: call it on all).

        out_dir/
            train_config.json    the effective TrainConfig, flat keys (config.json in earlier versions)
            log.jsonl            one JSON record per log line and eval
            loss.png             with plot=true
            ckpt/step_XXXXXXX/   checkpoints (layout in checkpoints.py)
    """

    def __init__(self, path: str | Path, is_main: bool, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.is_main = is_main
        self.log = log if is_main else (lambda msg: None)
        self._replaced: list[Path] = []  # an earlier run's outputs, removed by `start`

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @contextlib.contextmanager
    def locked(self):
        """Hold out_dir's lock (atomic.lock_dir) on the main process, so one run at a time writes
        there; the others wait for it before anything in out_dir is read."""
        lock = atomic.lock_dir(self.path, ConfigError, "out_dir") if self.is_main else None
        try:
            yield self
        finally:
            if lock is not None:
                lock.release()

    # ---- claiming

    def claim(self, overwrite: bool) -> None:
        """For a new run: check that out_dir holds no earlier run's outputs, or (with overwrite)
        note them for `start` to remove. Raises ConfigError naming them when overwrite is off, and
        for files of a run's names, or anything under ckpt/ (checkpoints.foreign_entries), that this
        project did not write: nothing is deleted or overwritten."""
        foreign = [p.name for p in (self.path / name for name in RUN_FILES) if p.is_file() and not is_run_output(p)]
        if checkpoints.is_weights_dir(self.path) or foreign:
            what = "model weights" if checkpoints.is_weights_dir(self.path) else "files"
            raise ConfigError(f"out_dir={self.path} holds {what} this project did not write as a run's outputs "
                              f"({', '.join(foreign) or checkpoints.HF_CONFIG_FILE}), which a run would replace; "
                              f"choose another out_dir (nothing was changed)")
        strangers = checkpoints.foreign_entries(self.path)
        if strangers:
            names = ", ".join(str(p.relative_to(self.path)) for p in strangers[:6])
            raise ConfigError(f"out_dir={self.path} holds files under {checkpoints.CKPT_SUBDIR}/ that are not "
                              f"checkpoints this project wrote (no manifest of sizes and SHA-256s that verifies: "
                              f"{names}{' ...' if len(strangers) > 6 else ''}), which a run would not touch: move "
                              f"them away or choose another out_dir (nothing was changed)")
        found = self.outputs()
        if found and not overwrite:
            names = ", ".join(str(p.relative_to(self.path)) for p in found[:4]) + (" ..." if len(found) > 4 else "")
            raise ConfigError(
                f"{self.path} already holds checkpoints or logs of a run ({names}); continue it with "
                f"--init_from=resume, pick another --out_dir, or pass --overwrite=true to replace them "
                f"(only this project's outputs are removed)"
            )
        self._replaced = found

    def outputs(self) -> list[Path]:
        """What an earlier run left here: its files (RUN_FILES and their temporaries, when their
        content is a run's: is_run_output), checkpoints and checkpoint leftovers. Nothing else counts."""
        named = [p for name in RUN_FILES for p in (self.path / name, atomic.tmp_name(self.path / name)) if p.is_file()]
        found = [p for p in named if is_run_output(p)]
        return found + checkpoints.list_checkpoints(self.path) + checkpoints.leftovers(self.path)

    def start(self, cfg: TrainConfig, resume_step: int | None) -> None:
        """Once everything is loaded and checked: remove what `claim` noted, or (resuming from
        resume_step) checkpoint leftovers and log records past that step; then write train_config.json
        (dropping a run config under its earlier name). Main process only."""
        if not self.is_main:
            return
        for path in self._replaced:
            atomic.remove_dir(path) if path.is_dir() else path.unlink(missing_ok=True)
        if resume_step is not None:
            checkpoints.remove_leftovers(self.path)
            truncate_log(self.log_path, resume_step, self.log)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.path / RUN_CONFIG_FILE, cfg.to_flat())
        legacy = self.path / LEGACY_RUN_CONFIG_FILE
        if legacy.is_file() and is_run_output(legacy):
            legacy.unlink()

    # ---- logging

    def append_log(self, record: dict) -> None:
        """Append one record to log.jsonl; a full disk becomes a DiskFullError (a torn line is
        dropped on resume). Main process only."""
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            if atomic.is_disk_full(err, self.path):
                raise atomic.DiskFullError(f"disk full while appending to {self.log_path} ({err}); free some space "
                                           f"and continue with --init_from=resume") from err
            raise

    # ---- checkpoints

    def load(self, cfg: TrainConfig) -> Resume:
        """The newest checkpoint that verifies and loads (weights built with cfg's runtime settings,
        every state file trial-loaded), falling back past damaged ones with a warning naming each
        (checkpoints.load_latest). Every process reads the same files and must pick the same one.
        Raises CheckpointError when none loads."""
        if not checkpoints.list_checkpoints(self.path):
            raise CheckpointError(f"init_from=resume but {checkpoints.ckpt_root(self.path)} holds no checkpoint")
        ckpt, _, resume = checkpoints.load_latest(self.path, lambda c: _load_resume(c, cfg), need_state=True,
                                                  warn=self.log)
        chosen = [ckpt.name]
        broadcast_object_list(chosen)  # from the main process; a no-op with one process
        if chosen[0] != ckpt.name:
            raise CheckpointError(f"processes disagree on the checkpoint to resume from ({chosen[0]} vs {ckpt.name}); "
                                  f"is {self.path} on a file system every machine shares?")
        return resume

    def save(self, accelerator: Accelerator, model, raw_model: GPT, cfg: TrainConfig, state: TrainState) -> Path:
        """Write ckpt/step_XXXXXXX of state.step (layout in checkpoints.py) and prune the old ones.

        Weights go to model.safetensors in GPT-2's HF format, from the unwrapped model (full
        weights gathered under FSDP); Accelerate writes state/. Everything is built in a temporary
        directory that checkpoints.finish publishes once every process has written its part. A
        failure on any process (a full disk, say) removes the temporary directory and raises on
        every process; no older checkpoint is touched.
        """
        final, tmp = checkpoints.step_dir(self.path, state.step), checkpoints.tmp_dir(self.path, state.step)

        def write_parts():
            accelerator.save_state(str(tmp / checkpoints.STATE_SUBDIR))
            full_weights = gathered_weights(accelerator, model)  # collective under FSDP: every process calls it
            if accelerator.is_main_process:
                if lora.is_wrapped(raw_model):  # LoRA: the adapter alone, in PEFT's layout (lora.py)
                    lora.save_adapter(raw_model, tmp)
                else:
                    raw_model.save_pretrained(tmp, state_dict=full_weights,
                                              training={**state.state_dict(), "train_config": cfg.to_flat()})
                atomic.write_json(tmp / checkpoints.TRAIN_CONFIG_FILE, cfg.to_flat())

        self._on_every_process(accelerator, final, self._make_tmp, tmp, main_only=True)
        self._on_every_process(accelerator, final, write_parts)
        self._on_every_process(accelerator, final, checkpoints.finish, tmp, final, state.state_dict(), main_only=True)
        if accelerator.is_main_process:
            checkpoints.prune(self.path, final, cfg.keep_last_ckpts)
        accelerator.wait_for_everyone()
        return final

    def _make_tmp(self, tmp: Path) -> None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_leftovers(self.path)
        tmp.mkdir()

    def _on_every_process(self, accelerator: Accelerator, final: Path, phase, *args, main_only: bool = False) -> None:
        """Run one phase of a save (on the main process only, with main_only), then agree: if it
        failed on any process, the main process removes the temporary directory and every process
        raises (a full disk as DiskFullError)."""
        error = None
        if accelerator.is_main_process or not main_only:
            try:
                phase(*args)
            except Exception as err:  # noqa: BLE001 -- raised below once every process knows
                error = err
        if _all_ranks(accelerator, error is None):
            return
        if accelerator.is_main_process:
            checkpoints.remove_leftovers(self.path)
        if error is not None and atomic.is_disk_full(error, final.parent):
            raise atomic.DiskFullError(f"disk full while writing the checkpoint {final} ({type(error).__name__}: "
                                       f"{error}); the partial checkpoint was removed and older ones are intact: free "
                                       f"some space and continue with --init_from=resume") from error
        if error is not None:
            raise error
        raise CheckpointError(f"another process failed to write its part of {final}; see its error")

    def last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies (its weights were checked finite when it was saved)."""
        good = [ckpt for ckpt in checkpoints.list_checkpoints(self.path) if _verifies(ckpt)]
        return good[-1] if good else None


def is_run_output(path: Path) -> bool:
    """Whether the file `path` (named as one of RUN_FILES, or its temporary) is what a run writes
    there, told by its content, not its name: a JSON object whose keys are all config keys
    (train_config.json, or config.json from earlier versions), JSON lines with an integer step
    (log.jsonl), a PNG (loss.png)."""
    name = path.name.removesuffix(atomic.TMP_SUFFIX)
    try:
        if name == PLOT_FILE:
            with open(path, "rb") as f:
                return f.read(8) == b"\x89PNG\r\n\x1a\n"
        with open(path, "rb") as f:
            text = f.read(1 << 16).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if name in (RUN_CONFIG_FILE, LEGACY_RUN_CONFIG_FILE):
        try:
            saved = json.loads(text)
        except json.JSONDecodeError:
            return False
        return isinstance(saved, dict) and set(saved) <= set(config_keys())
    first = text.split("\n", 1)[0].strip()  # log.jsonl
    try:
        return not first or isinstance(json.loads(first).get("step"), int)
    except (json.JSONDecodeError, AttributeError):
        return False


def _verifies(ckpt: Path) -> bool:
    try:
        checkpoints.verify(ckpt, need_state=True)
    except CheckpointError:
        return False
    return True


def _load_resume(ckpt: Path, cfg: TrainConfig) -> Resume:
    """Load one checkpoint to resume from. Its train_config.json may be of an earlier version
    (flat keys, as now): only `tokens_per_step` and `optimizer` are read from it. Raises
    CheckpointError for whatever does not load."""
    try:
        train_config = json.loads((ckpt / checkpoints.TRAIN_CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt / checkpoints.TRAIN_CONFIG_FILE} is not readable JSON ({err})") from None
    if not isinstance(train_config, dict) or not isinstance(train_config.get("tokens_per_step"), (int, type(None))):
        raise CheckpointError(f"{ckpt / checkpoints.TRAIN_CONFIG_FILE} is not a training config")
    state = TrainState()
    state.load_state_dict(checkpoints.read_meta(ckpt))
    if lora.is_adapter_dir(ckpt):  # LoRA: base + adapter, the adapter trainable (lora.py)
        model = lora.load(ckpt, lambda base: checkpoints.load_model(base, **runtime_overrides(cfg)), trainable=True,
                          lora_dropout=cfg.lora_dropout)
    else:
        model = checkpoints.load_model(ckpt, **runtime_overrides(cfg))
    try_load_training_state(ckpt / checkpoints.STATE_SUBDIR, model, train_config.get("optimizer", "adamw"))
    return Resume(ckpt, state, train_config, model)


# ------------------------------------------------------------------------- setup


SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")  # what the weights fix


def resumed_shape(cfg: TrainConfig, resume: Resume, set_keys: frozenset[str], log) -> TrainConfig:
    """A resume continues its checkpoint's model: the shape keys (and block_size, the training
    window) that neither the config file nor the command line set come from the run's own
    train_config.json, as a fine-tune's shape comes from its weights. Set ones must agree with
    the checkpoint (build_model says so when they do not)."""
    saved = resume.train_config
    adopted = {k: saved[k] for k in SHAPE_KEYS
               if k not in set_keys and k in saved and saved[k] != getattr(cfg.model, k)}
    if not adopted:
        return cfg
    log(f"resume: the model's shape as {resume.ckpt.name} was trained: " + ", ".join(f"{k}={v}" for k, v in adopted.items()))
    try:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **adopted))
    except ValueError as err:
        raise CheckpointError(f"{resume.ckpt / checkpoints.TRAIN_CONFIG_FILE} holds a shape that does not check: {err}") from None


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
        return GPT(cfg.model), cfg
    log(f"fine-tuning from {cfg.init_from}")
    model = checkpoints.load_model(Path(cfg.init_from), **runtime_overrides(cfg))
    # The shape comes from the weights; block_size, the training window, may be shorter than the
    # model's context (e.g. 512-token windows for a 1024-token GPT-2, to save memory).
    if cfg.model.block_size > model.config.block_size:
        raise ConfigError(f"block_size={cfg.model.block_size} exceeds the context of {cfg.init_from} "
                          f"({model.config.block_size} tokens)")
    model = lora.for_run(model, cfg, Path(cfg.init_from), log)  # LoRA: freeze the base, add the adapter
    return model, dataclasses.replace(cfg, model=dataclasses.replace(model.config, block_size=cfg.model.block_size))


def check_vocab(data_dir: str, paths: list[Path], vocab_size: int) -> None:
    """Every token id in the data must be below the model's vocab_size. meta.json (prepare_data.py)
    says which vocabulary the shards use; foreign shards (llm.c, modded-nanogpt) have none, so
    their largest id is read (a vectorised pass over the memmaps)."""
    meta = Path(data_dir) / "meta.json"
    if meta.is_file():
        try:
            data_vocab = json.loads(meta.read_text()).get("vocab_size")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise ShardError(f"{meta} is not a readable JSON object ({err}); run prepare_data.py again") from None
        if data_vocab is not None and (not isinstance(data_vocab, int) or isinstance(data_vocab, bool)):
            raise ShardError(f"{meta}: vocab_size={data_vocab!r} is not a whole number; run prepare_data.py again")
        if data_vocab is not None and data_vocab > vocab_size:
            raise ConfigError(f"{meta} has vocab_size {data_vocab}, larger than the model's vocab_size={vocab_size}")
        return
    largest = shards.max_token_id(paths)
    if largest >= vocab_size:
        raise ConfigError(f"the shards in {data_dir} hold token id {largest}, but the model's vocab_size={vocab_size} "
                          f"only covers ids below it; raise vocab_size or use other data")


def describe_processes(accelerator: Accelerator) -> str:
    """How the run is spread: '1 process on cpu', 'DDP over gloo, 2 processes', 'FSDP over nccl, 8 processes'."""
    kind = accelerator.distributed_type
    if kind == DistributedType.NO:
        return f"1 process on {accelerator.device}"
    name = "FSDP" if kind == DistributedType.FSDP else "DDP" if kind.name.startswith("MULTI_") else kind.name
    return f"{name} over {accelerator.state.backend}, {accelerator.num_processes} processes on {accelerator.device.type}"


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
def val_loss(model, loader: ShardLoader, accelerator: Accelerator, eval_steps: int) -> float:
    """Mean loss per token over the same eval_steps micro-batches every time (evaluation.py's
    window_losses, as eval.py --task val computes it), over every process's windows."""
    model.eval()
    loader.rewind()
    batches = (loader.next_windows() for _ in range(eval_steps))
    total, count = evaluation.window_losses(model, batches, accelerator.device, contextlib.nullcontext())
    model.train()
    sums = accelerator.reduce(torch.tensor([total, count], device=accelerator.device), reduction="sum")
    return (sums[0] / sums[1]).item()


def hellaswag_evaluator(model, max_len: int, examples: list, accelerator: Accelerator,
                        batch_size: int) -> Callable[[], dict[str, float]]:
    """An evaluator of zero-shot HellaSwag (evaluation.py): the examples are shared out across
    processes, the counts summed over them. Every process scores the same number of examples
    (the short shares repeat their first one, uncounted), so each calls the model equally often,
    as FSDP needs."""
    rank, world = accelerator.process_index, accelerator.num_processes
    share = examples[rank::world]
    padded = share + share[:1] * (math.ceil(len(examples) / world) - len(share))

    @torch.no_grad()
    def run() -> dict[str, float]:
        model.eval()
        scores = evaluation.score_choices(model, padded, batch_size, accelerator.device, contextlib.nullcontext(),
                                          max_len=max_len)
        model.train()
        counts = torch.tensor(evaluation.hellaswag_counts(scores[: len(share)], share), dtype=torch.float64,
                              device=accelerator.device)
        n, correct, correct_norm = accelerator.reduce(counts, reduction="sum").tolist()
        return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}

    return run


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


@dataclass
class StepStats:
    """One optimizer step, as every process agrees on it."""

    loss: float  # mean over micro-steps and processes, measured before the update
    grad_norm: float  # global, before clipping
    lr: float
    stop_requested: bool  # a stop signal reached some process
    applied: bool  # False: loss or gradient norm was not finite, so the update was skipped


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
    grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), max_norm), device=loss.device)
    # One all-reduce carries the loss, the norm and any stop request, so every process agrees on all three.
    stop_flag = torch.tensor(float(stop.received is not None), device=loss.device)
    loss, grad_norm, stopped = accelerator.reduce(torch.stack([loss, grad_norm.float(), stop_flag]), "mean").tolist()
    applied = math.isfinite(loss) and (math.isfinite(grad_norm) or cfg.mixed_precision == "fp16")
    for optimizer in optimizers:
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=loss, grad_norm=grad_norm, lr=lr, stop_requested=stopped > 0, applied=applied)


def divergence_error(run_dir: RunDir, step: int, what: str) -> DivergenceError:
    """The error (returned, for the caller to raise) for a non-finite step: names it and the newest
    checkpoint that verifies, whose weights were checked finite when it was saved (or says there is none)."""
    last = run_dir.last_good_checkpoint()
    where = (f"The last good checkpoint is {last} (its weights are all finite): lower learning_rate and "
             f"continue with --init_from=resume" if last else "No checkpoint that verifies was saved yet.")
    return DivergenceError(f"{what} at step {step}; stopping without saving. {where}")


# -------------------------------------------------------------------------- logs


def read_log(path: Path, warn: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """The records of a log.jsonl. A line that is not a JSON object (a write torn by a crash or a
    full disk) is dropped with a warning naming it."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            warn(f"warning: dropping line {number} of {path}, which is not a whole log record: {line[:60]!r}")
            continue
        records.append(record)
    return records


def truncate_log(path: Path, step: int, warn: Callable[[str], None]) -> None:
    """Drop log records past `step` (a resumed run logs those steps again) and torn lines."""
    if path.is_file():
        kept = [r for r in read_log(path, warn) if r["step"] <= step]
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Train and val loss against steps, from log.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
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
    with atomic.atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _format_time(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes}m{sec:02d}s"


# -------------------------------------------------------------------------- fit


@dataclass
class Run:
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


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived before training started: nothing in out_dir was changed."""


def load_data(cfg: TrainConfig, accelerator: Accelerator, vocab_size: int) -> tuple[ShardLoader, ShardLoader]:
    """The train and val loaders of this process, after checking that every token id is below
    vocab_size and that the val split holds eval_steps micro-batches. Raises ConfigError or ShardError."""
    rank, world = accelerator.process_index, accelerator.num_processes
    train_paths, val_paths = list_shards(cfg.data_dir, "train"), list_shards(cfg.data_dir, "val")
    check_vocab(cfg.data_dir, train_paths + val_paths, vocab_size)
    if vocab_size >= VOCAB_SIZE:
        gpt2_tokenizer()  # every checkpoint holds GPT-2's tokenizer (hf_extras.py): fail now, not at the first save
    window, batch = cfg.model.block_size, cfg.micro_batch_size
    train_loader = ShardLoader(train_paths, window, batch, rank, world, seed=cfg.seed, shuffle=True)
    val_loader = ShardLoader(val_paths, window, batch, rank, world, seed=cfg.seed, shuffle=False)
    if val_loader.steps_per_epoch < cfg.eval_steps:
        raise ConfigError(
            f"eval_steps={cfg.eval_steps} needs {cfg.eval_steps * val_loader.windows_per_micro_step} val "
            f"windows but {cfg.data_dir} has {val_loader.num_windows}; lower eval_steps"
        )
    return train_loader, val_loader


def prepare_training(cfg: TrainConfig, accelerator: Accelerator, raw_model: GPT, resume: Resume | None,
                     log: Callable[[str], None] = print):
    """The optimizers, and the model and optimizers as Accelerate prepares them (DDP/FSDP,
    compiled with compile=true), with the resumed checkpoint's optimizer, RNG and scaler state.
    The optimizers' settings (weight decay, betas, momentum, ...) stay the config's: loading a
    state would put back the checkpoint's; a resume that changes one says so through `log`."""
    optimizers = make_optimizers(raw_model, cfg, accelerator.device)
    model, *optimizers = accelerator.prepare(raw_model, *optimizers)
    _skip_model_weights_in_state(accelerator)
    if resume is not None:
        settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                    for opt in optimizers]
        try:  # RunDir.load loaded these files once already; this is not expected to fail
            accelerator.load_state(str(resume.ckpt / checkpoints.STATE_SUBDIR))
        except Exception as err:  # noqa: BLE001 -- torch.load raises many types; the message is kept
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(f"cannot load the optimizer state in {resume.ckpt / checkpoints.STATE_SUBDIR} "
                                  f"({type(err).__name__}: {first_line})") from err
        changed = _restore_settings(optimizers, settings)
        if changed:
            log(f"resume: the config's optimizer settings replace {resume.ckpt.name}'s: {', '.join(changed)}")
    return model, optimizers


def _restore_settings(optimizers, settings: list[list[dict]]) -> list[str]:
    """Put each param group's settings back to `settings` (as built from the config); returns the
    ones that differed from the loaded state ("weight_decay 0.1 -> 0.05"), the learning rate
    aside (the schedule sets it every step)."""
    changed = []
    for opt, groups in zip(optimizers, settings, strict=True):
        for group, wanted in zip(opt.param_groups, groups, strict=True):
            for key, value in wanted.items():
                loaded = group.get(key)
                plain = [list(v) if isinstance(v, tuple) else v for v in (loaded, value)]  # betas may load as a list
                if plain[0] != plain[1] and key not in ("lr", "initial_lr") and f"{key} {loaded} -> {value}" not in changed:
                    changed.append(f"{key} {loaded} -> {value}")
                group[key] = value
    return changed


def setup_run(cfg: TrainConfig, accelerator: Accelerator, run_dir: RunDir, resume: Resume | None,
              stop: StopSignal) -> Run:
    """Model, data, out_dir, optimizer, Accelerate and the starting TrainState, each checked
    before anything is written; an earlier run's outputs are removed only after that. Raises
    Interrupted, before writing anything, when a stop signal arrived during the setup."""
    log = (lambda msg: tqdm.write(msg)) if accelerator.is_main_process else (lambda msg: None)
    if resume is None:
        run_dir.claim(cfg.overwrite)
    accelerator.wait_for_everyone()  # every process has looked before the main process writes there

    raw_model, cfg = build_model(cfg, resume, log)
    train_loader, val_loader = load_data(cfg, accelerator, raw_model.config.vocab_size)
    state = TrainState(train_loader=train_loader.state_dict(), num_processes=accelerator.num_processes)
    if resume is not None:
        state = dataclasses.replace(resume.state, num_processes=accelerator.num_processes)
        train_loader.load_state_dict(state.train_loader)
    examples = (evaluation.load_hellaswag(cfg.hellaswag_data, gpt2_tokenizer(), cfg.hellaswag_limit or None)
                if cfg.hellaswag_data else None)
    if examples is not None:
        evaluation.check_vocab(examples, raw_model.config.vocab_size, cfg.hellaswag_data)
    n_params = raw_model.num_params()
    flops_per_step = raw_model.flops_per_token(cfg.model.block_size) * cfg.tokens_per_step
    model, optimizers = prepare_training(cfg, accelerator, raw_model, resume, log)

    if not _all_ranks(accelerator, stop.received is None):
        raise Interrupted(f"stopped by {stop.received or 'a signal on another process'} before training started; "
                          f"nothing in {run_dir.path} was changed")
    run_dir.start(cfg, resume.state.step if resume is not None else None)  # only now may anything be removed
    accelerator.wait_for_everyone()
    if resume is not None:
        log(f"resumed from {resume.ckpt} at step {state.step}")
    if cfg.log_with:
        accelerator.init_trackers(run_dir.path.name, config=cfg.to_flat())
    log(f"{n_params / 1e6:.2f}M parameters | {describe_processes(accelerator)} | "
        f"{cfg.tokens_per_step:,} tokens/step = {cfg.micro_batch_size} seq x {cfg.model.block_size} tok x "
        f"{cfg.grad_accum_steps} accum x {accelerator.num_processes} proc | mixed_precision={cfg.mixed_precision}")
    evaluators = [lambda: {"val_loss": val_loss(model, val_loader, accelerator, cfg.eval_steps)}]
    if examples is not None:
        evaluators.append(hellaswag_evaluator(model, raw_model.config.block_size, examples, accelerator,
                                              cfg.micro_batch_size))
        log(f"HellaSwag at every eval: {len(examples):,} examples from {cfg.hellaswag_data}")
    return Run(cfg, accelerator, run_dir, raw_model, model, optimizers, train_loader, state, evaluators,
               flops_per_step, log)


def run_evals(run: Run) -> None:
    """Every evaluator's figures, as one record."""
    figures = {name: value for evaluator in run.evaluators for name, value in evaluator().items()}
    run.state.val_loss = figures.get("val_loss", run.state.val_loss)
    run.record(figures, f"step {run.state.step}: " + " | ".join(f"{k} {v:.4f}" for k, v in figures.items()))


class Throughput:
    """Tokens/s and MFU over the steps since the last log line."""

    def __init__(self, run: Run):
        self.run, self.start = run, time.time()
        self.window_start, self.window_steps = self.start, 0

    def step(self) -> None:
        self.window_steps += 1

    def log(self, stats: StepStats) -> None:
        run, cfg = self.run, self.run.cfg
        elapsed = time.time() - self.window_start
        tokens_per_sec = self.window_steps * cfg.tokens_per_step / elapsed
        mfu = (run.flops_per_step * self.window_steps / elapsed / (cfg.peak_flops * run.accelerator.num_processes)
               if cfg.peak_flops else None)
        values = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_per_sec": tokens_per_sec,
                  "mfu": mfu, "tokens_seen": run.state.tokens_seen, "elapsed_sec": time.time() - self.start}
        mfu_text = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
        run.record(values, f"step {run.state.step}/{cfg.max_steps} | loss {stats.loss:.4f} | lr {stats.lr:.2e} | "
                           f"grad_norm {stats.grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s{mfu_text} | "
                           f"{_format_time(values['elapsed_sec'])}")
        self.window_start, self.window_steps = time.time(), 0


def save_if_finite(run: Run) -> None:
    """Save a checkpoint of the current step, after checking on every process that the weights
    are finite (a non-finite one is never written and never replaces a good one). Raises
    DivergenceError when they are not."""
    if not _all_ranks(run.accelerator, weights_are_finite(run.model)):
        raise divergence_error(run.run_dir, run.state.step, "the weights are no longer all finite")
    run.log(f"saved {run.run_dir.save(run.accelerator, run.model, run.raw_model, run.cfg, run.state)}")


def fit(cfg: TrainConfig, accelerator: Accelerator, run_dir: RunDir, resume: Resume | None,
        stop: StopSignal) -> tuple[GPT, dict]:
    """Run training to cfg.max_steps (or a signal caught by `stop`).

    Returns the trained model (unwrapped) and the final TrainState as a dict (step, tokens_seen,
    loss, val_loss, loader position). Raises DivergenceError for a non-finite step, Interrupted
    for a signal before training started.
    """
    run = setup_run(cfg, accelerator, run_dir, resume, stop)
    cfg, state, throughput = run.cfg, run.state, Throughput(run)
    # disable=None: tqdm draws the bar only when stderr is a terminal; a log file gets the log lines alone.
    with tqdm(total=cfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
              disable=None if accelerator.is_main_process else True) as bar:
        if state.step == 0:
            run_evals(run)
        run.model.train()
        while state.step < cfg.max_steps:
            stats = train_step(run.model, run.optimizers, accelerator, run.train_loader, cfg, state.step, stop)
            if not stats.applied:
                raise divergence_error(run_dir, state.step + 1, f"the loss is {stats.loss} and the gradient norm "
                                                               f"{stats.grad_norm} (the update was not applied)")
            state.advance(stats.loss, cfg.tokens_per_step, run.train_loader)
            throughput.step()
            bar.update(1)
            last_step = state.step == cfg.max_steps
            if state.step % cfg.log_interval == 0 or last_step:
                throughput.log(stats)
            if state.step % cfg.eval_interval == 0 or last_step:
                run_evals(run)
            if state.step % cfg.ckpt_interval == 0 or last_step or stats.stop_requested:
                save_if_finite(run)
            if stats.stop_requested:
                run.log(f"stopped by {stop.received or 'a signal on another process'} after step {state.step}. "
                        f"To continue, run the same command with --init_from=resume")
                break
    release_wrapped_model(run)
    accelerator.end_training()  # destroys the process group
    if cfg.plot and accelerator.is_main_process:
        plot_losses(run_dir.log_path, run_dir.path / PLOT_FILE)
    return run.raw_model, state.state_dict()


def release_wrapped_model(run: Run) -> None:
    """Drop and collect the DDP/FSDP-wrapped model while the process group still exists.

    Otherwise DDP's Reducer can outlive destroy_process_group and hold the last reference to the
    gloo process group. Its destructor then joins gloo's worker threads while holding the GIL, and a
    worker still releasing the last collective waits for the GIL: the process never exits, after
    saving its last checkpoint (tests/test_train.py's two-process run checks no wrapper is left).
    """
    run.model = None
    run.evaluators.clear()  # their closures hold the wrapped model
    run.accelerator.free_memory()  # Accelerate's own references; it collects before dropping them
    gc.collect()  # the wrapper sits in reference cycles


# ------------------------------------------------------------------- main


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


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The one Accelerator. With compile=true it compiles the model in prepare(), after wrapping it
    in DDP or FSDP, as Accelerate expects; checkpoints are saved from the uncompiled module."""
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=cfg.log_with or None,
        project_dir=cfg.out_dir,
        dynamo_backend="inductor" if cfg.compile else "no",
    )


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
    resume = run_dir.load(cfg) if cfg.init_from == "resume" else None
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
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        log(f"warning: FSDP was requested (ACCELERATE_USE_FSDP) but Accelerate runs FSDP only on GPUs; this run "
            f"uses {describe_processes(accelerator)}")
    set_seed(cfg.seed)  # same initial weights on every process
    return fit(cfg, accelerator, run_dir, resume, stop)


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
    """cfg.mixed_precision with "auto" decided (devices.mixed_precision may time bf16 against fp32):
    the main process decides, so every process trains alike; its note goes through log."""
    choice = [devices.mixed_precision(cfg.mixed_precision, processes.device, devices.Workload.of("batched", cfg.model))
              if processes.is_main_process else None]
    broadcast_object_list(choice)  # a no-op with one process
    precision, note = choice[0]
    if note:
        log(note)
    return precision


if __name__ == "__main__":
    try:
        sys.exit(exit_status(main))  # bad input: one line, status 2
    except DivergenceError as err:  # the last good checkpoint is kept
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        sys.exit(143 if "SIGTERM" in str(err) else 130)
