"""model.py: sizes, tying (in memory and through a saved directory), init, causality, attention impls,
checkpointing, the loss head through the model and every config error (HF parity and the weight
files are tested in test_hf_dir.py, decoding in test_engine.py). CPU, float32 unless a test says
otherwise."""

import math

import pytest
import torch

import loss_head
import model as model_module
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Give every parameter (biases and LayerNorms included) random values, so a mixed-up or
    untransposed weight shows in the logits and outputs depend strongly on context."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def random_ids(B: int, T: int, vocab_size: int = TINY["vocab_size"], seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------- sizes


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == expected  # parameters() counts a tied one once
    assert model.num_params() == expected


def test_flops_per_token_and_non_embedding_count():
    model = tiny()
    assert model.flops_per_token(4) > 0
    assert model.flops_per_token(4) < model.flops_per_token(8) < model.flops_per_token(16)
    assert model.flops_per_token() == model.flops_per_token(TINY["block_size"])
    assert 0 < model.num_params(non_embedding=True) < model.num_params()


# -------------------------------------------------------------------------------- tying


def assert_tied(model: GPT) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tying_survives_load_to_and_save(tmp_path):
    model = tiny()
    assert_tied(model)

    other = tiny(seed=1)
    other.load_state_dict(model.state_dict())
    assert_tied(other)
    torch.testing.assert_close(other.lm_head.weight, model.transformer.wte.weight, rtol=0, atol=0)

    model.to(torch.float64)
    assert_tied(model)
    assert model.lm_head.weight.dtype == torch.float64
    model.to("cpu")
    assert_tied(model)
    model.to(torch.float32)

    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert_tied(loaded)
    torch.testing.assert_close(loaded.lm_head.weight, model.transformer.wte.weight, rtol=0, atol=0)


def test_tie_weights_reties_after_the_meta_device_and_to_empty():
    """What Accelerate's FSDP2 RAM-efficient loading does (accelerate.utils.fsdp_utils): the model
    to the meta device, tie_weights(), materialised, the full state dict loaded, tie_weights()."""
    model, reference = tiny(), tiny()
    state = reference.state_dict()
    model.to(torch.device("meta"))  # each module's Parameter replaced on its own: untied
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.tie_weights()
    assert_tied(model)
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    model.tie_weights()
    assert_tied(model)
    ids = random_ids(2, TINY["block_size"])
    torch.testing.assert_close(model(ids)[0], reference(ids)[0], rtol=0, atol=0)
    untied = tiny(tie_embeddings=False)
    untied.tie_weights()  # a no-op for an untied model
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_tying_survives_accelerate_prepare_and_names_the_block_for_fsdp():
    from accelerate import Accelerator

    model = Accelerator(cpu=True).prepare(tiny())
    assert_tied(model)
    assert GPT._no_split_modules == ["Block"] and type(model.transformer.h[0]).__name__ == "Block"


def test_untied_lm_head_is_separate_and_initialised(tmp_path):
    model = tiny(tie_embeddings=False, vocab_size=512, n_embd=64, n_head=4)
    head, wte = model.lm_head.weight, model.transformer.wte.weight
    assert head is not wte and head.data_ptr() != wte.data_ptr()
    assert not torch.equal(head, wte)
    assert head.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params() > tiny(vocab_size=512, n_embd=64, n_head=4).num_params()

    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    torch.testing.assert_close(loaded.lm_head.weight, head, rtol=0, atol=0)
    torch.testing.assert_close(loaded.transformer.wte.weight, wte, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- init


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_init_statistics_per_weight_group(tied):
    # Big enough that the smallest group (a 128x128 c_proj, 16k values) has a sample std
    # within ~0.6% of the truth; 5% is many standard errors away.
    config = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=1024, tie_embeddings=tied)
    torch.manual_seed(0)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.add(name)
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            target = residual_std
        elif "ln_" in name:
            expected = 1.0 if name.endswith(".weight") else 0.0
            assert torch.all(p == expected), name
            continue
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
            continue
        else:  # wte, wpe, c_attn, c_fc, lm_head
            target = 0.02
        assert p.std().item() == pytest.approx(target, rel=0.05), name
        assert abs(p.mean().item()) < 0.05 * target, name
    assert "lm_head.weight" in seen and "transformer.h.3.mlp.c_proj.weight" in seen


def test_initial_loss_is_near_uniform():
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=4096)
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = random_ids(8, 64, config.vocab_size, seed=1)
    targets = random_ids(8, 64, config.vocab_size, seed=2)
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(config.vocab_size), abs=0.1)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_later_token_cannot_change_earlier_logits(attention):
    model = tiny(attention=attention)
    perturb_(model, 1)
    idx = random_ids(2, TINY["block_size"])
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)  # the change does reach later positions


def sdpa_and_manual() -> tuple[GPT, GPT]:
    sdpa = tiny(attention="sdpa")
    perturb_(sdpa, 1)
    manual = tiny(attention="manual")
    manual.load_state_dict(sdpa.state_dict())
    return sdpa, manual


def test_manual_and_sdpa_attention_agree():
    sdpa, manual = sdpa_and_manual()
    idx = random_ids(3, TINY["block_size"])
    with torch.no_grad():
        a, _ = sdpa(idx)
        b, _ = manual(idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- gradient checkpointing


def loss_grads_and_saved_bytes(model: GPT, idx, targets):
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, saved


def test_gradient_checkpointing_matches_plain_and_saves_memory():
    config = dict(n_layer=4, n_head=2, n_embd=32, block_size=64, vocab_size=64, dropout=0.1)
    plain = tiny(**config)
    checkpointed = tiny(**config, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    idx, targets = random_ids(8, 64, seed=1), random_ids(8, 64, seed=2)

    loss_a, grads_a, bytes_a = loss_grads_and_saved_bytes(plain, idx, targets)
    loss_b, grads_b, bytes_b = loss_grads_and_saved_bytes(checkpointed, idx, targets)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=0, msg=name)
    assert bytes_b < 0.5 * bytes_a, (bytes_b, bytes_a)


# ------------------------------------------------------------------------------ loss head

IMPLS = ["own"] + (["torch"] if hasattr(torch.nn.functional, "linear_cross_entropy") else [])


@pytest.fixture
def small_chunks(monkeypatch):
    """7 rows per chunk: every test input spans several chunks, the last one ragged."""
    monkeypatch.setattr(loss_head, "cpu_chunk_rows", lambda n_embd, dtype: 7)


def targets_with_ignored(B: int, T: int, seed: int) -> torch.Tensor:
    targets = random_ids(B, T, seed=seed)
    targets.view(-1)[::5] = -100  # every fifth position is not scored
    return targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(impl, reduction, small_chunks):
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    targets[::5] = -100
    loss = loss_head.linear_cross_entropy(h, weight, targets, reduction, impl=impl)
    expected = torch.nn.functional.cross_entropy(h @ weight.T, targets, reduction=reduction)
    upstream = torch.randn_like(expected)  # per-row weights for "none"
    grads = torch.autograd.grad((loss * upstream).sum(), (h, weight))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (h, weight))
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    if reduction == "none":
        assert torch.all(loss[::5] == 0)
    # 1e-5, as the issue asks: both sides are fp32 and sum 300 logits in different orders, and
    # each is ~2e-6 from a float64 reference on elements of order 1 (measured).
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_cross_entropy_keeps_losses_whose_probability_underflows(impl, small_chunks):
    """Logits hundreds apart, as in a diverging run: the target's softmax underflows to 0 in some
    rows, and those losses must still be the exact finite values, with finite gradients."""
    torch.manual_seed(0)
    h = (torch.randn(30, 16) * 40).requires_grad_()
    weight = torch.randn(200, 16, requires_grad=True)
    targets = torch.randint(0, 200, (30,))
    loss = loss_head.linear_cross_entropy(h, weight, targets, "none", impl=impl)
    expected = torch.nn.functional.cross_entropy(h @ weight.T, targets, reduction="none")
    assert (expected > 104).sum() >= 10  # beyond -log of the smallest float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.mean().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_head_equals_the_full_head_for_every_gradient(tied, reduction, small_chunks):
    chunked = tiny(tie_embeddings=tied)
    perturb_(chunked, 3)
    full = tiny(tie_embeddings=tied, loss_impl="full")
    full.load_state_dict(chunked.state_dict())
    idx, targets = random_ids(3, 16, seed=1), targets_with_ignored(3, 16, seed=2)
    results = []
    for model in (chunked, full):
        logits, loss = model(idx, targets, reduction=reduction)
        assert logits is None  # no logits unless asked for
        (loss.sum() if reduction == "none" else loss).backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_c, grads_c), (loss_f, grads_f) = results
    assert loss_c.shape == ((3, 16) if reduction == "none" else ())
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-5, atol=1e-6)
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_head_with_two_losses_alive_and_a_second_backward(small_chunks):
    """Two forward passes before one backward (the logits buffer is reused between calls) give
    the full head's gradients; backpropagating twice through one loss is refused by name, since
    the gradients are scaled in place."""
    chunked = tiny()
    perturb_(chunked, 3)
    full = tiny(loss_impl="full")
    full.load_state_dict(chunked.state_dict())
    batches = [(random_ids(3, 16, seed=s), targets_with_ignored(3, 16, seed=s + 1)) for s in (1, 5)]
    for model in (chunked, full):
        first, second = (model(idx, targets)[1] for idx, targets in batches)
        (first + 2 * second).backward()
    for (name, got), want in zip(chunked.named_parameters(), full.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5, msg=name)
    _, loss = chunked(*batches[0])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_forward_returns_logits_or_loss_or_both(small_chunks):
    model = tiny()
    idx, targets = random_ids(2, 16, seed=1), targets_with_ignored(2, 16, seed=2)
    logits, loss = model(idx)
    assert logits.shape == (2, 16, TINY["vocab_size"]) and loss is None
    none_logits, chunked_loss = model(idx, targets)
    both_logits, full_loss = model(idx, targets, return_logits=True)
    assert none_logits is None and torch.equal(both_logits, logits)
    torch.testing.assert_close(chunked_loss, full_loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        model(idx, targets, reduction="max")


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_head_under_bf16_autocast_keeps_an_fp32_loss(impl, small_chunks, monkeypatch):
    """Under autocast both heads multiply in bf16 and take the softmax in fp32: they agree to bf16
    precision, and the loss is fp32."""
    chunked = tiny()
    perturb_(chunked, 3)
    full = tiny(loss_impl="full")
    full.load_state_dict(chunked.state_dict())
    idx, targets = random_ids(3, 16, seed=1), targets_with_ignored(3, 16, seed=2)
    real = model_module.linear_cross_entropy
    monkeypatch.setattr(model_module, "linear_cross_entropy", lambda *a, **k: real(*a, **k, impl=impl))
    results = []
    for model in (chunked, full):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        results.append((loss, model.transformer.wte.weight.grad))
    (loss_c, grad_c), (loss_f, grad_f) = results
    assert loss_c.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-2, atol=1e-2)
    cosine = torch.nn.functional.cosine_similarity(grad_c.flatten(), grad_f.flatten(), dim=0)
    assert cosine > 0.999, cosine


def test_chunked_head_bf16_gradients_follow_fp32_with_an_fp32_scale():
    """Under bf16 autocast both gradients are accumulated and scaled in fp32: their overall scale
    is within 0.1% of fp32's, and each is within 0.3% of it elementwise (relative norm). The
    upstream scale sits just under a bf16 rounding midpoint: rounded to bf16, as it once was,
    it put the backbone's gradient 0.32% low (and 0.41% off elementwise)."""
    torch.manual_seed(0)
    h, weight = torch.randn(96, 64), torch.randn(1000, 64) * 0.1
    targets = torch.randint(0, 1000, (96,))
    targets[::7] = -100
    upstream = (1 + 2**-8 - 2**-12) * int((targets != -100).sum())  # the mean's scale: 1.0037
    grads = []
    for bf16 in (False, True):
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_head.linear_cross_entropy(hh, ww, targets, "mean", impl="own", chunk_rows=32)
        (loss * upstream).backward()
        assert hh.grad.dtype == ww.grad.dtype == torch.float32
        grads.append((hh.grad, ww.grad))
    for got, want in zip(grads[1], grads[0]):
        scale = (got * want).sum() / (want * want).sum()  # got's projection onto want
        assert abs(scale - 1) < 1e-3, scale
        assert (got - want).norm() / want.norm() < 3e-3


def test_chunked_head_with_gradient_checkpointing_and_compile(small_chunks):
    eager = tiny(gradient_checkpointing=True).train()
    perturb_(eager, 3)
    compiled = tiny(gradient_checkpointing=True).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    idx, targets = random_ids(2, 16, seed=1), targets_with_ignored(2, 16, seed=2)
    grads = []
    for model in (eager, compiled):
        _, loss = model(idx, targets)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[1][1][name], grads[0][1][name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("field", ["block_size", "vocab_size", "n_layer", "n_head", "n_embd"])
@pytest.mark.parametrize("value", [0, -1])
def test_config_rejects_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: value})


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_embd.*n_head"):
        GPTConfig(n_embd=30, n_head=4)
    for dropout in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            GPTConfig(dropout=dropout)
    with pytest.raises(ValueError, match="attention.*flash"):
        GPTConfig(attention="flash")


def test_sequence_longer_than_block_size_raises():
    model = tiny()
    with pytest.raises(ValueError) as err:
        model(random_ids(1, TINY["block_size"] + 1))
    assert "17" in str(err.value) and "16" in str(err.value)
