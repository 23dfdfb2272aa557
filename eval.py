"""Evaluate a checkpoint: held-out loss on val shards, or zero-shot HellaSwag accuracy.

    python eval.py --checkpoint out/small --task val --data data/shakespeare
    python eval.py --checkpoint out/small --task hellaswag --data data/hellaswag --limit 500
    python eval.py --checkpoint path/to/gpt2 --task hellaswag --data data/hellaswag --out gpt2.json

--checkpoint is a run's out_dir (its newest loadable checkpoint), one checkpoint, or a Hugging
Face GPT-2 directory, as for sample.py. The figures come from evaluation.py, which train.py's
evals use too. A short table goes to stdout; --out writes the figures as JSON (atomically).
A problem with the input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import atomic
import checkpoints
import devices
import evaluation
from errors import DataError, exit_status
from shards import ShardLoader, list_shards
from tokenizer import gpt2_tokenizer

TASKS = ("val", "hellaswag")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a GPT-2 checkpoint: val loss or zero-shot HellaSwag.")
    p.add_argument("--checkpoint", required=True,
                   help="a training out_dir (its newest loadable checkpoint), a checkpoint directory, "
                        "or a Hugging Face GPT-2 directory")
    p.add_argument("--task", required=True, choices=TASKS,
                   help="val: loss over the val shards of --data; hellaswag: zero-shot accuracy on --data")
    p.add_argument("--data", required=True,
                   help="val: a prepare_data.py output directory; hellaswag: hellaswag_val.jsonl or a "
                        "save_to_disk directory (make hellaswag writes data/hellaswag)")
    p.add_argument("--limit", type=int, default=None, help="val: windows; hellaswag: examples (default: all)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--block_size", type=int, default=None,
                   help="val: tokens per window (default: the run's training block_size, else the model's context)")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=devices.DTYPES,
                   help="auto: bf16 where it is clearly faster (CUDA with bf16; on a CPU with AVX512-BF16 or AMX, "
                        "timed against float32 at this model's shapes), float32 elsewhere")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    for name in ("limit", "batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1, got {value}")
    return args


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
    loader = ShardLoader(list_shards(data, "val"), block_size, 1, shuffle=False)
    ids = np.arange(loader.num_windows)[: args.limit]
    batches = (loader.read_windows(ids[i : i + args.batch_size]) for i in range(0, len(ids), args.batch_size))
    bar = tqdm(batches, total=math.ceil(len(ids) / args.batch_size), desc="val", unit="batch",
               disable=len(ids) < 50 * args.batch_size, file=sys.stderr)
    total, tokens = evaluation.window_losses(model, bar, device, devices.autocast(device, dtype))
    loss = total / tokens
    figures = {"task": "val", "loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "bits_per_byte": None}
    meta = data / "meta.json"
    if meta.is_file():
        val = json.loads(meta.read_text()).get("val", {})
        if val.get("bytes"):
            figures["bits_per_byte"] = evaluation.bits_per_byte(loss, val["tokens"], val["bytes"])
    return figures


def evaluate_hellaswag(model, args, device, dtype) -> dict:
    examples = evaluation.load_hellaswag(args.data, gpt2_tokenizer(), args.limit)
    sequences = sum(len(e.choices) for e in examples)
    with tqdm(total=sequences, desc="hellaswag", unit="seq", disable=sequences < 400, file=sys.stderr) as bar:
        scores = evaluation.score_choices(model, examples, args.batch_size, device, devices.autocast(device, dtype),
                                          progress=bar.update)
    n, correct, correct_norm = evaluation.hellaswag_counts(scores, examples)
    return {"task": "hellaswag", "examples": n, "acc": correct / n, "acc_norm": correct_norm / n}


def run(args: argparse.Namespace) -> dict:
    device = devices.resolve_device(args.device)
    directory, _, model = checkpoints.load_latest(
        args.checkpoint, checkpoints.load_model, need_state=False, warn=lambda msg: print(msg, file=sys.stderr))
    model = model.to(device).eval()
    # scoring runs whole sequences through the model: batched matmuls, as in training
    dtype = devices.resolve_dtype(args.dtype, device, devices.Workload.of("batched", model.config),
                                  log=lambda message: print(message, file=sys.stderr))
    print(f"loaded {directory}: {model.num_params() / 1e6:.2f}M parameters; {device}, "
          f"{str(dtype).removeprefix('torch.')}", file=sys.stderr)
    if args.task == "val":
        figures = evaluate_val(model, directory, args, device, dtype)
    else:
        figures = evaluate_hellaswag(model, args, device, dtype)
    figures["checkpoint"] = str(directory)
    for key, value in figures.items():
        if key not in ("task", "checkpoint"):
            print(f"{key:>14}  {value if value is None or isinstance(value, int) else f'{value:.4f}'}")
    if args.out:
        atomic.write_json(Path(args.out), figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 for a problem with the input)."""
    args = parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
