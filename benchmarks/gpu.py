"""The GPU rows of `make gpu-check` (gpu_check.py runs them after the `cuda` tests), on one CUDA
device: GPT-2 124M training tokens/s and MFU under bf16 autocast, eager and under torch.compile,
with the peak memory of the timed steps; batch-1 and batch-16 greedy decoding tokens/s on
engine.Engine (bf16 weights) against transformers' generate with the same weights on the same card.

Sized for one H100 in about three minutes including compilation: 3 warm-up steps (the first
compiles; never timed) and 10 timed steps of 16 x 1,024 tokens per training row; 128 new tokens
per decode row, one warm-up generation and three timed. Every figure is timed between
`devices.synchronize` calls: CUDA runs asynchronously, so a clock read without one measures the
queueing, not the work.

    python bench.py gpu                # the table alone (gpu_check.py adds the tests and the JSON)
"""

from __future__ import annotations

import time
from typing import Callable

import torch

import devices

# Dense bf16 tensor-core peaks in TFLOP/s, by a part of the name torch.cuda.get_device_name gives
# (upper case). NVIDIA's datasheets quote them "with sparsity" (2:4 structured sparsity doubles
# them); a dense matmul gets half that figure, which is what is listed. More specific names first:
# the first contained in the card's name counts.
PEAK_BF16_TFLOPS = (
    ("H100 PCIE", 756.0),  # H100 datasheet (nvidia.com/en-us/data-center/h100): PCIe 1,513 sparse
    ("H100 NVL", 835.0),  # H100 datasheet: NVL 1,671 sparse
    ("H100", 989.0),  # H100 datasheet: SXM 1,979 sparse ("NVIDIA H100 80GB HBM3" is the SXM part)
    ("H200 NVL", 835.0),  # H200 datasheet (nvidia.com/en-us/data-center/h200): NVL 1,671 sparse
    ("H200", 989.0),  # H200 datasheet: SXM 1,979 sparse; GH200's Hopper GPU is the same part
    ("A100", 312.0),  # A100 datasheet: 312 dense (624 sparse), SXM and PCIe alike
    ("L40S", 362.0),  # L40S datasheet: 362.05 (733 sparse)
    ("L40", 181.0),  # L40 datasheet: 181.05 (362.1 sparse)
    ("L4", 121.0),  # L4 datasheet: 242 sparse
)
COLUMNS = (  # (key in a row, heading)
    ("row", "benchmark"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("peak_memory_gib", "peak memory GiB"),
    ("transformers_tokens_per_s", "transformers tokens/s"),
    ("vs_transformers", "ours / transformers"),
    ("status", "status"),
    ("note", "note"),
)
TRAIN_BATCH, TRAIN_T, TRAIN_WARMUP, TRAIN_STEPS = 16, 1024, 3, 10
DECODE_PROMPT, DECODE_NEW_TOKENS = 16, 128


def peak_bf16_flops(name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s from PEAK_BF16_TFLOPS, or None for a card not listed."""
    upper = name.upper()
    return next((tflops * 1e12 for part, tflops in PEAK_BF16_TFLOPS if part in upper), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model's own math needs at this rate (forward and
    backward, model.GPT.flops_per_token), as a fraction of the card's peak."""
    return tokens_per_s * flops_per_token / peak_flops


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key == "mfu":
        return f"{value:.1%}"
    if key == "vs_transformers":
        return f"{value:.2f}x"
    if key == "peak_memory_gib":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """The rows as one Markdown table with COLUMNS; a key a row lacks is an empty cell."""
    lines = ["| " + " | ".join(heading for _, heading in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _timed_steps(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int):
    """Run `warmup` untimed steps (compilation happens in the first), then `steps` timed ones with
    the peak memory measured over them alone. Returns (seconds timed, seconds of warm-up, peak
    bytes, the last loss)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    devices.synchronize(device)
    warm_s = time.perf_counter() - start
    devices.reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    devices.synchronize(device)
    return time.perf_counter() - start, warm_s, devices.peak_memory_bytes(device), loss


def train_row(device: torch.device, compile: bool, batch: int = TRAIN_BATCH, T: int = TRAIN_T,
              warmup: int = TRAIN_WARMUP, steps: int = TRAIN_STEPS) -> dict:
    """GPT-2 124M training steps (forward, backward, train.py's fused AdamW) under bf16 autocast on
    random tokens, eager or compiled. Raises FloatingPointError for a non-finite loss."""
    import train
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T)).to(device).train()
    (optimizer,) = train.make_optimizers(model, train.with_derived(train.TrainConfig.from_flat(), 1), device)
    forward = torch.compile(model) if compile else model
    tokens = torch.randint(0, model.config.vocab_size, (batch, T + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with devices.autocast(device, torch.bfloat16):
            _, loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    seconds, warm_s, peak, loss = _timed_steps(step, device, warmup, steps)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {loss.item()} after {warmup + steps} steps")
    tokens_per_s = steps * batch * T / seconds
    name = devices.device_name(device)
    peak_flops = peak_bf16_flops(name)
    return {
        "row": f"train 124M bf16 {'compiled' if compile else 'eager'}, {batch}x{T} tokens/step",
        "tokens_per_s": tokens_per_s,
        "mfu": None if peak_flops is None else mfu(tokens_per_s, model.flops_per_token(T), peak_flops),
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "note": f"{steps} steps timed after {warmup} untimed ({warm_s:.0f} s{', compiling' if compile else ''})"
                + ("" if peak_flops else f"; no bf16 peak listed for {name}: MFU left out"),
    }


def decode_row(device: torch.device, batch: int, new_tokens: int = DECODE_NEW_TOKENS, reps: int = 3) -> dict:
    """Greedy decoding of `batch` random 16-token prompts, `new_tokens` each, at GPT-2 124M in bf16:
    engine.Engine (bf16 weights laid out by decode_weights.prepare, as serve.py --dtype bfloat16 does) against
    transformers' generate on its bf16 twin (bench.py's models: spread-out random weights, so
    greedy has few near-ties). Tokens/s counts every sequence's new tokens."""
    import decode_weights
    from benchmarks.common import GPT2_124M, decode_models, timed
    from engine import Engine, SamplingParams

    ours, hf = decode_models(GPT2_124M)
    laid_out, layout = decode_weights.prepare(ours.to(device), "bfloat16", batch=batch)
    engine = Engine(laid_out, max_batch=batch)
    hf = hf.to(device=device, dtype=torch.bfloat16)
    prompts = torch.randint(0, 50257, (batch, DECODE_PROMPT), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    on_device = prompts.to(device)

    def transformers_run() -> list:
        out = hf.generate(on_device, attention_mask=torch.ones_like(on_device), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
        return out[:, DECODE_PROMPT:].tolist()

    seconds, outputs = timed({"ours": lambda: engine.generate(prompts.tolist(), params), "hf": transformers_run},
                             reps, sync=lambda: devices.synchronize(device))  # taken in turn
    (ours_s, hf_s), (ours_out, hf_out) = (seconds["ours"], seconds["hf"]), (outputs["ours"], outputs["hf"])
    rate, hf_rate = batch * new_tokens / ours_s, batch * new_tokens / hf_s
    same = sum(a == b for a, b in zip(ours_out, hf_out))
    return {
        "row": f"decode 124M bf16, batch {batch}, {new_tokens} new tokens",
        "tokens_per_s": rate,
        "transformers_tokens_per_s": hf_rate,
        "vs_transformers": rate / hf_rate,
        "note": f"{same} of {batch} sequences token for token equal to transformers' (bf16 kernels may "
                f"break near-ties differently); median of {reps} after a warm-up; {layout}",
    }


HELP = "GPU only: GPT-2 124M training tokens/s and MFU (eager, compiled), decode tokens/s vs transformers"


def add_arguments(parser) -> None:
    """No options: the rows are sized for `make gpu-check`'s time budget."""


def run() -> None:
    """`bench.py gpu`: the table on the first CUDA device, or one line where there is none."""
    if not devices.cuda_available():
        print("bench.py gpu: no CUDA device on this machine; nothing measured")
        return
    cuda = torch.device("cuda")
    devices.allow_tf32(cuda)
    print(format_table(rows(cuda)))


def rows(device: torch.device, log: Callable[[str], None] = print) -> list[dict]:
    """Every row in turn, each printed through `log` as it finishes. A row that raises is kept as
    status "failed" with the error in its note, and the rest still run."""
    jobs = {"train eager": lambda: train_row(device, compile=False),
            "train compiled": lambda: train_row(device, compile=True),
            "decode batch 1": lambda: decode_row(device, 1), "decode batch 16": lambda: decode_row(device, 16)}
    rows = []
    for name, job in jobs.items():
        try:
            row = {**job(), "status": "ok"}
        except Exception as err:  # recorded as a failed row: gpu_check.py exits non-zero for it
            row = {"row": name, "status": "failed", "note": f"{type(err).__name__}: {err}"}
        rows.append(row)
        log(f"{row['row']}: {row['status']}")
        devices.release_cached_memory(device)
    return rows

