"""What several benchmark sections share: the machine's description, a timer, the model shapes
they run at, transformers' twin of one of our models, and the `auto` precision line."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/, serve.py, prepare_data.py


def cpu_name() -> str:
    """The CPU's model name, for the first line of every table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """How busy all CPUs are over `seconds`, from /proc/stat (None where there is no /proc/stat)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def time_of(fn) -> float:
    """Seconds one call of fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)  # configs/small.py's shape (checked below)
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)


def small_shape() -> dict:
    """configs/small.py's model shape, checked against SMALL."""
    from train_config import load_config

    cfg = load_config([str(ROOT / "configs" / "small.py")])
    shape = {k: getattr(cfg.model, k) for k in SMALL}
    assert shape == SMALL, f"configs/small.py changed shape: {shape}"
    return shape


def hf_twin(model):
    """transformers' GPT2LMHeadModel with the same shape and weights as one of ours."""
    import transformers

    import hf_dir

    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_dir.config_to_hf(c)))
    missing, unexpected = hf.load_state_dict(hf_dir.to_hf_state_dict(model.state_dict(), c.tie_embeddings),
                                             strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf


def print_auto_precision(kind: str, shapes: dict[str, dict]) -> None:
    """What `auto` (mixed_precision, --dtype) picks at each shape for `kind` ("batched" or
    "decode") and the two rates it picks by, timed now (precision.measure_bf16, no cache)."""
    from precision import BF16_MIN_SPEEDUP, Workload, measure_bf16, native_bf16

    if not native_bf16(torch.device("cpu")):
        print("auto precision: fp32 (bf16 is emulated on this CPU: no AVX512-BF16 or AMX, nothing timed)")
        return
    for name, shape in shapes.items():
        start = time.perf_counter()
        speed = measure_bf16(Workload(kind, shape["n_embd"], shape["n_layer"], 50257))
        print(f"auto precision at {name} ({kind} matmuls, {torch.get_num_threads()} threads, timed now in {time.perf_counter() - start:.2f} s): "
              f"fp32 {speed.fp32 / 1e9:.1f} GFLOP/s, bf16 {speed.bf16 / 1e9:.1f} GFLOP/s, bf16 {speed.ratio:.2f}x fp32 "
              f"-> {'bf16' if speed.bf16_wins else 'fp32'} (bf16 needs {BF16_MIN_SPEEDUP}x)")


def decode_models(shape: dict):
    """Our GPT with spread-out random weights (confident predictions: greedy has no near-ties) and
    transformers' twin with the same weights."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    ours = GPT(GPTConfig(**shape)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = hf_twin(ours).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf


def timed(runs: dict, reps: int = 3, sync: Callable[[], None] = lambda: None) -> tuple[dict, dict]:
    """Median seconds of each callable (after one warm-up), taken in turn; and each one's last output.
    `sync` is called before each clock read (devices.synchronize on a GPU, whose work is queued)."""
    outputs, times = {}, {k: [] for k in runs}
    for run in runs.values():
        run()
    for _ in range(reps):
        for key, run in runs.items():
            sync()
            start = time.perf_counter()
            outputs[key] = run()
            sync()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, outputs


def named_shapes(names: str) -> list[tuple[str, dict]]:
    """`small`, `124m` or both (comma-separated) as (label, shape)."""
    known = {"small": lambda: ("small.py", small_shape()), "124m": lambda: ("GPT-2 124M", GPT2_124M)}
    return [known[n.strip()]() for n in names.split(",")]
