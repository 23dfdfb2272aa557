"""Evaluate a checkpoint: held-out loss on val shards, or zero-shot HellaSwag accuracy.

    python eval.py --checkpoint out/small --task val --data data/shakespeare
    python eval.py --checkpoint out/small --task hellaswag --data data/hellaswag --limit 500
    python eval.py --checkpoint path/to/gpt2 --task hellaswag --data data/hellaswag --out gpt2.json

--checkpoint is a run's out_dir (its newest loadable checkpoint), one checkpoint, or a Hugging
Face GPT-2 directory, as for sample.py. The figures come from scoring.py, which train.py's
evals use too. A short table goes to stdout; --out writes the figures as JSON: atomically to a
file (an existing one, or a symlink even to nothing, is replaced only with --overwrite; through a
symlink, to its target), or straight into a device or pipe such as /dev/stdout.
A problem with the input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import atomic
import checkpoints
import devices
import scoring
import shards
from errors import DataError, exit_status
from shards import ShardLoader, list_shards
from tokenizer import gpt2_tokenizer

TASKS = ("val", "hellaswag")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a GPT-2 checkpoint: val loss or zero-shot HellaSwag.")
    checkpoints.add_model_args(p)
    p.add_argument("--task", required=True, choices=TASKS,
                   help="val: loss over the val shards of --data; hellaswag: zero-shot accuracy on --data")
    p.add_argument("--data", required=True,
                   help="val: a prepare_data.py output directory; hellaswag: hellaswag_val.jsonl or a "
                        "save_to_disk directory (make hellaswag writes data/hellaswag)")
    p.add_argument("--limit", type=int, default=None, help="val: windows; hellaswag: examples (default: all)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--block_size", type=int, default=None,
                   help="val: tokens per window (default: the run's training block_size, else the model's context)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file (or /dev/stdout)")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    args = p.parse_args(argv)
    for name in ("limit", "batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


def is_special(path: Path) -> bool:
    """A device, pipe or socket (or /dev/stdout, /proc/self/fd/N): written to directly, never replaced."""
    if str(path.absolute()).startswith(("/dev/", "/proc/")):
        return True
    try:
        return not stat.S_ISREG(path.stat().st_mode) and not path.is_dir()
    except OSError:
        return False


def check_out(args: argparse.Namespace) -> None:
    """Refuse an --out that cannot be written, before the evaluation runs: a missing directory, a
    directory, or an existing file or any symlink without --overwrite. Raises DataError naming it."""
    if args.out is None:
        return
    out = Path(args.out)
    if is_special(out):
        return
    target = out.resolve()  # a symlink is written through, to its target
    if target.is_dir():
        raise DataError(f"--out {out} is a directory; give a file name")
    if not target.parent.is_dir():
        raise DataError(f"--out {out}: the directory {target.parent} does not exist")
    if (target.exists() or out.is_symlink()) and not args.overwrite:  # a symlink counts, dangling or not
        link = f" (a symlink to {os.readlink(out)})" if out.is_symlink() else ""
        raise DataError(f"--out {out} already exists{link}; pass --overwrite to replace it, or choose another name")


def write_out(out: Path, figures: dict) -> None:
    """The figures as JSON into --out (see check_out)."""
    text = json.dumps(figures, indent=2) + "\n"
    if is_special(out):
        with open(out, "w") as f:
            f.write(text)
    else:
        atomic.write_text(out.resolve(), text)


def training_block_size(directory: Path) -> int | None:
    """The block_size a checkpoint was trained with (its train_config.json), if it says."""
    try:
        return int(json.loads((directory / checkpoints.TRAIN_CONFIG_FILE).read_text())["block_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate_val(model, directory: Path, args, device, dtype) -> dict:
    """Mean loss over every full window of the val shards (or the first --limit), read in file
    order as train.py's eval reads them; perplexity; bits per byte when meta.json has the bytes."""
    data = Path(args.data)
    block_size = args.block_size or training_block_size(directory) or model.config.block_size
    if block_size > model.config.block_size:
        raise DataError(f"--block_size {block_size} exceeds the model's context ({model.config.block_size})")
    paths = list_shards(data, "val")
    read_val_meta(data)  # a malformed meta.json is reported before the evaluation, not after it
    largest = shards.max_token_id(paths)
    if largest >= model.config.vocab_size:
        raise DataError(f"the val shards in {data} hold token id {largest}, but the model's "
                        f"vocab_size={model.config.vocab_size} only covers ids below it")
    loader = ShardLoader(paths, block_size, 1, shuffle=False)
    ids = np.arange(loader.num_windows)[: args.limit]
    batches = (loader.read_windows(ids[i : i + args.batch_size]) for i in range(0, len(ids), args.batch_size))
    bar = tqdm(batches, total=math.ceil(len(ids) / args.batch_size), desc="val", unit="batch",
               disable=True if len(ids) < 50 * args.batch_size else None, file=sys.stderr)  # None: on a terminal only
    total, tokens = scoring.window_losses(model, bar, device, devices.autocast(device, dtype))
    loss = total / tokens
    figures = {"task": "val", "loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "bits_per_byte": None}
    val = read_val_meta(data)
    if val.get("bytes"):
        figures["bits_per_byte"] = scoring.bits_per_byte(loss, val["tokens"], val["bytes"])
    return figures


def read_val_meta(data: Path) -> dict:
    """The "val" entry of a data directory's meta.json ({} without one). Raises DataError for a
    meta.json that is not what prepare_data.py writes."""
    meta = data / "meta.json"
    if not meta.is_file():
        return {}
    try:
        val = json.loads(meta.read_text(encoding="utf-8")).get("val", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise DataError(f"{meta} is not a readable JSON object ({err}); run prepare_data.py again") from None
    ok = isinstance(val, dict) and all(isinstance(val.get(k, 0), int) and not isinstance(val.get(k, 0), bool)
                                       and val.get(k, 0) >= 0 for k in ("tokens", "bytes"))
    if not ok or (val.get("bytes") and not val.get("tokens")):
        raise DataError(f"{meta}: 'val' must hold whole numbers 'tokens' and 'bytes', got {str(val)[:80]}")
    return val


def evaluate_hellaswag(model, args, device, dtype) -> dict:
    examples = scoring.load_hellaswag(args.data, gpt2_tokenizer(), args.limit)
    scoring.check_vocab(examples, model.config.vocab_size, args.data)
    sequences = sum(len(e.choices) for e in examples)
    with tqdm(total=sequences, desc="hellaswag", unit="seq", disable=True if sequences < 400 else None,
              file=sys.stderr) as bar:  # None: on a terminal only
        scores = scoring.score_choices(model, examples, args.batch_size, device, devices.autocast(device, dtype),
                                       progress=bar.update)
    n, correct, correct_norm = scoring.hellaswag_counts(scores, examples)
    return {"task": "hellaswag", "examples": n, "acc": correct / n, "acc_norm": correct_norm / n}


def run(args: argparse.Namespace) -> dict:
    check_out(args)
    # scoring runs whole sequences through the model: batched matmuls, as in training
    loaded = checkpoints.load_for_inference(args, "batched")
    print(loaded.describe(), file=sys.stderr)
    model, directory, device, dtype = loaded.model, loaded.directory, loaded.device, loaded.dtype
    if args.task == "val":
        figures = evaluate_val(model, directory, args, device, dtype)
    else:
        figures = evaluate_hellaswag(model, args, device, dtype)
    figures["checkpoint"] = str(directory)
    for key, value in figures.items():
        if key not in ("task", "checkpoint"):
            print(f"{key:>14}  {value if value is None or isinstance(value, int) else f'{value:.4f}'}")
    if args.out:
        write_out(Path(args.out), figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 for a problem with the input)."""
    args = parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
