"""The checkpoint layout, stated once, and everything that finds, checks, publishes and prunes
checkpoints. train.py writes through it; sample.py, eval.py and serve.py read through it, with
their shared --checkpoint/--device/--dtype options (`add_model_args`, `load_for_inference`).

    out_dir/ckpt/step_0000500/
        config.json          \\ a Hugging Face GPT-2 directory: sample.py, init_from and
        model.safetensors    /  transformers load it as it is (weights of the unwrapped model);
                             a LoRA run writes its adapter instead (adapter_config.json,
                             adapter_model.safetensors, lora_base.json: lora.py)
        tokenizer.json, ...  GPT-2's tokenizer, generation_config.json and the model card README.md
                             (hf_dir.py): for other tools; nothing here reads them back
        state/               optimizer, RNG and scaler state, written by Accelerate's save_state
        train_config.json    the effective TrainConfig of the run
        meta.json            written last: the training state (step, tokens seen, loader position,
                             losses, processes), `files` (the size of every other file) and
                             `sha256` (the SHA-256 of every other file)

A checkpoint is built in `ckpt/.tmp_step_0000500/` and renamed into place once every file is
fsynced (atomic.publish_dir), so a directory named `step_*` with a meta.json is complete. A
checkpoint being pruned is renamed to `.deleting_step_*` first. Leftover `.tmp_*` and
`.deleting_*` directories (from a kill) are never read and are removed at the next start.

`verify` checks a checkpoint against its `files` list (a truncated or missing file) and their
`sha256` (any changed byte), and the zip CRCs of the torch.save files in state/ (a corrupt one)
without unpickling anything; `load_latest` walks the checkpoints newest first and falls back past
damaged ones, and past any that its `load` cannot load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

import atomic
import decode_weights
import devices
import precision
from errors import CheckpointError, OptionError
from hf_dir import CONFIG_FILE as HF_CONFIG_FILE
from atomic import file_sha256  # every checkpoint file's hash (in atomic.py so lora.py hashes a base alike)
from hf_dir import WEIGHT_FILES

if TYPE_CHECKING:
    from model import GPT

CKPT_SUBDIR = "ckpt"
STATE_SUBDIR = "state"
META_FILE = "meta.json"
TRAIN_CONFIG_FILE = "train_config.json"
TMP_PREFIX = ".tmp_"
_STEP_DIR = re.compile(r"step_(\d{7})")

T = TypeVar("T")


def ckpt_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CKPT_SUBDIR


def step_dir(out_dir: str | Path, step: int) -> Path:
    return ckpt_root(out_dir) / f"step_{step:07d}"


def tmp_dir(out_dir: str | Path, step: int) -> Path:
    return ckpt_root(out_dir) / f"{TMP_PREFIX}step_{step:07d}"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Published checkpoints in out_dir/ckpt (named step_XXXXXXX, with a meta.json), oldest first."""
    root = ckpt_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=step_of)


def leftovers(out_dir: str | Path) -> list[Path]:
    """Temporary and half-deleted directories of an interrupted save or prune."""
    root = ckpt_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith((TMP_PREFIX, atomic.DELETING_PREFIX)))


def remove_leftovers(out_dir: str | Path) -> list[Path]:
    """Remove what `leftovers` lists; returns it."""
    found = leftovers(out_dir)
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return found


def is_own(ckpt: Path, check_hashes: bool = True) -> bool:
    """Whether `ckpt` is a checkpoint this project wrote, whole: its meta.json records a size and a
    SHA-256 for every file (as `finish` writes it), each file matches (its size, and with
    check_hashes its SHA-256 too), and nothing else is there (no other file, no symlink, no empty
    directory). Only such a directory may be deleted as a run's output."""
    if ckpt.is_symlink() or not ckpt.is_dir():
        return False
    try:
        meta = verify(ckpt, need_state=False, check_hashes=check_hashes)
    except (CheckpointError, OSError):
        return False
    listed = set(meta.get("files", {}))
    if meta.get("sha256") is None or not listed:
        return False
    folders = {str(parent) for name in listed for parent in Path(name).parents if str(parent) != "."}
    needed = {META_FILE} | listed | folders
    for path in ckpt.rglob("*"):
        name = str(path.relative_to(ckpt))
        if path.is_symlink() or name not in needed or (path.is_file() and name != META_FILE and name not in listed):
            return False
    return True


def foreign_entries(out_dir: str | Path) -> list[Path]:
    """What out_dir/ckpt holds besides checkpoints this project wrote (`is_own`) and the leftovers
    of its interrupted saves (`leftovers`): a user's files, which no run may delete or prune."""
    root = ckpt_root(out_dir)
    if not root.is_dir():
        return []
    ours = set(leftovers(out_dir))
    return sorted(p for p in root.iterdir()
                  if p not in ours and not (_STEP_DIR.fullmatch(p.name) and is_own(p)))


def is_weights_dir(path: Path) -> bool:
    """A Hugging Face GPT-2 directory (config.json and a weight file), or a LoRA run's checkpoint
    (a PEFT adapter over a base directory it names, lora.py)."""
    import lora

    return ((path / HF_CONFIG_FILE).is_file() and any((path / name).is_file() for name in WEIGHT_FILES)) \
        or lora.is_adapter_dir(path)


def candidates(path: str | Path) -> list[Path]:
    """Weight directories `path` stands for, the one to try first first.

    A GPT-2 directory or a single checkpoint stands for itself; a run's out_dir for its
    checkpoints, newest first. Raises CheckpointError naming the path when it holds none.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    if path.is_dir() and is_weights_dir(path):
        return [path]
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"{path} holds no checkpoint: expected config.json + model.safetensors, or "
            f"{CKPT_SUBDIR}/step_XXXXXXX/ with a {META_FILE}"
        )
    return found[::-1]


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json. Raises CheckpointError if it is missing, not JSON, or has no step."""
    path = ckpt / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path} has no integer 'step'")
    if _STEP_DIR.fullmatch(ckpt.name) and meta["step"] != step_of(ckpt):
        raise CheckpointError(f"{path} says step {meta['step']} but the directory is {ckpt.name}")
    return meta


def verify(ckpt: Path, need_state: bool, check_hashes: bool = True) -> dict:
    """Check a checkpoint without unpickling anything; returns its meta.json.

    Every file listed in meta.json's `files` must exist with its recorded size, and every
    torch.save file (a zip archive) must pass its CRC check; with check_hashes, its recorded
    SHA-256 must match too (reading every byte). With need_state (a resume) the
    state/ directory must exist. Raises CheckpointError saying what is wrong.
    """
    meta = read_meta(ckpt)
    files, hashes = meta.get("files", {}), meta.get("sha256")
    if not isinstance(files, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in files.values()):
        raise CheckpointError(f"{ckpt / META_FILE}: 'files' is not a mapping of file names to sizes")
    if hashes is not None and (not isinstance(hashes, dict) or set(hashes) != set(files)
                               or not all(isinstance(v, str) for v in hashes.values())):
        raise CheckpointError(f"{ckpt / META_FILE}: 'sha256' does not give a hash for every file in 'files'")
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or changed)")
        if check_hashes and hashes is not None and file_sha256(path) != hashes[name]:
            raise CheckpointError(f"{path} does not match the SHA-256 recorded when it was written (changed or damaged)")
    if need_state:
        state = ckpt / STATE_SUBDIR
        if not state.is_dir():
            raise CheckpointError(f"{state} is missing (optimizer and RNG state)")
        for path in sorted(state.rglob("*")):
            if path.is_file() and zipfile.is_zipfile(path):
                try:
                    with zipfile.ZipFile(path) as archive:
                        bad = archive.testzip()
                except (zipfile.BadZipFile, OSError) as err:
                    raise CheckpointError(f"{path} is corrupt ({err})") from None
                if bad is not None:
                    raise CheckpointError(f"{path} is corrupt (bad CRC in {bad})")
    return meta


def load_latest(path: str | Path, load: Callable[[Path], T], need_state: bool, warn: Callable[[str], None]) -> tuple[Path, dict, T]:
    """Verify and load the newest loadable checkpoint that `path` stands for (see `candidates`).

    load(directory) does the loading and raises CheckpointError for a damaged one (whatever it
    cannot load counts as damage). A damaged checkpoint is reported through warn(message), naming it and what is wrong, and the next
    older one is tried. Returns (directory, meta, what load returned); meta is {} for a GPT-2
    directory without one. Raises CheckpointError listing every failure when none loads.
    """
    failures = []
    for ckpt in candidates(path):
        try:
            meta = verify(ckpt, need_state) if (ckpt / META_FILE).is_file() or need_state else {}
            loaded = load(ckpt)
        except CheckpointError as err:
            failures.append(f"{ckpt.name}: {err}")
            warn(f"warning: skipping damaged checkpoint {ckpt}: {err}")
            continue
        return ckpt, meta, loaded
    raise CheckpointError(f"no loadable checkpoint in {path}: " + "; ".join(failures))


def finish(tmp: Path, final: Path, meta: dict) -> None:
    """Publish a checkpoint built in `tmp`: give every file the usual mode (Accelerate's state files
    are not written through atomic.atomic_path, which sets it), record every file's size and SHA-256
    in meta.json (written last) and rename the directory into place (replacing an older copy of
    the same step)."""
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    mode = atomic.file_mode()
    for path in paths:
        os.chmod(path, mode)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
    hashes = {str(p.relative_to(tmp)): file_sha256(p) for p in paths}
    (tmp / META_FILE).write_text(json.dumps({**meta, "files": files, "sha256": hashes}, indent=2) + "\n")
    atomic.publish_dir(tmp, final)


def prune(out_dir: str | Path, newest: Path, keep: int, warn: Callable[[list[Path]], None] = lambda kept: None
          ) -> list[Path]:
    """Remove checkpoints older than `newest` beyond the newest `keep` (counting `newest`).
    Never touches `newest` or anything newer, nor a directory that is not a checkpoint this project
    wrote (`is_own`: a user's folder with a step_ name and a meta.json): those are passed to
    warn(paths) and left alone. Returns what was removed."""
    older = [p for p in list_checkpoints(out_dir) if step_of(p) < step_of(newest)]
    beyond = older[: max(len(older) - (keep - 1), 0)]
    # The manifest (sizes, nothing else there) tells ours from a user's folder; re-hashing a whole
    # checkpoint at every save only to delete it would read gigabytes for nothing.
    doomed = [p for p in beyond if is_own(p, check_hashes=False)]
    if len(doomed) < len(beyond):
        warn([p for p in beyond if p not in doomed])
    for path in doomed:
        atomic.remove_dir(path)
    return doomed


def load_model(directory: Path, lora_trainable: bool = False, lora_dropout: float = 0.0, **overrides):
    """GPT.from_pretrained(directory), with every problem in the files as a CheckpointError; for a LoRA
    checkpoint, its base with the adapter (lora.load: the base is checked, then built so), merged in,
    or with lora_trainable (a resume) kept apart and trainable, with lora_dropout."""
    import lora
    from model import GPT

    if lora.is_adapter_dir(Path(directory)):
        return lora.load(Path(directory), lambda base: load_model(base, **overrides), trainable=lora_trainable,
                         lora_dropout=lora_dropout)
    check_config(Path(directory))
    try:
        return GPT.from_pretrained(directory, **overrides)
    except KeyError as err:  # a missing or unexpected weight; str(KeyError) would add quotes
        raise CheckpointError(f"cannot load {directory}: {err.args[0]}") from err
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot load {directory}: {err}") from err


_SHAPE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


def check_config(directory: Path) -> None:
    """Check a GPT-2 directory's config.json before a model is built from it: the shape fields are
    positive integers, and (with model.safetensors) they match the stored weights, read from the
    file's header only, so an absurd n_layer or n_embd is refused instead of allocated.
    Raises CheckpointError naming the field."""
    path = directory / HF_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # from_pretrained names what is missing
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    for name in _SHAPE_FIELDS:
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path}: {name}={value!r} must be a positive integer")
    weights = directory / WEIGHT_FILES[0]
    if not weights.is_file():
        return
    try:
        with open(weights, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > 100 << 20:
                raise ValueError(f"header of {header_len} bytes")
            header = json.loads(f.read(header_len))
        shapes = {k.removeprefix("transformer."): v["shape"] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{weights} is not a safetensors file ({err})") from None
    layers = 1 + max((int(k.split(".")[1]) for k in shapes if re.fullmatch(r"h\.\d+\..+", k)), default=-1)
    stored = {"vocab_size": (shapes.get("wte.weight") or [None])[0], "n_embd": (shapes.get("wte.weight") or [None, None])[-1],
              "n_positions": (shapes.get("wpe.weight") or [None])[0], "n_layer": layers}
    for name, value in stored.items():
        if value is not None and config[name] != value:
            raise CheckpointError(f"{path}: {name}={config[name]} does not match the weights in {weights.name} "
                                  f"({name} {value})")


# ------------------------------------------------------------------ loading a model to run it

AUTO_DTYPE_HELP = ("auto: bf16 where it is clearly faster (CUDA with bf16; on a CPU with AVX512-BF16 or AMX, "
                   "timed against float32 at this model's shapes), float32 elsewhere")
INT8 = "int8"  # a --dtype of the decoding commands: int8 weight-only matmuls, bf16 activations (CPU)
INT8_HELP = ("; int8: int8 weights (one scale per output row) with bf16 activations, CPU only: the fastest "
             "batch-1 decoding measured, lossy (docs/benchmarks.md)")


def add_model_args(parser: argparse.ArgumentParser, dtype_default: str = "auto", dtype_help: str = AUTO_DTYPE_HELP,
                   decoding: bool = False) -> None:
    """--checkpoint, --device and --dtype, as every command that runs a model takes them;
    decoding commands (sample, serve) also offer --dtype int8."""
    parser.add_argument("--checkpoint", required=True,
                        help="a training out_dir (its newest loadable checkpoint), a checkpoint directory, "
                             "or a Hugging Face GPT-2 directory (config.json + model.safetensors)")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    choices = precision.DTYPES + ((INT8,) if decoding else ())
    parser.add_argument("--dtype", default=dtype_default, choices=choices, help=dtype_help + (INT8_HELP if decoding else ""))


@dataclass
class LoadedModel:
    model: "GPT"  # in eval mode, on `device`
    directory: Path  # the GPT-2 directory or checkpoint it came from
    device: torch.device
    dtype: torch.dtype  # to compute in (autocast); the weights stay float32
    weights: str  # how a decoding engine lays out the weights: "float32", "bfloat16" or "int8" (decode_weights.py)
    tf32: str | None = None  # devices.allow_tf32's phrase where fp32 matmuls may use TF32 (CUDA)

    def for_decoding(self, max_batch: int) -> tuple["GPT", str]:
        """A copy of the model with its weights laid out for a decoding engine of up to `max_batch`
        rows (decode_weights.prepare with `weights`), and which kernels it uses, for a log line."""
        return decode_weights.prepare(self.model, self.weights, batch=max_batch)

    def describe(self) -> str:
        """One line for stderr: where the model came from, its shape, device and dtype."""
        cfg = self.model.config
        return (f"loaded {self.directory}: {self.model.num_params() / 1e6:.2f}M parameters, n_layer={cfg.n_layer}, "
                f"n_head={cfg.n_head}, n_embd={cfg.n_embd}, block_size={cfg.block_size}, vocab_size={cfg.vocab_size}; "
                f"{self.device}, {self.weights if self.weights == INT8 else str(self.dtype).removeprefix('torch.')}"
                + (f", {self.tf32}" if self.tf32 else ""))


def load_for_inference(args: argparse.Namespace, workload: str) -> LoadedModel:
    """The model args.checkpoint stands for (a damaged newest checkpoint is skipped with a warning on
    stderr, see `load_latest`), in eval mode on args.device, and the dtype to run it in: args.dtype,
    with "auto" decided for `workload` ("batched" or "decode", see precision.Workload) at the model's
    shape. The device is checked before anything is loaded. Raises OptionError for the device or
    dtype, CheckpointError for the checkpoint."""
    def to_stderr(message: str) -> None:
        print(message, file=sys.stderr)

    def check_int8(config=None, directory=None) -> None:  # decode_weights' rule, as an option error
        try:
            decode_weights.check_weights(INT8, device, config)
        except ValueError as err:
            raise OptionError(f"--dtype int8{f' with {directory}' if directory else ''}: {err}") from None

    device = devices.resolve_device(args.device)
    tf32 = devices.allow_tf32(device)
    if args.dtype == INT8:
        check_int8()  # the device, before anything is loaded
    directory, _, model = load_latest(args.checkpoint, load_model, need_state=False, warn=to_stderr)
    model = model.to(device).eval()
    if args.dtype == INT8:
        check_int8(model.config, directory)  # the model's width
        return LoadedModel(model, directory, device, torch.bfloat16, INT8, tf32)
    dtype = precision.resolve_dtype(args.dtype, device, precision.Workload.of(workload, model.config), log=to_stderr)
    return LoadedModel(model, directory, device, dtype, str(dtype).removeprefix("torch."), tf32)
