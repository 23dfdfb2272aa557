"""LoRA fine-tuning through `peft` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"): wrapping the native GPT, the start line, the adapter checkpoint in PEFT's own layout,
the base model's identity, and loading an adapter back (to train on, or merged to run).

The adapter is peft's LoraConfig / get_peft_model over `model.GPT`; no LoRA layer is written
here. The trainer keeps working on the GPT itself (get_peft_model injects the LoRA layers into it
and freezes the rest), so the loop, DDP and the optimizers see the module they always saw.

    ckpt/step_0000500/               a LoRA run's checkpoint (the rest of the layout: checkpoints.py)
        adapter_config.json          PEFT's: r, lora_alpha, target_modules, fan_in_fan_out=true and
        adapter_model.safetensors    base_model_name_or_path, so PeftModel.from_pretrained loads it
                                     onto transformers' GPT2LMHeadModel as it is
        lora_base.json               the base: its absolute path and the SHA-256 of its weights file
        state/, train_config.json, meta.json   as in every checkpoint

A base with no directory of its own (init_from=scratch: the seeded random model; init_from= a LoRA
checkpoint: its base with the adapter merged) is written once into the run's out_dir when the run
starts writing (RunDir.start, through write_run_base), and the adapter names that directory:

    out_dir/lora_base/               config.json, model.safetensors and the rest of a complete
                                     GPT-2 directory (save_pretrained); one of the run's outputs

Key names: peft names a LoRA weight after the module it adapts, `base_model.model.` +
`transformer.h.N.attn.c_attn` + `.lora_A.weight`; GPT and GPT2LMHeadModel name those modules
alike (STYLE.md, Names). GPT2LMHeadModel's c_attn/c_proj/c_fc are Conv1D (weight stored (in, out)),
GPT's are nn.Linear: the A and B matrices have the same shapes either way, and fan_in_fan_out
tells peft which layout the base weight has when it merges. So the adapter is trained and loaded
here with fan_in_fan_out=false and written with true, the value for transformers' model.

peft is an optional extra (`pip install -e '.[lora]'`); it is imported only when a LoRA is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import atomic
from errors import CheckpointError, ConfigError
from hf_dir import WEIGHT_FILES

if TYPE_CHECKING:
    from model import GPT

ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's names
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
BASE_FILE = "lora_base.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base model's names
ADAPTER_NAME = "default"  # peft's name for a model's only adapter
INSTALL_HINT = "pip install -e '.[lora]'"
RUN_BASE_SUBDIR = "lora_base"  # in out_dir: the base of a run whose base has no directory of its own


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ConfigError(f"LoRA (lora_rank > 0) needs peft, which is not installed ({err}): {INSTALL_HINT}") from None
    return peft


def is_adapter_dir(path: Path) -> bool:
    """A directory holding a PEFT adapter (a LoRA run's checkpoint)."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def run_base_dir(out_dir: Path) -> Path:
    """Where a run in out_dir keeps a base that has no directory of its own (the module docstring)."""
    return Path(out_dir) / RUN_BASE_SUBDIR


def is_run_base(path: Path) -> bool:
    """Whether `path` (run_base_dir, or its temporary) is what write_run_base leaves there: a
    directory of plain files only (under run_base_dir's own name, with a weights file among them)."""
    entries = list(path.iterdir()) if path.is_dir() and not path.is_symlink() else None
    if entries is None or not all(p.is_file() and not p.is_symlink() for p in entries):
        return False
    return path.name != RUN_BASE_SUBDIR or any((path / name).is_file() for name in WEIGHT_FILES)


def is_wrapped(model) -> bool:
    """Whether `model` (a GPT) carries LoRA layers: get_peft_model sets peft_config on it."""
    return hasattr(model, "peft_config")


# ------------------------------------------------------------------ the base model's identity


def base_identity(base_dir: Path) -> dict:
    """{"path": the base directory's absolute path, "weights": its weight file's name, "sha256": that
    file's SHA-256}: what a LoRA checkpoint records so that a base that moved or changed is named."""
    base_dir = Path(base_dir).resolve()
    weights = next((name for name in WEIGHT_FILES if (base_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{base_dir} holds no weights file ({' or '.join(WEIGHT_FILES)})")
    return {"path": str(base_dir), "weights": weights, "sha256": atomic.file_sha256(base_dir / weights)}


def checked_base(adapter_dir: Path) -> dict:
    """adapter_dir's lora_base.json (base_identity's record), after checking that the base it names
    is there and that its weights file has the recorded SHA-256. Raises CheckpointError (one line)
    naming the base when it moved, was removed or changed."""
    record_path = Path(adapter_dir) / BASE_FILE
    try:
        record = json.loads(record_path.read_text())
        base, weights, digest = Path(record["path"]), record["weights"], record["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{record_path} is missing: the LoRA adapter in {adapter_dir} names no base model") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{record_path} is not a base record ({type(err).__name__}: {err})") from None
    if not (base / weights).is_file():
        raise CheckpointError(f"the base model of the LoRA adapter in {adapter_dir} is gone: {base / weights} does "
                              f"not exist (moved or removed?); put it back at {base}")
    if atomic.file_sha256(base / weights) != digest:
        raise CheckpointError(f"the base model of the LoRA adapter in {adapter_dir} changed: {base / weights} no "
                              f"longer has the SHA-256 recorded when the adapter was trained ({digest[:16]}...)")
    return record


# ------------------------------------------------------------------ wrapping


def _wrap(model: "GPT", rank: int, alpha: float, dropout: float, targets: list[str], identity: dict | None):
    """get_peft_model over `model` (the PeftModel); `model` itself now holds the LoRA layers, its
    own weights frozen. Records the base's identity (base_identity's record) on it as lora_base for
    save_adapter, which names the base in adapter_config.json (get_peft_model would replace a name
    given here)."""
    config = _peft().LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                                fan_in_fan_out=False)  # GPT's layers are nn.Linear (see the module docstring)
    peft_model = _peft().get_peft_model(model, config)
    model.lora_base = identity  # None: write_run_base sets it
    return peft_model


def wrap(model: "GPT", rank: int, alpha: float, dropout: float, targets: list[str], base: Path | None) -> "GPT":
    """The GPT `model` with LoRA adapters of `rank` on every module named in `targets` (peft's
    suffix match: "c_proj" is attn.c_proj and mlp.c_proj), scaled by alpha / rank, with `dropout` on
    their input; every other weight frozen. base: the GPT-2 directory the weights came from (its
    identity goes into every checkpoint; None: write_run_base writes the base and sets it). Returns
    the same module, for the trainer to use as before. Raises ConfigError when peft is missing."""
    identity = base_identity(base) if base is not None else None
    return _wrap(model, rank, alpha, dropout, targets, identity).get_base_model()


def describe(model: "GPT") -> str:
    """The start line of a LoRA run: `LoRA rank 8 on c_attn,c_proj,c_fc: 1,179,648 trainable of
    125,619,456 (0.94%)` (parameters, the tied embedding counted once, the adapter included)."""
    config = model.peft_config[ADAPTER_NAME]
    params = {id(p): p for p in model.parameters()}.values()
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    targets = ",".join(_default_order(config.target_modules))
    return f"LoRA rank {config.r} on {targets}: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)"


def _default_order(targets) -> list[str]:
    from train_config import LORA_TARGETS

    return [t for t in LORA_TARGETS if t in targets] + sorted(t for t in targets if t not in LORA_TARGETS)


# ------------------------------------------------------------------ saving


def adapter_config(model: "GPT") -> dict:
    """PEFT's adapter_config.json for `model`'s adapter, as transformers' GPT2LMHeadModel needs it:
    fan_in_fan_out=true (its Conv1D layout), base_model_name_or_path the base's absolute path."""
    config = model.peft_config[ADAPTER_NAME].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config.update(fan_in_fan_out=True, inference_mode=True, auto_mapping=None,
                  target_modules=_default_order(config["target_modules"]),
                  base_model_name_or_path=model.lora_base["path"] if model.lora_base else None)
    return config


def save_adapter(model: "GPT", directory: Path) -> None:
    """Write the adapter of `model` (the unwrapped, uncompiled GPT that `wrap` returned) into
    `directory` in PEFT's layout (adapter_config.json, adapter_model.safetensors) and its base's
    identity (lora_base.json), each published atomically."""
    from safetensors.torch import save_file

    peft = _peft()
    assert model.lora_base is not None, "write_run_base writes the base before the first checkpoint"
    weights = {PEFT_PREFIX + k: v.detach().contiguous().cpu()
               for k, v in peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
    with atomic.atomic_path(Path(directory) / ADAPTER_WEIGHTS_FILE) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic.write_json(Path(directory) / ADAPTER_CONFIG_FILE, adapter_config(model))
    atomic.write_json(Path(directory) / BASE_FILE, model.lora_base)


# ------------------------------------------------------------------ loading


def load(directory: Path, load_base: Callable[[Path], "GPT"], trainable: bool, lora_dropout: float = 0.0) -> "GPT":
    """The model a LoRA checkpoint stands for: its base (checked, see checked_base; built by
    load_base(base directory): checkpoints.load_model with the caller's settings) with the adapter
    loaded. trainable: the wrapped GPT, base frozen, adapter trainable (a resume, with
    lora_dropout); else the adapter merged into the base weights (a plain GPT, for inference). Raises CheckpointError naming what does not load."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    peft = _peft()
    directory = Path(directory)
    record = checked_base(directory)  # hashes the base's weights once
    base = Path(record["path"])
    try:
        saved = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
        rank, alpha, targets = int(saved["r"]), float(saved["lora_alpha"]), list(saved["target_modules"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG_FILE} is not a LoRA adapter config "
                              f"({type(err).__name__}: {err})") from None
    model = load_base(base)
    peft_model = _wrap(model, rank, alpha, lora_dropout, targets, record)
    try:
        weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(directory / ADAPTER_WEIGHTS_FILE).items()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot load {directory / ADAPTER_WEIGHTS_FILE} ({err})") from None
    reference = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)  # names and shapes it needs
    expected = set(reference)
    if set(weights) != expected:
        odd = sorted(set(weights) ^ expected)[:3]
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_FILE} does not match its adapter_config.json over "
                              f"{base} (missing or unexpected: {odd})")
    shapes = {k: v.shape for k, v in reference.items()}
    wrong = [k for k, v in weights.items() if v.shape != shapes[k]]
    if wrong:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_FILE}: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, "
                              f"the adapter over {base} needs {tuple(shapes[wrong[0]])}")
    peft.set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    if trainable:
        return model
    merged = peft_model.merge_and_unload()
    for attribute in ("peft_config", "lora_base"):
        if hasattr(merged, attribute):
            delattr(merged, attribute)
    return merged.requires_grad_(True)  # a plain GPT, as from_pretrained gives (get_peft_model froze the base)



def for_run(model: "GPT", cfg, base: Path | None, log) -> "GPT":
    """The trainer's one hook at model building: `model` wrapped with the adapter cfg asks for
    (lora_rank > 0), or as it is (lora_rank=0, or a resumed LoRA checkpoint, already wrapped);
    the start line goes through log. base: the directory the weights came from (a GPT-2 directory,
    or a LoRA checkpoint whose merged weights `model` holds), None for a new or resumed model. A
    base with no GPT-2 directory of its own (scratch, a LoRA checkpoint) is written to
    run_base_dir(cfg.out_dir) by write_run_base when the run starts writing.
    Raises ConfigError when a resume and cfg disagree about the adapter."""
    if is_wrapped(model):
        rank = model.peft_config[ADAPTER_NAME].r
        if cfg.lora_rank != rank:
            raise ConfigError(f"lora_rank={cfg.lora_rank} but the checkpoint being resumed holds a LoRA adapter of "
                              f"rank {rank}; resume with --lora_rank={rank}")
    elif cfg.lora_rank > 0:
        if cfg.init_from == "resume":
            raise ConfigError(f"lora_rank={cfg.lora_rank} cannot resume a full fine-tune's checkpoint (it holds no "
                              f"adapter); resume with --lora_rank=0, or start a new LoRA run from one of its checkpoints")
        from train_config import lora_targets

        own = base is None or is_adapter_dir(base)  # no GPT-2 directory to name: the run writes one
        targets = lora_targets(cfg)
        model = wrap(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, None if own else base)
        if own:
            model.lora_run_base = run_base_dir(cfg.out_dir)
            what = "the new model's random weights" if base is None else f"{base} (base + adapter, merged)"
            log(f"LoRA base: {what}, frozen, saved to {model.lora_run_base} when the run starts")
    if is_wrapped(model):
        log(describe(model))
    return model


def write_run_base(model: "GPT") -> None:
    """Write the frozen base of `model` (wrapped by for_run over a base with no directory of its own)
    into its run_base_dir as a complete GPT-2 directory (save_pretrained), built under a temporary
    name and renamed into place, and name it as the adapter's base from now on. Does nothing for any
    other model. Main process only; called once the run starts writing (RunDir.start)."""
    final = getattr(model, "lora_run_base", None)
    if final is None:
        return
    # peft moved each adapted layer's own weight to `<module>.base_layer.weight`, beside lora_A/lora_B
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    tmp = atomic.tmp_name(final)
    with atomic.building_dir(final, tmp):
        model.save_pretrained(tmp, state_dict=base)
    atomic.publish_dir(tmp, final)
    model.lora_base = base_identity(final)
    del model.lora_run_base
