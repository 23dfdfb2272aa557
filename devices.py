"""Device and precision choice, one rule for every command: which device "auto" means, whether
bf16 runs natively there, and the autocast context a dtype asks for. train.py, sample.py,
eval.py and bench.py all ask here, so "auto" means the same thing everywhere.
"""

from __future__ import annotations

import contextlib

import torch

from errors import SampleError

DTYPES = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) here: CUDA with bf16 support, or a CPU with AMX or
    AVX512-BF16. Elsewhere, e.g. an AVX2-only CPU, bf16 is emulated and much slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False


def bf16_works(device: torch.device) -> bool:
    """Whether bf16 runs at all (natively or emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        try:  # bf16 on MPS depends on the macOS version; ask the device itself
            torch.zeros(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False
        return True
    return True  # CPU autocast runs bf16 everywhere (emulated, so slower, without AVX512-BF16/AMX)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu. An explicit device must exist here.
    Raises SampleError naming the device otherwise."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SampleError(f"--device {name!r} is not a device name ({err})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SampleError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SampleError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SampleError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SampleError(f"--device {name}: choose auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to compute in for inference (--dtype): "auto" is bf16 where the device runs it
    natively, else float32. bf16 where it does not run at all raises SampleError rather than
    quietly running in float32."""
    if name not in DTYPES:
        raise SampleError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name == "bfloat16":
        if not bf16_works(device):
            raise SampleError(f"--dtype bfloat16 is not supported on {device}; use --dtype float32")
        return torch.bfloat16
    return torch.float32


def mixed_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """Training's mixed_precision with "auto" resolved: bf16 where the device runs it natively,
    else "no". Returns (setting, a note to print or None); the note also warns about an explicit
    bf16 that this device only emulates."""
    if requested == "auto":
        chosen = "bf16" if native_bf16(device) else "no"
        return chosen, (f"mixed_precision=auto -> {chosen} on {device.type}"
                        + ("" if chosen == "bf16" else " (no native bf16 on this device)"))
    if requested == "bf16" and not native_bf16(device):
        return requested, (f"warning: mixed_precision=bf16 on a {device.type} without native bf16: "
                           f"expect it to be slower than fp32")
    return requested, None


def autocast(device: torch.device, dtype: torch.dtype):
    """The context to run a model in `dtype` on `device`: autocast for bf16/fp16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
