"""The training config: one frozen dataclass holding every knob of a run with its default, how a
config file and --key=value overrides become one (with each problem named), `train.py --help`, and
what is derived from it for a number of processes (the batch plan, the schedule's end).

No Accelerate here: the trainer, the benchmarks and the tests read and check configs without it.
A config file is Python, executed as it is read (as in nanoGPT): trust it like a script.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, get_args, get_origin, get_type_hints

import torch

from errors import ConfigError
from model import GPTConfig


@dataclass(frozen=True)
class TrainConfig:
    """Every training knob with its default, built once (from_flat) and never changed: what is
    derived from it (with_derived, a fine-tune's shape, the resolved mixed_precision) is a new
    TrainConfig. Config files and --key=value set the flat keys (config_keys()): the model's
    own fields are set by name (n_layer=4) and live once, in `model`."""

    # data and outputs
    data_dir: str = "data/shakespeare"  # holds train_*.bin and val_*.bin (prepare_data.py)
    out_dir: str = "out/run"  # checkpoints, log.jsonl, train_config.json
    init_from: str = "scratch"  # "scratch", "resume" (latest checkpoint in out_dir) or a GPT-2 dir
    overwrite: bool = False  # let a scratch run replace an earlier run's outputs in out_dir (only those)
    seed: int = 1337
    # the model (set by its fields' names: n_layer=4, block_size=256, ...; MODEL_KEYS)
    model: GPTConfig = field(default_factory=GPTConfig)
    # batch: one optimizer step sees micro_batch_size x grad_accum_steps x processes sequences
    micro_batch_size: int = 8  # sequences per process per forward/backward
    grad_accum_steps: Optional[int] = None  # None: 1, or derived from tokens_per_step
    tokens_per_step: Optional[int] = None  # global batch in tokens; sets grad_accum_steps
    # optimizer and schedule (step = one optimizer update)
    max_steps: int = 1000  # optimizer steps
    warmup_steps: int = 100  # linear warmup; clipped to max_steps when lr_decay_steps is None
    lr_decay_steps: Optional[int] = None  # end of the cosine; None: max_steps
    learning_rate: float = 6e-4  # peak
    min_lr: float = 6e-5  # end of the cosine, and flat after it
    weight_decay: float = 0.1  # AdamW decay on matrices; none on biases and LayerNorm
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    optimizer: str = "adamw"  # "adamw", or "muon": torch.optim.Muon for the blocks' matrices, AdamW for the rest
    muon_lr: Optional[float] = None  # Muon's peak rate (the schedule scales it as learning_rate); None: learning_rate
    muon_adjust_lr: str = "match_rms_adamw"  # Muon's per-matrix rate: "match_rms_adamw" (x 0.2 sqrt(max(A, B))) or "original" (x sqrt(max(1, A/B)))
    muon_momentum: float = 0.95  # Muon's momentum
    muon_nesterov: bool = True  # Nesterov momentum in Muon
    muon_weight_decay: float = 0.0  # Muon's decoupled decay (times its current rate)
    # LoRA (lora.py, through peft): low-rank adapters train, the base weights stay frozen
    lora_rank: int = 0  # adapter rank r; 0: full fine-tune. A base with no directory (scratch, a LoRA checkpoint) is saved to out_dir/lora_base
    lora_alpha: float = 16.0  # the adapter's update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "c_attn,c_proj,c_fc"  # comma-separated module names adapted in every block (c_proj: attn and mlp)
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between evals (also at step 0 and the last step)
    eval_steps: int = 20  # micro-batches per eval, per process
    hellaswag_data: str = ""  # HellaSwag .jsonl or save_to_disk dir (make hellaswag): zero-shot accuracy at each eval
    hellaswag_limit: int = 0  # HellaSwag examples per eval, shared out across processes; 0: all
    log_interval: int = 10  # steps between log lines
    ckpt_interval: int = 500  # steps between checkpoints (also at the last step)
    keep_last_ckpts: int = 2  # checkpoints kept; older ones are removed
    # speed
    mixed_precision: str = "no"  # "no", "bf16", "fp16", or "auto" (bf16 where measured clearly faster: precision.py)
    compile: bool = False  # torch.compile (inductor; works on CPU too)
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU in the logs; 0: MFU not shown
    # extras
    log_with: str = ""  # an Accelerate tracker: "tensorboard", "wandb", ...
    plot: bool = False  # write out_dir/loss.png at the end (needs matplotlib)

    @classmethod
    def from_flat(cls, **values) -> "TrainConfig":
        """The config that flat keys (a config file's names, --key=value) describe; keys not given
        keep their defaults. Raises ConfigError listing every problem: GPTConfig's own check of the
        model keys and config_problems' of the rest."""
        model_values = {k: values.pop(k) for k in MODEL_KEYS if k in values}
        try:
            model, problems = GPTConfig(**model_values), []
        except ValueError as err:
            model, problems = GPTConfig(), [str(err)]  # a stand-in, so the other fields are checked too
        cfg = cls(model=model, **values)
        problems += config_problems(cfg)
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return cfg

    def to_flat(self) -> dict:
        """The flat keys and their values, in config_keys() order: what train_config.json holds,
        and what from_flat and a config file take back."""
        return {k: getattr(self.model if k in MODEL_KEYS else self, k) for k in config_keys()}


# GPTConfig's fields a run sets; GPT-2 ties its embeddings, and so does every run.
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "tie_embeddings")
# What a model field means for training, beside (or instead of) GPTConfig's own comment.
MODEL_KEY_NOTES = {
    "block_size": "the training window: with init_from a GPT-2 dir it may be shorter than the weights' context",
    "vocab_size": "must exceed every token id in the data",
    "n_layer": "transformer blocks; with init_from a GPT-2 dir the shape (n_layer, n_head, n_embd, vocab_size) "
               "comes from its weights",
    "n_head": "attention heads; n_embd must be divisible by it",
    "n_embd": "width of the residual stream",
}
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("match_rms_adamw", "original")  # torch.optim.Muon's adjust_lr_fn
MUON_TORCH = "2.9"  # the first torch with torch.optim.Muon
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # the Linear layers of a block (STYLE.md, Names)


def config_keys() -> dict[str, type]:
    """Every flat key with its type hint, in TrainConfig's order with `model` spelled out."""
    own, model = get_type_hints(TrainConfig), get_type_hints(GPTConfig)
    keys = {}
    for f in dataclasses.fields(TrainConfig):
        keys.update({k: model[k] for k in MODEL_KEYS} if f.name == "model" else {f.name: own[f.name]})
    return keys


def _defaults() -> dict:
    return TrainConfig().to_flat()


def _closest(name: str) -> str:
    match = difflib.get_close_matches(name, list(config_keys()), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def type_name(hint) -> str:
    if get_origin(hint) is not None and type(None) in get_args(hint):
        return next(a for a in get_args(hint) if a is not type(None)).__name__ + " or None"
    return hint.__name__


def _source_comments(cls) -> dict[str, str]:
    """The comment beside each field of a dataclass, read from its source."""
    found = (re.match(r"\s+(\w+):[^=]+=.*?#\s*(.+)$", line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def config_help(usage: str) -> str:
    """`train.py --help`: `usage` (the command lines), then every flat key with its type, default and the
    comment beside its field in the source (TrainConfig's, or GPTConfig's with MODEL_KEY_NOTES)."""
    comments = {**_source_comments(TrainConfig), **_source_comments(GPTConfig)}
    for key, note in MODEL_KEY_NOTES.items():
        comments[key] = f"{comments[key]}; {note}" if key in comments else note
    rows = [f"  --{key}={value!s}".ljust(34) + f" {type_name(config_keys()[key])}."
            + (f" {comments[key]}" if key in comments else "") for key, value in _defaults().items()]
    return ("usage:\n" + usage + "\n\nA config file (Python, executed: trust it like a script) sets keys by "
            "assignment; --key=value overrides them.\nkeys (default, type, meaning):\n" + "\n".join(rows))


def _convert(name: str, value, from_string: bool):
    """Check (config file) or convert (command line) one value to its key's type."""
    hint = config_keys()[name]
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


def _config_file_values(path: Path) -> dict:
    """The keys a config file assigns, checked against config_keys() and their types. The file is
    executed: it must be trusted like a script. Raises ConfigError naming the file and the problem."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        code = compile(source, str(path), "exec")
    except (SyntaxError, ValueError) as err:
        where = f" at line {err.lineno}" if getattr(err, "lineno", None) else ""
        raise ConfigError(f"config file {path} is not valid Python{where}: {getattr(err, 'msg', err)}") from None
    scope: dict = {}
    try:
        exec(code, scope)
    except Exception as err:  # noqa: BLE001 -- a config file is a script; whatever it raises is the user's
        line = next((f.lineno for f in reversed(traceback.extract_tb(err.__traceback__))
                     if f.filename == str(path)), None)
        raise ConfigError(f"config file {path} raised {type(err).__name__}"
                          f"{f' at line {line}' if line else ''}: {err}") from None
    values = {}
    for key, value in scope.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        if key not in config_keys():
            raise ConfigError(f"{path}: unknown config key {key!r}{_closest(key)}")
        values[key] = _convert(key, value, from_string=False)
    return values


def load_config(argv: list[str]) -> TrainConfig:
    """TrainConfig from an optional config file (first argument) and --key=value overrides.

    Unknown keys, values of the wrong type and malformed arguments raise ConfigError naming them;
    every value is then checked (TrainConfig.from_flat), all problems in one ConfigError.
    """
    return TrainConfig.from_flat(**config_values(argv))


def config_values(argv: list[str]) -> dict:
    """The flat keys the config file and the --key=value overrides set, converted (see load_config)."""
    args = list(argv)
    values = _config_file_values(Path(args.pop(0))) if args and not args[0].startswith("--") else {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --field=value, got {arg!r} (python train.py --help lists the fields)")
        key, value = arg[2:].split("=", 1)
        if key not in config_keys():
            raise ConfigError(f"unknown config key {key!r}{_closest(key)}")
        values[key] = _convert(key, value, from_string=True)
    return values


def config_problems(cfg: TrainConfig) -> list[str]:
    """Every problem with cfg's own fields (GPTConfig checks `model` itself), each naming the key,
    its value and the rule; [] when there is none."""
    problems = []

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    for name in ("micro_batch_size", "max_steps", "eval_interval", "eval_steps", "log_interval", "ckpt_interval",
                 "keep_last_ckpts"):
        need(getattr(cfg, name) >= 1, f"{name}={getattr(cfg, name)} must be >= 1")
    for name in ("grad_accum_steps", "tokens_per_step"):
        need(getattr(cfg, name) is None or getattr(cfg, name) >= 1, f"{name}={getattr(cfg, name)} must be >= 1")
    need(cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps} must be >= 0")
    need(cfg.lr_decay_steps is None or cfg.lr_decay_steps >= cfg.warmup_steps,
         f"lr_decay_steps={cfg.lr_decay_steps} must be >= warmup_steps={cfg.warmup_steps}")
    need(cfg.learning_rate > 0, f"learning_rate={cfg.learning_rate} must be > 0")
    need(0 <= cfg.min_lr <= cfg.learning_rate, f"min_lr={cfg.min_lr} must be in [0, learning_rate={cfg.learning_rate}]")
    need(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} must be >= 0")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, f"beta1={cfg.beta1}, beta2={cfg.beta2} must be in [0, 1)")
    need(cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip} must be >= 0 (0 disables)")
    need(cfg.mixed_precision in MIXED_PRECISION, f"mixed_precision={cfg.mixed_precision!r} must be one of {MIXED_PRECISION}")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer={cfg.optimizer!r} must be one of {OPTIMIZERS}")
    if cfg.optimizer == "muon":
        problems += _muon_problems(cfg)
    problems += _lora_problems(cfg)
    # Every checkpoint is a GPT-2 Hugging Face directory, whose layout has every bias: say so now,
    # not at the first save after ckpt_interval steps of training.
    need(cfg.model.bias, "bias=False cannot be checkpointed: checkpoints are GPT-2 Hugging Face directories, "
                         "which have biases everywhere; keep bias=True")
    need(cfg.peak_flops >= 0, f"peak_flops={cfg.peak_flops} must be >= 0")
    need(cfg.hellaswag_limit >= 0, f"hellaswag_limit={cfg.hellaswag_limit} must be >= 0 (0: every example)")
    need(not cfg.hellaswag_data or Path(cfg.hellaswag_data).exists(),
         f"hellaswag_data={cfg.hellaswag_data} does not exist (make hellaswag writes data/hellaswag)")
    need(cfg.init_from in ("scratch", "resume") or Path(cfg.init_from).is_dir(),
         f"init_from={cfg.init_from!r} must be 'scratch', 'resume' or an existing GPT-2 directory")
    need(not Path(cfg.out_dir).exists() or Path(cfg.out_dir).is_dir(), f"out_dir={cfg.out_dir} is a file, not a directory")
    return problems + _extras_problems(cfg)


def _muon_problems(cfg: TrainConfig) -> list[str]:
    checks = [
        (hasattr(torch.optim, "Muon"), f"optimizer=muon needs torch.optim.Muon, in torch >= {MUON_TORCH}; "
                                       f"this torch is {torch.__version__}"),
        (cfg.muon_lr is None or cfg.muon_lr > 0, f"muon_lr={cfg.muon_lr} must be > 0"),
        (cfg.muon_adjust_lr in MUON_ADJUST_LR, f"muon_adjust_lr={cfg.muon_adjust_lr!r} must be one of {MUON_ADJUST_LR}"),
        (0 <= cfg.muon_momentum < 1, f"muon_momentum={cfg.muon_momentum} must be in [0, 1)"),
        (cfg.muon_weight_decay >= 0, f"muon_weight_decay={cfg.muon_weight_decay} must be >= 0"),
        # Accelerate's GradScaler steps and updates once per optimizer: with two, the second one's
        # gradients would be unscaled twice.
        (cfg.mixed_precision != "fp16", "optimizer=muon does not run with mixed_precision='fp16' (Accelerate's "
                                        "loss scaler handles one optimizer per step); use bf16 or no"),
    ]
    return [message for ok, message in checks if not ok]


def lora_targets(cfg: TrainConfig) -> list[str]:
    """cfg.lora_targets as a list of module names."""
    return [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]


def _lora_problems(cfg: TrainConfig) -> list[str]:
    import importlib.util
    import os

    targets = lora_targets(cfg)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    problems = [message for ok, message in [
        (cfg.lora_rank >= 0, f"lora_rank={cfg.lora_rank} must be >= 0 (0: full fine-tune)"),
        (cfg.lora_alpha > 0, f"lora_alpha={cfg.lora_alpha} must be > 0"),
        (0 <= cfg.lora_dropout < 1, f"lora_dropout={cfg.lora_dropout} must be in [0, 1)"),
        (bool(targets) and not unknown, f"lora_targets={cfg.lora_targets!r}: {', '.join(map(repr, unknown)) or 'none'} "
                                        f"is not one of the blocks' modules {LORA_TARGETS}"),
    ] if not ok]
    if cfg.lora_rank <= 0 or problems:
        return problems
    checks = [
        # A scratch run saves its frozen base as a GPT-2 directory (lora.write_run_base), biases and all
        (cfg.init_from != "scratch" or cfg.model.bias, "lora_rank > 0 with init_from=scratch saves the base as a "
                                                        "GPT-2 directory, which has biases: set bias=true"),
        # Muon orthogonalises whole matrices; the adapters' thin A and B are not what it is for.
        (cfg.optimizer != "muon", "optimizer=muon does not run with lora_rank > 0; use optimizer=adamw"),
        (os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true", "yes", "on"),
         "lora_rank > 0 does not run under FSDP (ACCELERATE_USE_FSDP): use DDP, or a full fine-tune with FSDP"),
        (importlib.util.find_spec("peft") is not None, "lora_rank > 0 needs peft: pip install -e '.[lora]'"),
    ]
    return [message for ok, message in checks if not ok]


def _extras_problems(cfg: TrainConfig) -> list[str]:
    """The optional packages that log_with and plot need."""
    problems = []
    if cfg.log_with:
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        known = [t.value for t in LoggerType]
        installed = [t.value for t in get_available_trackers()]
        if cfg.log_with not in known:
            problems.append(f"log_with={cfg.log_with!r} must be one of {known}")
        elif cfg.log_with not in installed + ["all"]:
            problems.append(f"log_with={cfg.log_with!r} is not installed here (installed trackers: "
                            f"{installed or 'none'}); pip install {cfg.log_with}")
    if cfg.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            problems.append("plot=true needs matplotlib: pip install -e '.[plot]'")
    return problems


def with_derived(cfg: TrainConfig, world_size: int, log: Callable[[str], None] = lambda msg: None,
                 resume_tokens_per_step: int | None = None) -> TrainConfig:
    """A new TrainConfig with what cfg leaves open filled in: the batch plan (grad_accum_steps,
    tokens_per_step) for world_size processes, the schedule's end (lr_decay_steps, and warmup_steps
    clipped to max_steps when the cosine ends with the run, with a note through log) and muon_lr.

    resume_tokens_per_step, the global batch of the checkpoint being resumed, is kept when the
    number of processes changed: the accumulation is re-derived, with a note. Raises ConfigError
    when the batch plan cannot be met.
    """
    grad_accum_steps, tokens_per_step = batch_plan(cfg, world_size, log, resume_tokens_per_step)
    warmup_steps, lr_decay_steps = cfg.warmup_steps, cfg.lr_decay_steps
    if lr_decay_steps is None:  # the cosine ends with the run; a shortened run warms up at most all of it
        if warmup_steps > cfg.max_steps:
            log(f"note: warmup_steps={warmup_steps} is more than max_steps={cfg.max_steps}; warming up over "
                f"all {cfg.max_steps} steps")
            warmup_steps = cfg.max_steps
        lr_decay_steps = cfg.max_steps
    muon_lr = cfg.learning_rate if cfg.optimizer == "muon" and cfg.muon_lr is None else cfg.muon_lr
    return dataclasses.replace(cfg, grad_accum_steps=grad_accum_steps, tokens_per_step=tokens_per_step,
                               warmup_steps=warmup_steps, lr_decay_steps=lr_decay_steps, muon_lr=muon_lr)


def batch_plan(cfg: TrainConfig, world_size: int, log: Callable[[str], None],
               resume_tokens_per_step: int | None) -> tuple[int, int]:
    """(grad_accum_steps, tokens_per_step) for world_size processes: from tokens_per_step when it is
    set (or kept from the checkpoint being resumed), else grad_accum_steps (default 1). Raises
    ConfigError when tokens_per_step is not a whole number of micro-steps or contradicts the others."""
    per_micro = cfg.micro_batch_size * world_size * cfg.model.block_size  # tokens per micro-step, all processes
    tokens, accum = cfg.tokens_per_step, cfg.grad_accum_steps
    if resume_tokens_per_step is not None:
        if tokens not in (None, resume_tokens_per_step):
            raise ConfigError(f"invalid config: tokens_per_step={tokens} differs from the checkpoint's "
                              f"{resume_tokens_per_step}; a resumed run keeps its global batch (start a new run to "
                              f"change it)")
        if per_micro * (accum or 1) != resume_tokens_per_step:
            tokens, accum = resume_tokens_per_step, None
    if tokens is None:
        return accum or 1, per_micro * (accum or 1)
    if tokens % per_micro:
        raise ConfigError(f"invalid config: tokens_per_step={tokens} is not divisible by micro_batch_size x "
                          f"block_size x processes = {cfg.micro_batch_size} x {cfg.model.block_size} x {world_size} "
                          f"= {per_micro}")
    derived = tokens // per_micro
    if accum not in (None, derived):
        raise ConfigError(f"invalid config: grad_accum_steps={accum} contradicts tokens_per_step={tokens}, which "
                          f"needs {derived} on {world_size} process(es)")
    if resume_tokens_per_step is not None and accum is None:
        log(f"note: grad_accum_steps={derived} keeps the checkpoint's {resume_tokens_per_step:,} tokens per step "
            f"with {world_size} process(es) of micro_batch_size={cfg.micro_batch_size}")
    return derived, tokens
