"""`python bench.py lora`: a full fine-tune against LoRA rank 8, each a real train.py run from the
same random base directory at GPT-2 124M's and gpt2-medium's shapes, on the built-in corpus
(data/shakespeare: `python prepare_data.py --dataset shakespeare --out data/shakespeare`).

Per run: peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the peak RSS of the fresh
process that trains), the median step time, trainable parameters, optimizer-state bytes (the
checkpoint's state/optimizer.bin), the checkpoint's size without state/ (weights or adapter) and
the val loss after the same number of steps. `--quick` runs a tiny shape for a few steps (a smoke
run, under a minute on a CPU); its figures mean nothing.
"""

from __future__ import annotations

import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import devices
from benchmarks.common import GPT2_124M, ROOT, cpu_name

HELP = "full fine-tune vs LoRA rank 8 at 124M and gpt2-medium: peak memory, step time, state and checkpoint sizes"
GPT2_MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
RANK = 8


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run (default: 50)")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="sequences per step (default: 4)")
    parser.add_argument("--block_size", type=int, default=512, help="training window in tokens (default: 512)")
    parser.add_argument("--data_dir", default=str(ROOT / "data" / "shakespeare"), help="the corpus' shards")
    parser.add_argument("--shapes", default="124m,medium", help="which of 124m and medium (default: both)")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 3 steps: a smoke run")


def _train(base: str, out: str, data_dir: str, rank: int, steps: int, batch: int, block: int) -> dict:
    """In a fresh process: train.py from `base` for `steps` steps (LoRA of `rank`, or a full
    fine-tune with 0), then the figures of the run (see the module docstring)."""
    import resource

    from accelerate.utils import load as load_state_file

    import train
    from run_dir import read_log

    device = torch.device("cuda" if devices.cuda_available() else "cpu")
    devices.reset_peak_memory(device)
    train.main([f"--init_from={base}", f"--out_dir={out}", f"--data_dir={data_dir}", f"--lora_rank={rank}",
                f"--max_steps={steps}", f"--warmup_steps={max(steps // 10, 1)}", "--learning_rate=3e-4",
                "--min_lr=3e-5", f"--micro_batch_size={batch}", f"--block_size={block}", "--log_interval=1",
                f"--eval_interval={steps}", f"--ckpt_interval={steps}", "--eval_steps=10", "--keep_last_ckpts=1",
                f"--mixed_precision={'bf16' if device.type == 'cuda' else 'no'}"])
    peak_bytes = devices.peak_memory_bytes(device)  # None on a CPU: the process's peak RSS instead
    peak_mb = peak_bytes / 2**20 if peak_bytes is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    records = read_log(Path(out) / "log.jsonl")
    rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:] or [float("nan")]
    ckpt = sorted((Path(out) / "ckpt").glob("step_*"))[-1]
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    state = ckpt / "state"
    optimizer_bytes = sum(p.stat().st_size for p in state.glob("optimizer*.bin"))
    # Trainable parameters, counted from the optimizer's own state: AdamW keeps one exp_avg per trained weight.
    saved = [load_state_file(path, map_location="cpu") for path in state.glob("optimizer*.bin")]
    trainable = sum(s["exp_avg"].numel() for opt in saved for s in opt["state"].values() if "exp_avg" in s)
    return {"peak_mb": peak_mb, "step_s": batch * block / statistics.median(rates), "trainable": trainable,
            "optimizer_bytes": optimizer_bytes,
            "ckpt_bytes": sum(p.stat().st_size for p in files if state not in p.parents),
            "val_loss": [r["val_loss"] for r in records if "val_loss" in r][-1], "device": device}


def run(steps: int = 50, micro_batch_size: int = 4, block_size: int = 512, data_dir: str = "", quick: bool = False,
        shapes: str = "124m,medium") -> None:
    """Both runs at each shape, each in its own process (a clean peak), printed as a table."""
    import multiprocessing

    from errors import ConfigError
    from model import GPT, GPTConfig

    data_dir = data_dir or str(ROOT / "data" / "shakespeare")
    if not (Path(data_dir) / "meta.json").is_file():
        raise ConfigError(f"{data_dir} holds no prepared corpus: python prepare_data.py --dataset shakespeare "
                          f"--out {data_dir}")
    known = {"124m": ("GPT-2 124M", GPT2_124M), "medium": ("gpt2-medium", GPT2_MEDIUM)}
    if not quick and not set(shapes.split(",")) <= set(known):
        raise ConfigError(f"--shapes={shapes!r}: a comma-separated list of {', '.join(known)}")
    shapes = [("quick", QUICK)] if quick else [known[name] for name in shapes.split(",")]
    steps, block_size = (3, 64) if quick else (steps, block_size)
    print(f"LoRA benchmark: full fine-tune vs LoRA rank {RANK} on c_attn,c_proj,c_fc, {steps} steps of "
          f"{micro_batch_size} x {block_size} tokens from random weights on {data_dir}; "
          f"{'CUDA' if devices.cuda_available() else cpu_name()}, torch {torch.__version__}")
    print("\n| shape | run | peak memory | step | trainable | optimizer state | checkpoint (no state/) | val loss | "
          "memory, optimizer, checkpoint vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape in shapes:
            torch.manual_seed(0)
            base = Path(tmp) / f"base-{label.replace(' ', '_')}"
            GPT(GPTConfig(**shape)).save_pretrained(base)
            figures = {}
            for name, rank in (("full", 0), (f"LoRA r={RANK}", RANK)):
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    figures[name] = pool.submit(_train, str(base), str(Path(tmp) / f"{label}-{rank}"), data_dir, rank,
                                                steps, micro_batch_size, block_size).result()
            full = figures["full"]
            for name, f in figures.items():
                ratio = "-" if name == "full" else (f"{f['peak_mb'] / full['peak_mb']:.0%}, "
                                                    f"{f['optimizer_bytes'] / full['optimizer_bytes']:.2%}, "
                                                    f"{f['ckpt_bytes'] / full['ckpt_bytes']:.2%}")
                print(f"| {label} | {name} | {f['peak_mb']:,.0f} MB | {1e3 * f['step_s']:,.0f} ms | {f['trainable']:,} | "
                      f"{f['optimizer_bytes'] / 2**20:,.1f} MB | {f['ckpt_bytes'] / 2**20:,.1f} MB | "
                      f"{f['val_loss']:.4f} | {ratio} |", flush=True)
    print("\n(CPU peaks are whole-process RSS, CUDA peaks allocated tensor memory; bf16 on CUDA, fp32 on a CPU)")
