"""`python bench.py train`: training tokens/s and MFU at configs/small.py's shape, this GPT (chunked
and full loss head) against transformers' GPT2LMHeadModel; peak memory at GPT-2 124M.
Figures: docs/benchmarks.md#training-python-benchpy-train-2026-11-26-zen-5."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from benchmarks.common import GPT2_124M, ROOT, cpu_name, hf_twin, print_auto_precision, small_shape

HELP = "training tokens/s and MFU: our GPT (chunked and full head) vs GPT2LMHeadModel; peak memory at 124M"


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--steps", type=int, default=7, help="timed optimizer steps per model and setting (default: 7)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")


def measure_matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of an n x n matmul in dtype on the CPU (a practical peak for MFU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


class _Trainer:
    """One model's training step (forward + backward + fused AdamW), timed step by step."""

    def __init__(self, model, x, y, precision: str, ours: bool):
        self.model, self.x, self.y, self.ours = model.train(), x, y, ours
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        with self.autocast:
            if self.ours:  # through the model's configured loss head
                _, loss = self.model(self.x, self.y)
            else:  # GPT2LMHeadModel: logits, then the same fp32 cross-entropy as our "full" head
                logits = self.model(self.x).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.y.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _memory_of_one_step(kind: str) -> dict:
    """In a fresh process: peak RSS (MB) of one forward + backward of GPT-2 124M on 4 x 1,024
    tokens, fp32, with our chunked head ("ours") or GPT2LMHeadModel ("hf"); and the RSS before it."""
    import resource

    from model import GPT, GPTConfig

    import transformers

    torch.manual_seed(0)
    if kind == "hf":  # built directly, so that both processes start from the same footing
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = GPT(GPTConfig(**GPT2_124M))
    x, y = torch.randint(0, 50257, (4, 1024)), torch.randint(0, 50257, (4, 1024))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind == "hf":
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    else:
        _, loss = model(x, y)
    loss.backward()
    return {"before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(steps: int = 7, compile: bool = True) -> None:
    """Training tokens/s and MFU at configs/small.py's shape: our GPT with the chunked and the full
    loss head against transformers' GPT2LMHeadModel, eager and compiled, fp32 (and bf16 where the
    CPU runs it natively); then peak memory at GPT-2 124M."""
    import multiprocessing

    from precision import native_bf16
    from model import GPT, GPTConfig
    from train_config import load_config

    shape = small_shape()
    cfg = load_config([str(ROOT / "configs" / "small.py")])
    B, T = cfg.micro_batch_size, cfg.model.block_size
    torch.manual_seed(0)
    x, y = torch.randint(0, 50257, (B, T)), torch.randint(0, 50257, (B, T))
    bf16 = native_bf16(torch.device("cpu"))
    print(f"training benchmark: configs/small.py shape {shape}, micro-batch {B} x {T} tokens, "
          f"{torch.get_num_threads()} threads on {cpu_name()}, torch {torch.__version__}")
    peaks = {"fp32": measure_matmul_peak(torch.float32)}
    peaks["bf16"] = measure_matmul_peak(torch.bfloat16, n=2048 if bf16 else 256, seconds=2.0 if bf16 else 1.0)
    print(f"matmul peak measured now (2048 x 2048): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
          f"{peaks['bf16'] / 1e9:.1f} GFLOP/s ({'native' if bf16 else 'emulated: no AMX / AVX512-BF16 on this CPU'})")
    print_auto_precision("batched", {"configs/small.py": shape})
    flops_per_token = GPT(GPTConfig(**shape)).flops_per_token(T)

    print("\n| setting | ours chunked tok/s (MFU) | ours full tok/s (MFU) | GPT2LMHeadModel tok/s (MFU) | chunked / HF |")
    print("|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        for compiled in (False, True) if compile else (False,):
            label = precision + (" + compile" if compiled else " eager")
            if precision == "bf16" and not bf16:
                print(f"| {label} | skipped: bf16 is emulated here (~{peaks['fp32'] / peaks['bf16']:.0f}x slower matmuls) | | | |")
                continue
            trainers = {}
            for name, impl in (("chunked", "chunked"), ("full", "full"), ("hf", None)):
                torch.manual_seed(0)
                model = GPT(GPTConfig(**shape, loss_impl=impl or "full"))
                if impl is None:
                    model = hf_twin(model)
                if compiled:
                    model.compile()
                trainers[name] = _Trainer(model, x, y, precision, ours=impl is not None)
            for trainer in trainers.values():  # warm-up (and compilation) steps are not timed
                trainer.step(), trainer.step()
            for _ in range(steps):  # in turn, so that all see the same background load
                for trainer in trainers.values():
                    trainer.times.append(trainer.step())
            rate = {k: B * T / statistics.median(t.times) for k, t in trainers.items()}
            cells = [f"{rate[k]:,.0f} ({100 * flops_per_token * rate[k] / peaks[precision]:.0f}%)" for k in trainers]
            print(f"| {label} | {' | '.join(cells)} | {rate['chunked'] / rate['hf']:.2f}x |", flush=True)

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        memory = {kind: pool.submit(_memory_of_one_step, kind).result() for kind in ("ours", "hf")}
    print("\npeak RSS of one forward + backward, GPT-2 124M, fp32, micro-batch 4 x 1,024 (a fresh process each; "
          "model built before):")
    for kind, label in (("ours", "ours, chunked head"), ("hf", "GPT2LMHeadModel + cross_entropy")):
        m = memory[kind]
        print(f"  {label:<32} {m['peak_mb']:7,.0f} MB peak ({m['peak_mb'] - m['before_mb']:6,.0f} MB above the model)")
    print(f"  ours / GPT2LMHeadModel: {memory['ours']['peak_mb'] / memory['hf']['peak_mb']:.0%} of the peak, "
          f"{(memory['ours']['peak_mb'] - memory['ours']['before_mb']) / (memory['hf']['peak_mb'] - memory['hf']['before_mb']):.0%} "
          f"of the growth")
