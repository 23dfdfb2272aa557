"""The loss head: cross-entropy of the logits h @ weight.T (the tied lm_head) without ever holding
the (N, vocab) logits. It owns the chunked op, its per-thread CPU buffer and its chunk sizes, and
knows nothing of training or configs: `linear_cross_entropy` is the one entry point `GPT.forward`
calls.

PyTorch >= 2.13 ships `torch.nn.functional.linear_cross_entropy`; `ChunkedLinearCrossEntropy` is
our own counterpart, used where that op is missing and where ours measured faster
(docs/benchmarks.md, `python bench.py head`).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target that is not scored (F.cross_entropy's default)
# Matmuls of bf16/fp16 operands that write fp32 results (torch.mm / addmm's out_dtype, torch >= 2.8,
# CUDA kernels only): torch versions without them widen the rounded product instead.
FP32_OUT_MATMULS = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(h @ weight.T, targets), computed `chunk_size` rows at a time, so only a
    (chunk_size, V) slice of the logits exists at once instead of (N, V): for GPT-2 124M and a
    micro-batch of 32 x 1,024 tokens, 0.2 GB per 1,024-row chunk instead of 6.6 GB in fp32.

    Each chunk: logits = h_c @ weight.T in the compute dtype (bf16 matmuls stay bf16), then
    softmax in fp32, in one (chunk_size, V) buffer reused by every chunk. For the "mean" and
    "sum" reductions the upstream gradient is one scalar, so forward also computes the gradients
    while the chunk's logits are at hand, and backward only scales them: three matmuls per chunk
    instead of four. For "none", backward recomputes each chunk's logits.

    The gradients accumulate and are kept in fp32 whatever the compute dtype (on CUDA the bf16
    matmuls write fp32 results directly) and are scaled by the fp32 upstream gradient, then
    returned in h's and weight's own dtypes: h and weight come in uncast (the cast to the compute
    dtype happens inside), so under autocast neither gradient is rounded to bf16 on its way out.
    Rounding the scale to bf16 instead put up to 0.4% (2^-8) between the head's gradient and the
    backbone's.

    A plain-PyTorch counterpart of torch.nn.functional.linear_cross_entropy (torch >= 2.13),
    used where that op is missing and wherever it was measured faster (see linear_cross_entropy).
    Inputs: h (N, C), weight (V, C), targets (N,) int64 with -100 = not scored, dtype: the
    compute dtype of the matmuls (float32, bfloat16 or float16).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, reduction: str, grad_enabled: bool, dtype: torch.dtype):
        # grad_enabled: whether the caller records gradients (forward itself always runs in
        # no_grad mode, and needs_input_grad is set under torch.no_grad() too).
        scored = targets != IGNORE_INDEX  # (N,)
        precompute = grad_enabled and reduction != "none" and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        losses, grad_h, grad_w = _chunked_pass(h.to(dtype), weight.to(dtype), targets, scored, chunk_size,
                                               scored.float() if precompute else None)
        n_scored = scored.sum()
        ctx.reduction, ctx.chunk_size, ctx.dtype = reduction, chunk_size, dtype
        ctx.h_dtype, ctx.weight_dtype = h.dtype, weight.dtype
        if precompute:
            ctx.save_for_backward(grad_h, grad_w, n_scored)
        elif grad_enabled:
            ctx.save_for_backward(h, weight, targets)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / n_scored.clamp(min=1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":  # the gradients were computed in forward, per unit of loss
            if getattr(ctx, "done", False):
                raise RuntimeError("the chunked loss head scales its gradients in place, so it can be backpropagated "
                                   "through only once (retain_graph=True is not supported): use loss_impl='full'")
            ctx.done = True
            grad_h, grad_w, n_scored = ctx.saved_tensors  # fp32 (N, C), fp32 (V, C)
            scale = grad_out.float() / n_scored.clamp(min=1) if ctx.reduction == "mean" else grad_out.float()
            # In place and in fp32: no second (V, C) tensor per step, one rounding at most (to the input's dtype).
            return (grad_h.mul_(scale).to(ctx.h_dtype), grad_w.mul_(scale).to(ctx.weight_dtype),
                    None, None, None, None, None)
        h, weight, targets = ctx.saved_tensors
        scored = targets != IGNORE_INDEX
        _, grad_h, grad_w = _chunked_pass(h.to(ctx.dtype), weight.to(ctx.dtype), targets, scored, ctx.chunk_size,
                                          scored * grad_out.float())
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None, None, None, None


_cpu_workspace = threading.local()


def _chunk_buffer(rows: int, V: int, device: torch.device) -> torch.Tensor:
    """A (rows, V) fp32 buffer for one chunk's logits. On the CPU one buffer per thread is kept
    between calls and grown as needed (512 rows of GPT-2's vocabulary in fp32 are 103 MB): a
    fresh buffer that large comes from mmap, and page-faulting it in again on every call was a
    measurable part of a small training step (docs/benchmarks.md). Elsewhere (and while
    compiling) the allocator already reuses memory, so a fresh tensor is taken."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(rows, V, dtype=torch.float32, device=device)
    kept = getattr(_cpu_workspace, "buffer", None)
    if kept is None or kept.numel() < rows * V:
        kept = _cpu_workspace.buffer = torch.empty(rows * V, dtype=torch.float32)
    return kept[: rows * V].view(rows, V)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32. bf16/fp16 operands on CUDA: written as fp32 by the matmul itself (its
    accumulator, never rounded to bf16; torch.mm's out_dtype). On the CPU, whose torch has no such
    kernel (nor torch < 2.8 anywhere), the product in the operands' dtype, then widened."""
    if a.dtype == torch.float32:
        return a @ b
    if a.device.type == "cuda" and FP32_OUT_MATMULS:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) + a @ b, as _mm_fp32 computes the product; in place where it can be, so use the
    result."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.device.type == "cuda" and FP32_OUT_MATMULS:
        return torch.addmm(acc, a, b, out_dtype=torch.float32)  # beta=1: one pass over acc, no rounded temporary
    return acc.add_((a @ b).float())


def _chunked_pass(h, weight, targets, scored, chunk_size: int, row_scale: torch.Tensor | None):
    """The work of ChunkedLinearCrossEntropy, chunk by chunk: per-row losses (N,) in fp32 (0 where
    `scored`, targets != -100, is False) and, when row_scale (N,) is given, the gradients of sum(row_scale * loss)
    with respect to h (N, C) and weight (V, C), both fp32; else (losses, None, None). h and weight
    come in the compute dtype.

    Each chunk's logits go into one reused buffer and become the softmax p in place (PyTorch's
    fused kernel, one pass). The loss is -log(p[target]), taken again from the row's logits where
    p[target] underflowed: those rows are noted per chunk and recomputed after the last, so a GPU
    waits on the host once per call (the `any` check), not once per chunk. dloss/dlogits = p -
    onehot(targets) is n writes into the chunk, and the row factors go onto the (n, C) operand and
    result instead of the (n, V) chunk: the passes over the chunk are the softmax and three matmuls.
    """
    N, V = h.shape[0], weight.shape[0]
    safe_targets = targets.clamp(min=0)  # valid indices for gather; unscored rows get row_scale 0
    losses = torch.empty(N, dtype=torch.float32, device=h.device)
    grads = row_scale is not None
    grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if grads else None
    low = h.dtype != torch.float32  # bf16/fp16: matmuls in that dtype, softmax in fp32
    lost = torch.zeros(N, dtype=torch.bool, device=h.device)  # rows whose p[target] underflowed
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    buffer = _chunk_buffer(min(chunk_size, N), V, h.device)  # one for every chunk
    for start in range(0, N, chunk_size):
        rows = slice(start, start + chunk_size)
        h_c, t = h[rows], safe_targets[rows]
        probs = buffer[: h_c.shape[0]]
        if low:
            probs.copy_(h_c @ weight.T)
        else:
            torch.mm(h_c, weight.T, out=probs)
        torch.softmax(probs, dim=-1, out=probs)  # logits -> softmax, in place
        p_target = probs.gather(1, t[:, None]).squeeze(1)  # (n,)
        lost[rows] = scored[rows] & (p_target < torch.finfo(torch.float32).tiny)  # loss > 87: p underflowed
        losses[rows] = torch.where(scored[rows], -p_target.log(), 0.0)
        if not grads:
            continue
        probs[torch.arange(len(t), device=h.device), t] -= 1.0  # dL/dlogits = (p - onehot) * row_scale
        r = row_scale[rows, None]  # (n, 1)
        d = probs.to(h.dtype) if low else probs
        grad_h[rows] = _mm_fp32(d, weight).mul_(r)  # dL/dh = (d * r) @ W
        h_scaled = (h_c.float() * r).to(h.dtype)  # dL/dW = d.T @ (h * r)
        grad_w = _addmm_fp32(grad_w, d.T, h_scaled)
    if lost.any():  # rare (a diverging run): the loss from the rows' logits; the one host sync
        i = lost.nonzero().squeeze(1)
        logits = (h[i] @ weight.T).float()
        losses[i] = torch.logsumexp(logits, dim=-1) - logits.gather(1, safe_targets[i, None]).squeeze(1)
    return losses, grad_h, grad_w


def cpu_chunk_rows(n_embd: int, dtype: torch.dtype) -> int:
    """Rows per chunk on the CPU: 512 in fp32; in bf16/fp16 n_embd rounded up to a power of two,
    within [256, 1024]. Measured with `python bench.py head` at configs/small.py's width (128)
    and GPT-2 124M's (768): wide models in bf16 want long weight-gradient matmuls (their inner
    dimension is the chunk). The timings are in docs/benchmarks.md."""
    if dtype == torch.float32:
        return 512
    return min(max(1 << max(n_embd - 1, 1).bit_length(), 256), 1024)


@torch.compiler.disable  # eager measured faster than compiled here (`python bench.py train`)
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         impl: str | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits h @ weight.T without materialising them.

    h: (N, C) hidden states; weight: (V, C), the (tied) lm_head weight; targets: (N,) int64,
    -100 = not scored. reduction: "mean" (over scored rows), "sum" or "none" ((N,), 0 where not
    scored). Under autocast the matmuls run in the autocast dtype; the loss is always fp32.
    impl: "torch" (torch.nn.functional.linear_cross_entropy, torch >= 2.13), "own"
    (ChunkedLinearCrossEntropy), or None: our own on the CPU (measured faster than PyTorch's op
    there in fp32 and bf16, `python bench.py head`); elsewhere PyTorch's op for fp32 inputs
    where it is present, our own otherwise. In bf16/fp16 PyTorch's op returns the losses rounded
    to that dtype (and on the CPU upcasts its matmuls to fp32), while ours returns fp32 losses.
    chunk_rows: rows per chunk (default: cpu_chunk_rows on the CPU;
    elsewhere PyTorch's own per-device pick for its op, 1,024 for ours).
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if impl is None:
        torch_op = hasattr(F, "linear_cross_entropy") and dtype == torch.float32 and device != "cpu"
        impl = "torch" if torch_op else "own"
    if chunk_rows is None and device == "cpu":
        chunk_rows = cpu_chunk_rows(h.shape[-1], dtype)
    with torch.autocast(device, enabled=False):
        if impl == "own":  # h and weight uncast: the op casts them, and returns their gradients unrounded
            return ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk_rows or 1024, reduction,
                                                   torch.is_grad_enabled(), dtype)
        h, weight = h.to(dtype), weight.to(dtype)
        if chunk_rows is not None:
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_rows, chunking_method=None)
        else:  # PyTorch's own per-device picks, measured on an A100
            options = torch.nn.LinearCrossEntropyOptions()
        return F.linear_cross_entropy(h, weight, targets, reduction=reduction, ignore_index=IGNORE_INDEX,
                                      options=options).float()
