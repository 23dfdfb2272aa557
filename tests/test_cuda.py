"""The paths a GPU takes, written once and run on every device at hand: each test takes a `device`,
"cpu" always (so the logic runs here on every `make test`) and "cuda" where there is one (marked
`cuda`, which `make gpu-check` selects with `pytest -m cuda`; skipped elsewhere with a reason
naming CUDA). Precision, the chunked loss head, the optimizer steps, gradient checkpointing, the
batch loader's copy, and, on CUDA only, the memory of a GPT-2 124M step.

Tolerances are stated at each test, relative to an fp32 reference computed on the same device
with TF32 off (`devices.exact_fp32`, for the whole module): the measured CPU error with a margin
of about 3x, which also covers a GPU's different summation orders (SDPA's memory-efficient
backward on CUDA sums in a nondeterministic order)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import devices
import loss_head
import train
from model import GPT, GPTConfig
from shards import ShardLoader, list_shards

NO_CUDA = "needs CUDA: torch.cuda.is_available() is False on this machine"
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not devices.cuda_available(), reason=NO_CUDA)]
SHAPE = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=512)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def exact_fp32():
    with devices.exact_fp32():
        yield


def tiny(device: torch.device, **overrides) -> GPT:
    """SHAPE with its parameters moved off their init (LayerNorms away from 1, biases from 0)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(device).train()


def batch(device: torch.device, B: int = 4, T: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, SHAPE["vocab_size"], (B, T), generator=g)
    targets = torch.randint(0, SHAPE["vocab_size"], (B, T), generator=g)
    targets.view(-1)[::5] = -100
    return idx.to(device), targets.to(device)


def loss_and_grads(model: GPT, idx, targets, dtype: torch.dtype | None = None):
    """(loss, {name: grad}) in fp32 on the CPU, from one forward/backward under `dtype`'s autocast.
    fp16 scales the loss by 2^10 for backward, as GradScaler would, so small gradients stay
    normal fp16 numbers."""
    device = idx.device
    model.zero_grad(set_to_none=True)
    scale = 2.0**10 if dtype == torch.float16 else 1.0
    with devices.autocast(device, dtype or torch.float32):
        _, loss = model(idx, targets)
    (loss * scale).backward()
    return loss.detach().float().cpu(), {n: p.grad.float().cpu() / scale for n, p in model.named_parameters()}


def relative_error(got: dict, want: dict) -> float:
    """|got - want| / |want| over every tensor at once (the norm of all gradients together)."""
    diff = sum(((got[k] - want[k]) ** 2).sum() for k in want)
    return float((diff / sum((want[k] ** 2).sum() for k in want)).sqrt())


# --------------------------------------------------------------------------- precision


# The loss's relative error, and the gradients': measured on the CPU bf16 2.5e-5 / 5.6e-3, fp16
# 5e-7 / 7e-4 (8 and 11 mantissa bits). The gradients' bounds are ~3x that; the loss's are wider,
# since a GPU's fused attention kernels round in other places than the CPU's.
TOLERANCE = {"bf16": (1e-3, 2e-2), "fp16": (3e-4, 3e-3)}


def test_forward_backward_in_fp32_on_the_device_equals_the_cpu(device):
    """fp32 on the device against fp32 on the CPU: the same math in other summation orders, so
    within 1e-5 (loss) and 1e-4 (gradients)."""
    idx, targets = batch(device)
    loss, grads = loss_and_grads(tiny(device), idx, targets)
    ref_loss, ref_grads = loss_and_grads(tiny(torch.device("cpu")), idx.cpu(), targets.cpu())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert relative_error(grads, ref_grads) < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_forward_backward_follows_fp32(device, precision):
    idx, targets = batch(device)
    model = tiny(device)
    ref_loss, ref_grads = loss_and_grads(model, idx, targets)
    loss, grads = loss_and_grads(model, idx, targets, PRECISIONS[precision])
    loss_tol, grad_tol = TOLERANCE[precision]
    assert loss.dtype == torch.float32 and abs(loss - ref_loss) / ref_loss < loss_tol
    error = relative_error(grads, ref_grads)
    assert error < grad_tol, f"{precision} gradients {error:.2e} from fp32's"


# --------------------------------------------------------------------------- the loss head


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["own", None], ids=["own", "default"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_head_equals_the_full_head(device, precision, impl, reduction):
    """Values and both gradients against cross_entropy(h @ weight.T) in fp32, over three chunks
    and a ragged one. fp32: 1e-5. bf16 (the matmuls in bf16, everything summed in fp32): losses
    3e-3 (each row's carries its logits' bf16 rounding: measured 9e-4 relative at most), gradients
    5e-3 relative (measured 2.4e-3 to 2.9e-3)."""
    torch.manual_seed(0)
    h = torch.randn(100, 64).to(device)
    weight = (torch.randn(1000, 64) * 0.1).to(device)
    targets = torch.randint(0, 1000, (100,))
    targets[::7] = -100
    targets = targets.to(device)
    upstream = torch.rand(100, device=device) if reduction == "none" else torch.tensor(3.0, device=device)

    def run(chunked: bool, dtype):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        with devices.autocast(device, dtype or torch.float32):
            if chunked:
                loss = loss_head.linear_cross_entropy(hh, ww, targets, reduction, impl=impl, chunk_rows=32)
            else:
                loss = torch.nn.functional.cross_entropy((hh @ ww.T).float(), targets, reduction=reduction)
        (loss * upstream).sum().backward()
        return loss.detach().float(), hh.grad, ww.grad

    loss, grad_h, grad_w = run(True, PRECISIONS[precision])
    ref_loss, ref_h, ref_w = run(False, None)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.float32
    tol = 1e-5 if precision == "fp32" else 3e-3
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    for got, want in ((grad_h, ref_h), (grad_w, ref_w)):
        if precision == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert (got - want).norm() / want.norm() < 5e-3


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_steps_match_a_plain_reference(device, optimizer):
    """train.make_optimizers' optimizers (fused AdamW; Muon for the blocks' matrices) for two steps
    on fixed gradients, against the same optimizers on a CPU copy with AdamW's single-tensor
    loop (fused and foreach off). The parameters' change within 1e-5 of the reference's for AdamW;
    Muon's Newton-Schulz iterations run in bf16 (on CUDA in other kernels, whose roundings five
    iterations compound), so 5e-2 there."""
    model = tiny(device)
    reference = copy.deepcopy(model).cpu()
    cfg = train.with_derived(train.TrainConfig.from_flat(optimizer=optimizer, learning_rate=1e-2, muon_lr=2e-2), 1)
    optimizers = train.make_optimizers(model, cfg, device)
    ref_optimizers = train.make_optimizers(reference, cfg, torch.device("cpu"))
    for opt in ref_optimizers:
        for group in opt.param_groups:
            if "fused" in group:
                group.update(fused=False, foreach=False)
    assert optimizers[0].param_groups[0]["fused"] is True
    start = {n: p.detach().cpu().clone() for n, p in reference.named_parameters()}
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            q.grad = torch.randn(q.shape, generator=g) * 0.01
            p.grad = q.grad.to(device)
        for opt in optimizers + ref_optimizers:
            opt.step()
    moved = {n: p.detach().cpu() - start[n] for n, p in model.named_parameters()}
    ref_moved = {n: p.detach() - start[n] for n, p in reference.named_parameters()}
    muon = {n for n, p in reference.named_parameters() if any(p is m for m in train.muon_params(reference))}
    adamw = [n for n in ref_moved if n not in muon]
    assert relative_error({n: moved[n] for n in adamw}, {n: ref_moved[n] for n in adamw}) < 1e-5
    if muon:
        assert relative_error({n: moved[n] for n in muon}, {n: ref_moved[n] for n in muon}) < 5e-2


# --------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_equals_plain_blocks(device):
    """Recomputing each block in backward changes no number: fp32, 1e-6 (loss) and 1e-5 (gradients)."""
    idx, targets = batch(device)
    loss, grads = loss_and_grads(tiny(device, gradient_checkpointing=True), idx, targets)
    ref_loss, ref_grads = loss_and_grads(tiny(device), idx, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert relative_error(grads, ref_grads) < 1e-5


# --------------------------------------------------------------------------- the batch loader


def test_loader_batches_reach_the_device_as_views_of_one_copy(device, data_dir):
    """ShardLoader pins its batches where devices.pin_batches says so (CUDA); next_batch(device)
    gives the windows a plain np.stack of the shards holds, x and y views of one tensor there."""
    paths = list_shards(data_dir, "train")
    loader = ShardLoader(paths, 32, 4, seed=3, pin_memory=devices.pin_batches(device))
    ids = loader.window_ids()
    expected = torch.from_numpy(np.stack([
        np.asarray(loader.shards[s][o : o + 33], dtype=np.int64)
        for s, o in zip(np.searchsorted(loader.first_window, ids, side="right") - 1,
                        (ids - loader.first_window[np.searchsorted(loader.first_window, ids, side="right") - 1]) * 32)]))
    x, y = loader.next_batch(device)
    assert x.device.type == y.device.type == device.type and x.dtype == torch.int64
    assert y.data_ptr() == x.data_ptr() + x.element_size()  # y is x's tensor, one token on
    assert torch.equal(x.cpu(), expected[:, :-1]) and torch.equal(y.cpu(), expected[:, 1:])


# --------------------------------------------------------------------------- GPT-2 124M on CUDA


MEMORY_BOUND_GIB = 8.0


@pytest.mark.cuda
@pytest.mark.skipif(not devices.cuda_available(), reason=NO_CUDA)
def test_gpt2_124m_step_stays_under_a_memory_bound():
    """One forward/backward of GPT-2 124M at 8 x 1,024 tokens under bf16 autocast, chunked head,
    peaks below 8 GiB of allocated CUDA memory. Expected about 5 GB: fp32 weights and gradients
    1 GB; saved activations ~40 bytes x n_embd per token per layer (fp32 LayerNorm outputs and
    residuals, bf16 matmul inputs, the 4x MLP), 3 GB; the head's 1,024-row fp32 chunk, its fp32
    weight gradient and bf16 copies, 0.7 GB; autocast's bf16 weight copies, 0.25 GB. The full
    (8, 1024, 50257) logits alone would take 1.6 GB in fp32, so a head that builds them shows."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).train()
    idx = torch.randint(0, 50257, (8, 1024), device=device)
    devices.synchronize(device)
    devices.reset_peak_memory(device)
    with devices.autocast(device, torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    devices.synchronize(device)
    peak = devices.peak_memory_bytes(device) / 2**30
    assert torch.isfinite(loss) and peak < MEMORY_BOUND_GIB, f"peak {peak:.2f} GiB"
