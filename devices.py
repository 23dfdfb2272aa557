"""Device choice, one rule for every command: which device "auto" means, and the autocast context
a dtype asks for. train.py, sample.py, eval.py, serve.py and bench.py all ask here, so "auto"
means the same thing everywhere (whether bf16 is worth using there is precision.py's question).

Every question asked of CUDA is asked here too (the rest of the code never touches torch.cuda):
whether it is there, bf16 support, TF32, pinned batches, the CPU-only decoding shortcuts,
synchronising before a clock is read, and peak memory.
"""

from __future__ import annotations

import contextlib

import torch

from errors import OptionError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda if available, else mps, else cpu. An explicit device must exist here.
    Raises OptionError naming the device otherwise."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise OptionError(f"--device {name!r} is not a device name ({err})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"--device {name}: choose auto, cpu, cuda, cuda:N or mps")
    return device


def autocast(device: torch.device, dtype: torch.dtype):
    """The context to run a model in `dtype` on `device`: autocast for bf16/fp16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- CUDA, asked here only


def cuda_available() -> bool:
    """Whether this machine has a usable CUDA device (the one place the code asks torch.cuda)."""
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    """How many CUDA devices this process can see (0 without CUDA): multi-GPU tests ask it."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_bf16() -> bool:
    """Whether this machine's CUDA device runs bf16 natively (precision.py's question for CUDA)."""
    return torch.cuda.is_bf16_supported()


def allow_tf32(device: torch.device) -> str | None:
    """On CUDA, let fp32 matmuls and convolutions run on TF32 tensor cores (10-bit mantissa
    products, fp32 accumulation; several times full fp32's rate on A100/H100): fp32 training's
    unautocast parts, evaluation and fp32 serving. Returns the phrase for a start line, "TF32
    matmuls on", or None on other devices, where nothing is changed (the CPU's own fp32 precision
    setting is left alone)."""
    if device.type != "cuda":
        return None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "TF32 matmuls on"


@contextlib.contextmanager
def exact_fp32():
    """Within: CUDA's fp32 matmuls in full fp32 (TF32 off), as before on exit. For comparisons
    against an fp32 reference; a no-op on a machine without CUDA."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def chunked_argmax(device: torch.device) -> bool:
    """Whether decoding takes the greedy token with sampling.argmax_rows' chunked search instead of
    torch's argmax: on the CPU only, where torch's argmax does not vectorise. A GPU's argmax is
    one parallel reduction already, and the chunked search would add kernels to every step."""
    return device.type == "cpu"


def fp32_kv_cache(device: torch.device) -> bool:
    """Whether the decoding engine keeps its KV cache (and so attention) in fp32 whatever the
    weights' dtype: on the CPU, where torch's bf16 attention made bf16 weights decode no faster
    than fp32 (docs/internals.md, "Decoding weights"); elsewhere the cache takes the weights' dtype."""
    return device.type == "cpu"


def pin_batches(device: torch.device) -> bool:
    """Whether batches bound for `device` are built in pinned (page-locked) host memory: on CUDA,
    so their copy to the GPU can run asynchronously (`non_blocking`); pinning needs CUDA."""
    return device.type == "cuda"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs asynchronously); call before reading a
    clock. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring `peak_memory_bytes` afresh (CUDA; nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The most memory tensors held on `device` since `reset_peak_memory` (CUDA's allocator
    statistics: allocated, not the larger reserved pool), or None where it is not tracked."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def release_cached_memory(device: torch.device) -> None:
    """Hand the CUDA allocator's unused cached blocks back to the driver (between measurements)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_version() -> str | None:
    """The CUDA version torch was built with, e.g. "12.8"; None for a CPU-only build."""
    return torch.version.cuda


def device_name(device: torch.device) -> str:
    """The accelerator's name, e.g. "NVIDIA H100 80GB HBM3", or the device type elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
