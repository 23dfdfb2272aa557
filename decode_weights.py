"""Weights laid out for decoding: a copy of a GPT whose Linear layers run the fastest kernel
measured here, for the engine (engine.py) to decode with. The model itself is never changed.

Decoding reads every weight once per step for a handful of rows, so its speed is the speed of
matrix-vector products, and torch's default CPU path is not always the fast one: depending on the
shape, the CPU and the batch, torch's F.linear, oneDNN's linear on weights reordered once, or
"split" (SplitLinear: one bmm over column blocks of the weight, a block per thread) is fastest,
so each shape is timed here and the fastest kept. What each measured on which CPU:
docs/benchmarks.md ("Decoding and serving") and docs/internals.md ("Decoding weights"). int8
weight-only matmuls read a quarter of fp32's bytes.

    weights    Linear layers                                     activations   output
    float32    torch's F.linear, oneDNN's or split, whichever    float32       the same math:
               times fastest at each shape for one row and                     summation order only
               for the engine's batch (CPU only)
    bfloat16   the same choice, on bf16 weights                  bfloat16      rounded
    int8       int8 weights with one fp scale per output row     bfloat16      rounded + quantised
               (symmetric, max |w| / 127), torch's int8
               weight-only kernel (CPU)

Each shape is timed with as many bytes of weights as the whole model streams per step (up to
64 MB): a small model's weights stay in the CPU's cache between steps, a large one's come from
memory, and the faster kernel differs between the two.

Embeddings and LayerNorms keep their weights (converted to the activation dtype). The output
head, tied to the token embedding in GPT-2, gets its own copy in the head's layout; the
embedding keeps the plain one for its lookups. The copy is for decoding (hidden_states, lm_head,
forward without targets); its Linears have no plain `.weight` for the training loss head.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn

WEIGHTS = ("float32", "bfloat16", "int8")
LINEAR_KERNELS = ("auto", "torch", "onednn", "split")  # prepare's `kernel`
INT8_K_MULTIPLE = 16  # torch's int8 weight-only CPU kernel needs in_features divisible by this
TIMED_BYTES = 1 << 26  # weights timed per round at most (64 MB): past any cache
TIMED_REPS = 5  # timed calls per kernel and shape after one warm-up; the fastest counts

_choice: dict[tuple, str] = {}  # this process's measurements, by (in, out, dtype, copies, batch) as timed


class OneDNNLinear(nn.Module):
    """A Linear through oneDNN's linear, its weight reordered into oneDNN's blocked layout once
    (the op torch.compile's CPU backend uses). x (..., in) -> (..., out), both in `dtype` (float32
    or bfloat16), equal to F.linear in that dtype up to summation order."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class SplitLinear(nn.Module):
    """A Linear as one torch.bmm over `parts` column blocks of its transposed weight, W^T (in, out)
    cut into (parts, in, out / parts): torch runs the batch entries on separate threads, each a
    one-thread product that streams its own block of weights, where torch's F.linear of one row
    runs on one thread. x (..., in) -> (..., out) in `dtype`, equal to F.linear up to summation
    order. out is padded with zero columns to a multiple of parts (the padding is sliced off)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float32, parts: int | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.parts = parts or torch.get_num_threads()
        width = -(-self.out_features // self.parts)  # columns per block
        padded = torch.zeros(self.in_features, width * self.parts, dtype=dtype)
        padded[:, : self.out_features] = linear.weight.detach().t()
        blocks = padded.view(self.in_features, self.parts, width).transpose(0, 1)
        self.weight_blocks = blocks.contiguous()  # (parts, in, width)
        self.bias_blocks = None  # or (parts, 1, width)
        if linear.bias is not None:
            bias = torch.zeros(width * self.parts, dtype=dtype)
            bias[: self.out_features] = linear.bias.detach()
            self.bias_blocks = bias.view(self.parts, 1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(1, -1, self.in_features).expand(self.parts, -1, -1)  # (parts, R, in), no copy
        if self.bias_blocks is None:
            y = torch.bmm(rows, self.weight_blocks)
        else:
            y = torch.baddbmm(self.bias_blocks, rows, self.weight_blocks)  # (parts, R, width)
        y = y.transpose(0, 1).reshape(rows.size(1), -1)[:, : self.out_features]  # (R, out): a view for one row
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """A Linear with int8 weights, one scale per output row (symmetric: the row's largest |w| maps
    to 127), run by torch's int8 weight-only kernel. x (..., in) bf16 -> (..., out) bf16."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if linear.in_features % INT8_K_MULTIPLE:
            raise ValueError(f"int8 weights need every Linear's in_features divisible by {INT8_K_MULTIPLE} "
                             f"(torch's int8 kernel), got {linear.in_features}")
        w = linear.weight.detach().float()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight_int8, self.scale)  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


def laid_out(linear: nn.Linear, kernel: str, dtype: torch.dtype) -> nn.Module:
    """`linear` (weights in dtype) as `kernel` ("torch", "onednn", "split" or "int8") runs it."""
    if kernel == "torch":
        return linear
    return {"onednn": OneDNNLinear, "split": SplitLinear, "int8": Int8Linear}[kernel](linear, dtype)


def _time_fastest(call, reps: int = TIMED_REPS) -> float:
    call()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's linear runs here in dtype (float32, or bfloat16 where oneDNN supports it)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear_kernel(n_in: int, n_out: int, dtype: torch.dtype = torch.float32, streamed_bytes: int = TIMED_BYTES,
                  batch: int = 1) -> str:
    """"torch", "onednn" or "split": which Linear of this shape, weights in dtype, runs one row
    (and, for batch > 1, one row plus `batch` rows, taken together) fastest on this CPU, timed once
    per process and setting (the fastest of a few rounds each). The batch matters: at 16 rows
    "split" took twice oneDNN's time for small.py's head, where it was faster for one row.

    streamed_bytes: the weight bytes a decode step reads in all (the whole model's Linears). A
    round runs copies of the weight that together hold that many bytes, up to 64 MB, so each is
    read from where decoding finds it: the CPU's cache for a model that fits there, memory for a
    larger one; a head over 64 MB is timed at 64 MB. torch's is faster for small matrices in cache
    (less overhead per call), oneDNN's for large ones on the CPUs measured. Constant weights: the
    speed does not depend on the values."""
    itemsize = torch.finfo(dtype).bits // 8
    budget = max(1, min(TIMED_BYTES, streamed_bytes) // itemsize)  # weights per round
    n_out = min(n_out, max(1, budget // n_in))  # the shape timed, and so the key: a head and its slice agree
    key = (n_in, n_out, dtype, budget // (n_in * n_out), batch)
    if key not in _choice:
        with torch.no_grad():
            linears = timing_linears(n_in, n_out, dtype, streamed_bytes)
            kernels = ("torch", "split", "onednn") if onednn_available(dtype) else ("torch", "split")
            candidates = {k: [laid_out(linear, k, dtype) for linear in linears] for k in kernels}
            inputs = [torch.full((rows, n_in), 0.5, dtype=dtype) for rows in sorted({1, batch})]
            seconds = {name: sum(_time_fastest(lambda layers=layers, x=x: [layer(x) for layer in layers])
                                 for x in inputs)  # one row, and the engine's batch
                       for name, layers in candidates.items()}
        _choice[key] = min(seconds, key=seconds.get)
    return _choice[key]


def timing_linears(n_in: int, n_out: int, dtype: torch.dtype, streamed_bytes: int) -> list[nn.Linear]:
    """Copies of an (n_out, n_in) Linear in dtype, constant weights and zero bias, that together
    hold streamed_bytes (up to 64 MB; at least one): timed in turn, each is read from where a
    decode step streaming that many bytes finds it (the CPU's cache or memory)."""
    itemsize = torch.finfo(dtype).bits // 8
    copies = max(1, min(TIMED_BYTES, streamed_bytes) // (n_in * n_out * itemsize))
    linears = [nn.utils.skip_init(nn.Linear, n_in, n_out, dtype=dtype) for _ in range(copies)]  # filled, not drawn
    with torch.no_grad():
        for linear in linears:
            nn.init.constant_(linear.weight, 0.01)
            nn.init.zeros_(linear.bias)
    return linears


def streamed_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """The bytes of Linear weights a decode step of `model` reads, with the weights in dtype."""
    itemsize = torch.finfo(dtype).bits // 8
    return sum(m.weight.numel() * itemsize for m in model.modules() if isinstance(m, nn.Linear))


def check_weights(weights: str, device: torch.device, config=None) -> None:
    """Raise ValueError for a weights kind that is unknown, or does not run on `device` or (given
    a model.GPTConfig) at the model's width."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "int8" and device.type != "cpu":
        raise ValueError(f"int8 weights run on the CPU only (torch's int8 weight-only kernel), not on {device.type}")
    if weights == "int8" and config is not None and config.n_embd % INT8_K_MULTIPLE:
        raise ValueError(f"int8 weights need n_embd divisible by {INT8_K_MULTIPLE} (torch's int8 kernel), "
                         f"got {config.n_embd}; use bfloat16 or float32")


def prepare(model: nn.Module, weights: str, kernel: str = "auto", batch: int = 1) -> tuple[nn.Module, str]:
    """A decoding copy of `model` (a model.GPT) with `weights` (see the module docstring), in eval
    mode, sharing nothing it converts with the original. kernel: for float32 or bfloat16 on a CPU,
    "auto" (each Linear shape through the kernel that timed fastest for one row and for `batch`
    rows, the most the engine decodes together; see linear_kernel), or "torch", "onednn" or
    "split" (every Linear). Returns (the copy, which kernels its Linears use, e.g. "float32 via
    oneDNN (lm_head), torch (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)").
    Raises ValueError for an unknown kind or one the device or shape cannot run."""
    device = next(model.parameters()).device
    check_weights(weights, device, model.config)
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(LINEAR_KERNELS)}, got {kernel!r}")
    dtype = torch.float32 if weights == "float32" else torch.bfloat16
    streamed = streamed_bytes(model, dtype)
    # Every parameter converted once (tied ones stay one tensor), everything else deep-copied.
    memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    decoding = copy.deepcopy(model, memo).eval()
    used: dict[str, set[str]] = {}  # kernel -> the Linears (attn.c_attn, lm_head, ...) that use it
    for path, module in list(decoding.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                chosen = _kernel(weights, device, kernel, child, streamed, batch)
                used.setdefault(chosen, set()).add(f"{path.rpartition('.')[2]}.{name}".lstrip("."))
                setattr(module, name, laid_out(child, chosen, dtype))
    names = {"torch": "torch", "onednn": "oneDNN", "split": "split bmm", "int8": "torch's int8 weight-only kernel"}
    if len(used) == 1:
        return decoding, f"{weights} via {names[next(iter(used))]}"
    return decoding, f"{weights} via " + ", ".join(f"{names[k]} ({', '.join(sorted(v))})" for k, v in sorted(used.items()))


def _kernel(weights: str, device: torch.device, kernel: str, linear: nn.Linear, streamed: int, batch: int) -> str:
    """"torch", "onednn", "split" or "int8": the kernel `linear` runs with (see prepare)."""
    if weights == "int8":
        return "int8"
    dtype = linear.weight.dtype
    if device.type != "cpu":
        return "torch"
    if kernel == "onednn" and not onednn_available(dtype):
        raise ValueError(f"oneDNN's linear does not run in {dtype} here; use kernel='auto', 'torch' or 'split'")
    if kernel != "auto":
        return kernel
    return linear_kernel(linear.in_features, linear.out_features, dtype, streamed, batch)
