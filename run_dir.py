"""A training run's output directory: one `RunDir` owns it (lock, claim, start, save, prune,
resume, log.jsonl), and the loop only tells it the step.

Owns: the run files (train_config.json, log.jsonl, loss.png) and what counts as a run's output;
when a checkpoint is due (ckpt_interval, the last step) and saving it atomically and verified;
picking and loading the checkpoint to resume (TrainState, Resume, every state file trial-loaded);
the log file (read, truncate, plot). The checkpoint layout, its checks and publishing belong to
checkpoints.py; the one Accelerator is built in train.py and passed in, never built here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, get_args, get_type_hints

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, broadcast_object_list

import atomic
import checkpoints
import locks
import lora
from errors import CheckpointError, ConfigError, DivergenceError
from model import GPT
from shards import ShardLoader
from train_config import OPTIMIZERS, TrainConfig, config_keys, type_name

# train.py's make_optimizers(model, cfg, device): a resume trial-loads each optimizer state into them
OptimizerFactory = Callable[[GPT, TrainConfig, torch.device], list[torch.optim.Optimizer]]

RUN_CONFIG_FILE = checkpoints.TRAIN_CONFIG_FILE  # the run's effective TrainConfig, named as inside each checkpoint
LEGACY_RUN_CONFIG_FILE = checkpoints.HF_CONFIG_FILE  # its name in run directories of earlier versions
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
RUN_FILES = (RUN_CONFIG_FILE, LEGACY_RUN_CONFIG_FILE, LOG_FILE, PLOT_FILE)  # besides ckpt/: what a run writes


def all_ranks(accelerator: Accelerator, ok: bool) -> bool:
    """True when `ok` holds on every process (one all-reduce), so all of them take the same branch."""
    flag = torch.tensor(0.0 if ok else 1.0, device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


class RunDir:
    """The one owner of a run's out_dir: its lock, claiming it for a new run (with or without
    overwrite), picking and loading the checkpoint to resume (`load`), saving and pruning
    checkpoints (`save(state, ...)`: it decides whether one is due, the loop only passes the step),
    train_config.json and log.jsonl. Paths and the checkpoint layout come from checkpoints.py; the
    loop never builds a path itself.

    Every process holds one; only the main process writes (`save` is collective: call it on all).

        out_dir/
            train_config.json    the effective TrainConfig, flat keys (config.json in earlier versions)
            log.jsonl            one JSON record per log line and eval
            loss.png             with plot=true
            lora_base/           a LoRA run's base when it has no directory of its own (lora.py)
            ckpt/step_XXXXXXX/   checkpoints (layout in checkpoints.py)
    """

    def __init__(self, path: str | Path, is_main: bool, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.is_main = is_main
        self.log = log if is_main else (lambda msg: None)
        self._replaced: list[Path] = []  # an earlier run's outputs, removed by `start`
        self._not_pruned: set[Path] = set()  # directories under ckpt/ prune left alone, named once
        self.cfg: TrainConfig | None = None  # set by `start`, for `save`
        self.accelerator: Accelerator | None = None

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @contextlib.contextmanager
    def locked(self):
        """Hold out_dir's lock (locks.lock_dir) on the main process, so one run at a time writes
        there; the others wait for it before anything in out_dir is read."""
        lock = locks.lock_dir(self.path, ConfigError, "out_dir") if self.is_main else None
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
        _refuse_foreign(self.path)
        found = run_outputs(self.path)
        if found and not overwrite:
            names = ", ".join(str(p.relative_to(self.path)) for p in found[:4]) + (" ..." if len(found) > 4 else "")
            raise ConfigError(
                f"{self.path} already holds checkpoints or logs of a run ({names}); continue it with "
                f"--init_from=resume, pick another --out_dir, or pass --overwrite=true to replace them "
                f"(only this project's outputs are removed)"
            )
        self._replaced = found

    def start(self, cfg: TrainConfig, accelerator: Accelerator, resume_step: int | None, raw_model: GPT) -> None:
        """Once everything is loaded and checked: remove what `claim` noted, or (resuming from
        resume_step) checkpoint leftovers and log records past that step; then write train_config.json
        (dropping a run config under its earlier name) and, for a LoRA run over a base with no
        directory of its own, that base (lora.write_run_base). From here on `save` works with this
        cfg (the run's final one) and accelerator. Collective in name only: the main process writes."""
        self.cfg, self.accelerator = cfg, accelerator
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
        lora.write_run_base(raw_model)

    # ---- logging

    def append_log(self, record: dict) -> None:
        """Append one record to log.jsonl (append_record). Main process only."""
        append_record(self.log_path, record)

    # ---- checkpoints

    def load(self, cfg: TrainConfig, make_optimizers: OptimizerFactory) -> Resume:
        """The newest checkpoint that verifies and loads (weights built with cfg's runtime settings,
        every state file trial-loaded into optimizers built by make_optimizers, train.py's), falling
        back past damaged ones with a warning naming each (checkpoints.load_latest). Every process
        reads the same files and must pick the same one. Raises CheckpointError when none loads."""
        if not checkpoints.list_checkpoints(self.path):
            raise CheckpointError(f"init_from=resume but {checkpoints.ckpt_root(self.path)} holds no checkpoint")
        ckpt, _, resume = checkpoints.load_latest(self.path, lambda c: _load_resume(c, cfg, make_optimizers),
                                                  need_state=True, warn=self.log)
        chosen = [ckpt.name]
        broadcast_object_list(chosen)  # from the main process; a no-op with one process
        if chosen[0] != ckpt.name:
            raise CheckpointError(f"processes disagree on the checkpoint to resume from ({chosen[0]} vs {ckpt.name}); "
                                  f"is {self.path} on a file system every machine shares?")
        return resume

    def save(self, state: TrainState, model, raw_model: GPT, last_step: bool = False) -> Path | None:
        """Save a checkpoint of state.step if one is due: every ckpt_interval steps, and at the last
        step (last_step: the end of the run, or a stop). Returns it, or None when none was due.

        `model` as Accelerate prepared it, `raw_model` the unwrapped, uncompiled module it wraps.
        Collective: call it on every process. The weights are checked finite on every process
        first; a non-finite one is never written and never replaces a good one (DivergenceError).
        """
        if state.step % self.cfg.ckpt_interval != 0 and not last_step:
            return None
        if not all_ranks(self.accelerator, weights_are_finite(model)):
            raise self.divergence_error(state.step, "the weights are no longer all finite")
        return self._write(state, model, raw_model)

    def _write(self, state: TrainState, model, raw_model: GPT) -> Path:
        """Write ckpt/step_XXXXXXX of state.step (layout in checkpoints.py) and prune the old ones.

        Weights as _save_weights writes them; Accelerate writes state/. All is built in a temporary
        directory that checkpoints.finish publishes once every process has written its part. A failure
        on any process (a full disk) removes it and raises on every process; no older one is touched.
        """
        cfg, accelerator = self.cfg, self.accelerator
        final, tmp = checkpoints.step_dir(self.path, state.step), checkpoints.tmp_dir(self.path, state.step)

        def write_parts():
            accelerator.save_state(str(tmp / checkpoints.STATE_SUBDIR))
            full_weights = gathered_weights(accelerator, model)  # collective under FSDP: every process calls it
            if accelerator.is_main_process:
                _save_weights(raw_model, full_weights, tmp, {**state.state_dict(), "train_config": cfg.to_flat()})
                atomic.write_json(tmp / checkpoints.TRAIN_CONFIG_FILE, cfg.to_flat())

        _on_every_process(accelerator, self.path, final, _make_tmp, self.path, tmp, main_only=True)
        _on_every_process(accelerator, self.path, final, write_parts)
        _on_every_process(accelerator, self.path, final, checkpoints.finish, tmp, final, state.state_dict(),
                          main_only=True)
        if accelerator.is_main_process:
            checkpoints.prune(self.path, final, cfg.keep_last_ckpts, warn=self._left_alone)
        accelerator.wait_for_everyone()
        return final

    def _left_alone(self, kept: list[Path]) -> None:
        """Name, once, what prune found under ckpt/ that is not a checkpoint this project wrote."""
        new = [p for p in kept if p not in self._not_pruned]
        self._not_pruned.update(new)
        if new:
            self.log(f"warning: leaving {', '.join(str(p) for p in new)} alone when pruning: not a checkpoint "
                     f"this project wrote (no manifest of sizes and SHA-256s that verifies)")

    def divergence_error(self, step: int, what: str) -> DivergenceError:
        """The error (returned, for the caller to raise) for a non-finite step: names it and the newest
        checkpoint that verifies, whose weights were checked finite when it was saved (or says there is none)."""
        good = next((c for c in reversed(checkpoints.list_checkpoints(self.path)) if _verifies(c)), None)
        where = (f"The last good checkpoint is {good} (its weights are all finite): lower learning_rate and "
                 f"continue with --init_from=resume" if good else "No checkpoint that verifies was saved yet.")
        return DivergenceError(f"{what} at step {step}; stopping without saving. {where}")


# ------------------------------------------------------------------ claiming and saving, helpers


def _refuse_foreign(out_dir: Path) -> None:
    """Raise ConfigError, changing nothing, when out_dir holds model weights, files of a run's
    names that this project did not write (is_run_output), or anything under ckpt/ that is not
    its checkpoints (checkpoints.foreign_entries): a run would replace or not touch them."""
    foreign = [p.name for p in (out_dir / name for name in RUN_FILES) if p.is_file() and not is_run_output(p)]
    foreign += [p.name for p in _run_base_paths(out_dir) if p.exists() and not lora.is_run_base(p)]
    if checkpoints.is_weights_dir(out_dir) or foreign:
        what = "model weights" if checkpoints.is_weights_dir(out_dir) else "files"
        raise ConfigError(f"out_dir={out_dir} holds {what} this project did not write as a run's outputs "
                          f"({', '.join(foreign) or checkpoints.HF_CONFIG_FILE}), which a run would replace; "
                          f"choose another out_dir (nothing was changed)")
    strangers = checkpoints.foreign_entries(out_dir)
    if strangers:
        names = ", ".join(str(p.relative_to(out_dir)) for p in strangers[:6])
        raise ConfigError(f"out_dir={out_dir} holds files under {checkpoints.CKPT_SUBDIR}/ that are not "
                          f"checkpoints this project wrote (no manifest of sizes and SHA-256s that verifies: "
                          f"{names}{' ...' if len(strangers) > 6 else ''}), which a run would not touch: move "
                          f"them away or choose another out_dir (nothing was changed)")


def _save_weights(raw_model: GPT, full_weights: dict | None, tmp: Path, training: dict) -> None:
    """A checkpoint's weights, from the unwrapped model: model.safetensors in GPT-2's HF format (the
    full weights gathered under FSDP), or for a LoRA run the adapter alone, in PEFT's layout (lora.py)."""
    if lora.is_wrapped(raw_model):
        lora.save_adapter(raw_model, tmp)
    else:
        raw_model.save_pretrained(tmp, state_dict=full_weights, training=training)


def _make_tmp(out_dir: Path, tmp: Path) -> None:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_leftovers(out_dir)
    tmp.mkdir()


def _on_every_process(accelerator: Accelerator, out_dir: Path, final: Path, phase, *args,
                      main_only: bool = False) -> None:
    """Run one phase of a save (on the main process only, with main_only), then agree: if it
    failed on any process, the main process removes the temporary directory and every process
    raises (a full disk as DiskFullError)."""
    error = None
    if accelerator.is_main_process or not main_only:
        try:
            phase(*args)
        except Exception as err:  # noqa: BLE001 -- raised below once every process knows
            error = err
    if all_ranks(accelerator, error is None):
        return
    if accelerator.is_main_process:
        checkpoints.remove_leftovers(out_dir)
    if error is not None and atomic.is_disk_full(error, final.parent):
        raise atomic.DiskFullError(f"disk full while writing the checkpoint {final} ({type(error).__name__}: "
                                   f"{error}); the partial checkpoint was removed and older ones are intact: free "
                                   f"some space and continue with --init_from=resume") from error
    if error is not None:
        raise error
    raise CheckpointError(f"another process failed to write its part of {final}; see its error")


# ------------------------------------------------------------------ what a run writes, what it resumes from


def run_outputs(out_dir: Path) -> list[Path]:
    """What an earlier run left in out_dir: its files (RUN_FILES and their temporaries, when their
    content is a run's: is_run_output), a LoRA base it wrote (lora.is_run_base), checkpoints and
    checkpoint leftovers. Nothing else counts."""
    named = [p for name in RUN_FILES for p in (out_dir / name, atomic.tmp_name(out_dir / name)) if p.is_file()]
    found = [p for p in named if is_run_output(p)] + [p for p in _run_base_paths(out_dir) if lora.is_run_base(p)]
    return found + checkpoints.list_checkpoints(out_dir) + checkpoints.leftovers(out_dir)


def _run_base_paths(out_dir: Path) -> tuple[Path, Path]:
    """lora.run_base_dir(out_dir) and its temporary name."""
    return lora.run_base_dir(out_dir), atomic.tmp_name(lora.run_base_dir(out_dir))


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


def _load_resume(ckpt: Path, cfg: TrainConfig, make_optimizers: OptimizerFactory) -> Resume:
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
    # a LoRA checkpoint: its base with the adapter kept trainable
    model = checkpoints.load_model(ckpt, lora_trainable=True, lora_dropout=cfg.lora_dropout, **runtime_overrides(cfg))
    try_load_training_state(ckpt / checkpoints.STATE_SUBDIR, model, train_config.get("optimizer", "adamw"),
                            make_optimizers)
    return Resume(ckpt, state, train_config, model)


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
    device: Optional[str] = None  # the device type that wrote it ("cpu", "cuda"); None in older checkpoints

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

    def rng_note(self, device: torch.device) -> str:
        """What the resume line adds when this checkpoint brings no CUDA random state for a CUDA run
        (Accelerate saves it only where CUDA was present, and skips it silently on load)."""
        saved_on = self.state.device
        if device.type != "cuda" or saved_on == "cuda":
            return ""
        return (f" (it was saved on {saved_on or 'a device it does not record'}, with no CUDA random state: dropout "
                f"on the GPU draws anew from here)")

    def restore(self, accelerator: Accelerator, optimizers: list[torch.optim.Optimizer],
                log: Callable[[str], None]) -> None:
        """Load the checkpoint's optimizer, RNG and scaler state (Accelerate's load_state) into the
        prepared `optimizers`. Their settings (weight decay, betas, momentum, ...) stay the config's:
        loading a state would put back the checkpoint's; a resume that changes one says so through `log`."""
        settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                    for opt in optimizers]
        try:  # RunDir.load loaded these files once already; this is not expected to fail
            accelerator.load_state(str(self.ckpt / checkpoints.STATE_SUBDIR))
        except Exception as err:  # noqa: BLE001 -- torch.load raises many types; the message is kept
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(f"cannot load the optimizer state in {self.ckpt / checkpoints.STATE_SUBDIR} "
                                  f"({type(err).__name__}: {first_line})") from err
        changed = _restore_settings(optimizers, settings)
        if changed:
            log(f"resume: the config's optimizer settings replace {self.ckpt.name}'s: {', '.join(changed)}")


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


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every local parameter (a shard under FSDP: FSDP2's DTensors are checked through
    their local part, so no process gathers the others') is finite."""
    return all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())


def gathered_weights(accelerator: Accelerator, model) -> dict | None:
    """Under FSDP, the full weights gathered from every process's shard (a collective); elsewhere
    None, since the unwrapped model holds them already. Names without torch.compile's prefix."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return {k.removeprefix("_orig_mod."): v for k, v in accelerator.get_state_dict(model).items()}


def skip_model_weights_in_state(accelerator: Accelerator) -> None:
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


def try_load_training_state(state_dir: Path, model: GPT, optimizer: str, make_optimizers: OptimizerFactory) -> None:
    """Load what Accelerate's load_state will load from `state_dir` (each optimizer state into an
    optimizer of `model` built by make_optimizers as the checkpoint's `optimizer` setting builds them, this process's
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


# ------------------------------------------------------------------ log.jsonl


def append_record(path: Path, record: dict) -> None:
    """Append one record to a log.jsonl; a full disk becomes a DiskFullError (a torn line is
    dropped on resume)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        if atomic.is_disk_full(err, path.parent):
            raise atomic.DiskFullError(f"disk full while appending to {path} ({err}); free some space "
                                       f"and continue with --init_from=resume") from err
        raise


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
