"""`python bench.py optimizer`: one optimizer step, AdamW against Muon + AdamW, at configs/small.py's
shape and GPT-2 124M.
Figures: docs/benchmarks.md#optimizer-adamw-against-muon-at-configssmallpys-shape-2026-12-02-zen-4-shared."""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import GPT2_124M, cpu_busy_fraction, cpu_name, small_shape

HELP = "one optimizer step, AdamW vs Muon + AdamW, at small.py's shape and GPT-2 124M"


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--steps", type=int, default=5, help="timed steps per optimizer and shape (default: 5)")


def _newton_schulz_flops(model, steps: int = 5) -> float:
    """FLOPs of torch.optim.Muon's Newton-Schulz iterations over the model's Muon matrices: per step,
    for an m x n matrix (m <= n), X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n)."""
    from train import muon_params

    total = 0.0
    for p in muon_params(model):
        m, n = sorted(p.shape)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


def run(steps: int = 5) -> None:
    """The cost of one optimizer step: AdamW on every parameter (optimizer=adamw) against Muon on
    the blocks' matrices + AdamW on the rest (optimizer=muon), built as train.py builds them, on
    the same random gradients, timed in turn; next to one forward + backward of a micro-batch, for
    scale. At configs/small.py's shape and at GPT-2 124M's."""
    from model import GPT, GPTConfig
    from train import make_optimizers
    from train_config import TrainConfig, with_derived

    print(f"optimizer step: {torch.get_num_threads()} threads on {cpu_name()}, torch {torch.__version__}; "
          f"medians of {steps} steps taken in turn")
    print("\n| shape | AdamW step | Muon + AdamW step | difference | Newton-Schulz FLOPs | forward + backward (tokens) |")
    print("|---|---|---|---|---|---|")
    for label, shape, batch in (("small.py", small_shape(), 8), ("GPT-2 124M", GPT2_124M, 1)):
        torch.manual_seed(0)
        models = {name: GPT(GPTConfig(**shape)) for name in ("adamw", "muon")}
        optimizers = {name: make_optimizers(model, with_derived(TrainConfig.from_flat(optimizer=name), 1),
                                            torch.device("cpu"))
                      for name, model in models.items()}
        for model in models.values():
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
        times = {name: [] for name in models}
        for repeat in range(steps + 1):  # the first step of each (state allocation) is not timed
            for name, opts in optimizers.items():
                start = time.perf_counter()
                for opt in opts:
                    opt.step()
                if repeat:
                    times[name].append(time.perf_counter() - start)
        adamw, muon = (statistics.median(times[k]) for k in ("adamw", "muon"))
        model, T = models["adamw"], shape["block_size"]
        x = torch.randint(0, 50257, (batch, T))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()  # warm-up
        fwd_bwd = []
        for _ in range(2):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            fwd_bwd.append(time.perf_counter() - start)
        print(f"| {label} | {1e3 * adamw:,.0f} ms | {1e3 * muon:,.0f} ms | {1e3 * (muon - adamw):+,.0f} ms "
              f"({muon / adamw:.2f}x) | {_newton_schulz_flops(model) / 1e9:,.1f} GFLOP | "
              f"{1e3 * min(fwd_bwd):,.0f} ms ({batch} x {T}, bf16) |", flush=True)
    busy = cpu_busy_fraction()
    if busy is not None:
        print(f"\n(all CPUs {busy:.0%} busy just after: other work on this machine slows every figure above)")
