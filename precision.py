"""Precision choice, one rule for every command: whether bf16 is worth using on a device at a
model's shapes. train.py (mixed_precision), sample.py, eval.py, serve.py (--dtype, through
checkpoints.py) and bench.py all ask here, so "auto" means the same thing everywhere.

On a CPU, bf16 having instructions (AVX512-BF16, AMX) does not make it faster: on some parts
bf16 matmuls run at half fp32's speed, and batch-1 decoding can lose even where training wins.
So "auto" on a CPU measures: once per process, a fraction of a second of fp32 against bf16 at
the matmul shapes that dominate the model's work (`Workload`), and picks bf16 only where it is
clearly faster (BF16_MIN_SPEEDUP); for decoding, both are timed as the engine runs them
(weights laid out by decode_weights.py, read from where a decode step finds them). Where bf16 is
emulated (neither instruction set) nothing is timed: fp32 wins there by far. The rates may be
kept in a small JSON file (`cache_path`) keyed by the CPU, its core count and the torch
version; a cache that cannot be read or written is ignored. On CUDA, bf16 support decides
(asked of devices.py, the one module that asks CUDA anything).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import atomic
import decode_weights
import devices
from errors import OptionError

DTYPES = ("auto", "float32", "bfloat16")
BF16_MIN_SPEEDUP = 1.15  # "clearly faster": a closer call is within what a shared CPU's noise moves
CACHE_DIR_ENV = "GPT2_ACCELERATE_CACHE_DIR"  # where the measured rates are kept; "" keeps none
CACHE_FILE = "precision.json"
MEASURE_VERSION = 3  # part of the cache key: bumped when what is timed changes (3: decode's bf16 as the engine runs it)
TIMED_ROWS = 256  # rows of the timed batched matmuls: a step-sized slice of B*T tokens
TIMED_FLOPS = 1 << 28  # FLOPs of one timed batched matmul at most: a few ms, compute-bound at any width
TIMED_DECODE_WEIGHTS = 1 << 24  # weights of the timed decode head at most (64 MB in fp32): past any cache
TIMED_REPS = 8  # timed calls per matmul and dtype, after one warm-up; the fastest counts
TIMED_BUDGET_S = 0.05  # per matmul shape: fewer calls once the timed ones have taken this long

_measured: dict[str, "Bf16Speed"] = {}  # this process's measurements, by Workload.key()


@dataclass(frozen=True)
class Workload:
    """The matmuls that dominate one kind of work at one model shape.

    kind: "batched" (training, scoring: many tokens per matmul, compute-bound) or "decode"
    (one new token per step: batch-1 matrix-vector products that read every weight once,
    bound by memory bandwidth, where bf16's halved weights can win even where its compute loses).
    """

    kind: str
    n_embd: int
    n_layer: int
    vocab_size: int

    @classmethod
    def of(cls, kind: str, config) -> "Workload":
        """The workload of `kind` for a model config (anything with n_embd, n_layer, vocab_size)."""
        return cls(kind, config.n_embd, config.n_layer, config.vocab_size)

    def key(self) -> str:
        return f"{self.kind} n_embd={self.n_embd} n_layer={self.n_layer} vocab_size={self.vocab_size}"

    def streamed_weights(self) -> int:
        """The Linear weights one decode step reads: the blocks' 12 C^2 per layer and the head."""
        return 12 * self.n_layer * self.n_embd**2 + self.vocab_size * self.n_embd

    def matmuls(self) -> list[tuple[tuple[int, int, int], float]]:
        """The timed F.linear shapes, (rows, in, out), each with the FLOPs per token it stands for:
        the output head (2 C V) and the blocks (24 C^2 per layer: qkv, attention projection and
        the 4x MLP), the block represented by its MLP's first matmul (C -> 4C)."""
        C, V = self.n_embd, self.vocab_size
        head, blocks = 2.0 * C * V, 24.0 * self.n_layer * C * C
        if self.kind == "decode":  # the head as large as the real one up to 64 MB: streamed from memory
            return [((1, C, min(V, TIMED_DECODE_WEIGHTS // C)), head), ((1, C, 4 * C), blocks)]
        # a slice of the head's vocab columns and of the block's rows, wide enough to stay compute-bound
        columns = min(V, max(512, TIMED_FLOPS // (2 * TIMED_ROWS * C) // 256 * 256))
        rows = min(TIMED_ROWS, max(64, TIMED_FLOPS // (2 * C * 4 * C) // 16 * 16))
        return [((TIMED_ROWS, C, columns), head), ((rows, C, 4 * C), blocks)]


@dataclass(frozen=True)
class Bf16Speed:
    """fp32 and bf16 rates of a workload (FLOP/s over its matmul mix) and where they came from."""

    fp32: float
    bf16: float
    source: str = "measured"  # "measured", or the cache file's path

    @property
    def ratio(self) -> float:
        """bf16's speed as a multiple of fp32's (2.0: bf16 takes half the time)."""
        return self.bf16 / self.fp32

    @property
    def bf16_wins(self) -> bool:
        return self.ratio >= BF16_MIN_SPEEDUP

    def describe(self, device: torch.device) -> str:
        """E.g. "bf16 0.70x fp32 on this cpu" (and the cache file when it came from there)."""
        where = "" if self.source == "measured" else f", measured earlier: {self.source}"
        return f"bf16 {self.ratio:.2f}x fp32 on this {device.type}{where}"


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware has bf16 instructions: CUDA with bf16 support, or a CPU with AMX or
    AVX512-BF16. Elsewhere, e.g. an AVX2-only CPU, bf16 is emulated and much slower than fp32.
    Having them does not make bf16 faster on a CPU; `bf16_speed` measures that."""
    if device.type == "cuda":
        return devices.cuda_bf16()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def bf16_works(device: torch.device) -> bool:
    """Whether bf16 runs at all (natively or emulated)."""
    if device.type == "cuda":
        return devices.cuda_bf16()
    if device.type == "mps":
        try:  # bf16 on MPS depends on the macOS version; ask the device itself
            torch.zeros(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False
        return True
    return True  # CPU autocast runs bf16 everywhere (emulated, so slower, without AVX512-BF16/AMX)


# --------------------------------------------------------------------------- measuring bf16 on a CPU


def _linear_call(shape: tuple[int, int, int], dtype: torch.dtype, workload: Workload | None = None) -> Callable[[], object]:
    """One F.linear of (rows, in) by an (out, in) weight in dtype, ready to call, as autocast runs
    it: the fp32 input is cast to bf16 in every call, the weight once beforehand. Constant inputs:
    the speed does not depend on the values, and filling is much cheaper than randn at 124M's head.
    A decode workload's row is run as the decoding engine runs it instead (_decode_call)."""
    rows, n_in, n_out = shape
    if workload is not None and workload.kind == "decode":
        return _decode_call(n_in, n_out, dtype, workload.streamed_weights() * (torch.finfo(dtype).bits // 8))
    x = torch.full((rows, n_in), 0.5)
    linear = torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out, bias=False)  # filled below, not drawn
    with torch.no_grad():
        torch.nn.init.constant_(linear.weight, 0.01)
    weight = linear.weight.detach().to(dtype)
    return lambda: F.linear(x.to(dtype), weight)


def _decode_call(n_in: int, n_out: int, dtype: torch.dtype, streamed_bytes: int) -> Callable[[], object]:
    """One row by an (out, in) weight as the engine decodes it: weights and activations in dtype,
    the kernel decode_weights picks for the shape, and each call the next of enough copies of the
    weight to hold the bytes a decode step streams (up to 64 MB), so it is read from where a
    decode step finds it (cache or memory)."""
    kernel = decode_weights.linear_kernel(n_in, n_out, dtype, streamed_bytes)
    with torch.no_grad():
        layers = [decode_weights.laid_out(linear, kernel, dtype)
                  for linear in decode_weights.timing_linears(n_in, n_out, dtype, streamed_bytes)]
    x = torch.full((1, n_in), 0.5, dtype=dtype)
    turn = itertools.cycle(layers)
    return lambda: next(turn)(x)


def measure_bf16(workload: Workload, make_call: Callable | None = None,
                 timer: Callable[[], float] = time.perf_counter, reps: int = TIMED_REPS,
                 budget_s: float = TIMED_BUDGET_S) -> Bf16Speed:
    """Time fp32 against bf16 at `workload`'s matmuls on the CPU, in a fraction of a second.

    Each shape is called once per dtype to warm up, then up to `reps` times per dtype in turn (so
    both see the same background load; at least 3 times, fewer once a shape has taken budget_s),
    and its fastest call counts: on a shared machine noise only ever adds time. It runs with the
    threads torch uses, as the work will: on a busy machine small bf16 ops can lose more time
    waiting for every thread than they save. The rates are FLOPs per token over the time per
    token that mix of shapes takes.
    make_call(shape, dtype) -> a function running that matmul once (default: _linear_call, for
    this workload); timer() -> seconds.
    """
    make_call = make_call or partial(_linear_call, workload=workload)
    seconds = {torch.float32: 0.0, torch.bfloat16: 0.0}  # per token
    _time_matmuls(workload, make_call, timer, reps, budget_s, seconds)
    flops = sum(flops_per_token for _, flops_per_token in workload.matmuls())
    return Bf16Speed(fp32=flops / seconds[torch.float32], bf16=flops / seconds[torch.bfloat16])


def _time_matmuls(workload: Workload, make_call: Callable, timer: Callable[[], float], reps: int,
                  budget_s: float, seconds: dict) -> None:
    """Add each dtype's seconds per token at `workload` to seconds[dtype] (see measure_bf16)."""
    with torch.no_grad():
        for shape, flops_per_token in workload.matmuls():
            calls = {dtype: make_call(shape, dtype) for dtype in seconds}
            for call in calls.values():
                call()
            best = {dtype: math.inf for dtype in seconds}
            spent = 0.0
            for rep in range(reps):
                if rep >= 3 and spent > budget_s:
                    break
                for dtype, call in calls.items():
                    start = timer()
                    call()
                    took = timer() - start
                    best[dtype], spent = min(best[dtype], took), spent + took
            rows, n_in, n_out = shape
            for dtype in seconds:
                rate = 2.0 * rows * n_in * n_out / max(best[dtype], 1e-9)
                seconds[dtype] += flops_per_token / rate


def cache_path() -> Path | None:
    """Where measured rates are kept: $GPT2_ACCELERATE_CACHE_DIR (empty: nowhere), else
    $XDG_CACHE_HOME/gpt2-accelerate, else ~/.cache/gpt2-accelerate; the file is precision.json."""
    directory = os.environ.get(CACHE_DIR_ENV)
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "gpt2-accelerate")
    return Path(directory) / CACHE_FILE if directory else None


def machine_key() -> dict:
    """What a cached rate holds for: the CPU (its name, family and model), the cores and the
    threads torch uses, and the torch version. Any change measures again."""
    cpu = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "cpu family", "model", "stepping") and name not in cpu:
                cpu[name] = value.strip()
            elif not line.strip() and cpu:
                break  # the first processor's entry is enough
    described = " ".join(f"{k} {v}" for k, v in cpu.items()) or platform.processor() or platform.machine()
    return {"cpu": described, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "measured": MEASURE_VERSION}


def _read_cache(path: Path, key: dict) -> dict:
    """The cached rates by workload key, or {} when the file is missing, unreadable, malformed or
    from another machine or torch (a stale key)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("rates"), dict):
        return {}
    return saved["rates"]


def _write_cache(path: Path, key: dict, rates: dict) -> None:
    """Publish the rates (atomically); a file that cannot be written is left alone, never fatal."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {"key": key, "rates": rates})


def bf16_speed(workload: Workload, device: torch.device, measure: Callable[[Workload], Bf16Speed] = measure_bf16,
               cache: Path | None | str = "default") -> Bf16Speed | None:
    """bf16 against fp32 at `workload` on `device`, measured once per process (and kept in the
    cache file across processes). None where nothing is measured: devices other than the CPU,
    and CPUs without AVX512-BF16 or AMX, where bf16 is emulated and fp32 wins by far.
    cache: the cache file, None for none, "default" for `cache_path()`."""
    if device.type != "cpu" or not native_bf16(device):
        return None
    name = workload.key()
    if name in _measured:
        return _measured[name]
    path = cache_path() if cache == "default" else cache
    key = machine_key()
    rates = _read_cache(path, key) if path else {}
    entry = rates.get(name)
    try:
        speed = Bf16Speed(float(entry["fp32"]), float(entry["bf16"]), source=str(path))
        if not (speed.fp32 > 0 and speed.bf16 > 0 and math.isfinite(speed.ratio)):
            raise ValueError(entry)
    except (TypeError, KeyError, ValueError):  # not cached here, or a damaged entry
        speed = measure(workload)
        if path:
            _write_cache(path, key, {**rates, name: {"fp32": speed.fp32, "bf16": speed.bf16}})
    _measured[name] = speed
    return speed


# --------------------------------------------------------------------------- the choices


def _bf16_choice(device: torch.device, workload: Workload) -> tuple[bool, str]:
    """Whether "auto" picks bf16 on `device` for `workload`, and why, in words."""
    if device.type == "cpu" and not native_bf16(device):
        return False, "bf16 is emulated on this cpu: no AVX512-BF16 or AMX"
    speed = bf16_speed(workload, device)
    if speed is not None:
        return speed.bf16_wins, speed.describe(device)
    if native_bf16(device):
        return True, f"native bf16 on {device.type}"
    return False, f"no native bf16 on {device.type}"


def _slower_warning(setting: str, device: torch.device, workload: Workload) -> str | None:
    """A warning for an explicit bf16 that this device emulates, or that measured slower than fp32."""
    if device.type == "cpu" and not native_bf16(device):
        return f"warning: {setting} on a cpu without native bf16 (no AVX512-BF16 or AMX): expect it to be slower than fp32"
    speed = bf16_speed(workload, device)
    if speed is not None and speed.ratio < 1:
        return (f"warning: {setting} runs at {speed.ratio:.2f}x fp32's speed on this {device.type} at this model's "
                f"shapes (measured); fp32 would be faster")
    return None


def resolve_dtype(name: str, device: torch.device, workload: Workload | None = None,
                  log: Callable[[str], None] | None = None) -> torch.dtype:
    """The dtype to compute in for inference (--dtype). "auto": bf16 where it is clearly faster
    at `workload` (measured on a CPU, see `bf16_speed`; CUDA with bf16 support), else float32.
    workload: the model's (default: decoding at GPT-2 124M's shape). log, when given, receives
    what auto chose and why, or a warning for an explicit bfloat16 that measured slower.
    bf16 where it does not run at all raises OptionError rather than quietly running in float32."""
    if name not in DTYPES:
        raise OptionError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    workload = workload or Workload("decode", 768, 12, 50257)
    log = log or (lambda message: None)
    if name == "auto":
        bf16, why = _bf16_choice(device, workload)
        log(f"--dtype auto -> {'bfloat16' if bf16 else 'float32'} ({why})")
        return torch.bfloat16 if bf16 else torch.float32
    if name == "bfloat16":
        if not bf16_works(device):
            raise OptionError(f"--dtype bfloat16 is not supported on {device}; use --dtype float32")
        warning = _slower_warning("--dtype bfloat16", device, workload)
        if warning:
            log(warning)
        return torch.bfloat16
    return torch.float32


def mixed_precision(requested: str, device: torch.device, workload: Workload) -> tuple[str, str | None]:
    """Training's mixed_precision with "auto" resolved: bf16 where it is clearly faster at
    `workload` (measured on a CPU; CUDA with bf16 support), else "no". Returns (setting, a note
    to print or None): what auto chose and why, e.g. "mixed_precision=auto -> no (bf16 0.70x
    fp32 on this cpu)", or a warning for an explicit bf16 that is emulated or measured slower."""
    if requested == "auto":
        bf16, why = _bf16_choice(device, workload)
        chosen = "bf16" if bf16 else "no"
        return chosen, f"mixed_precision=auto -> {chosen} ({why})"
    if requested == "bf16":
        return requested, _slower_warning("mixed_precision=bf16", device, workload)
    return requested, None
