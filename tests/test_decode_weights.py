"""decode_weights.py: each weight layout's linear against the plain one, the engine's greedy tokens
with oneDNN fp32 weights equal to torch's (bf16: its logits), int8's quantisation bound, the model left untouched,
and sample.py --dtype int8 from the command line. CPU."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import decode_weights
from decode_weights import Int8Linear, OneDNNLinear, SplitLinear, prepare
from engine import Engine
from sampling import SamplingParams
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=96)


def tiny(seed: int = 0, **overrides) -> GPT:
    """A tiny fp32 model with spread-out random weights (confident predictions)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


LAYOUTS = {"onednn": OneDNNLinear, "split2": lambda linear, dtype: SplitLinear(linear, dtype, parts=2),
           "split3": lambda linear, dtype: SplitLinear(linear, dtype, parts=3)}  # 3: 80 columns need a padded block


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_linears_equal_f_linear(layout, bias, dtype):
    if layout == "onednn" and not decode_weights.onednn_available(dtype):
        pytest.skip(f"oneDNN's linear does not run in {dtype} on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).to(dtype)
    layer = LAYOUTS[layout](linear, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: summation order moves the last bit of 8
    for shape in [(3, 5, 48), (1, 1, 48), (4, 48)]:  # (B, T, C) as the blocks call it; one row; the head's (B, C)
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            ours, plain = layer(x), F.linear(x, linear.weight, linear.bias)
        assert ours.shape == plain.shape == (*shape[:-1], 80) and ours.dtype == dtype
        torch.testing.assert_close(ours, plain, rtol=tolerance, atol=tolerance)


def test_int8_linear_is_the_dequantised_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer = Int8Linear(linear)
    w = linear.weight.detach()
    step = w.abs().amax(dim=1, keepdim=True) / 127  # each row's largest |w| maps to 127
    # Rounding to the nearest of 255 levels: no weight moves by more than half a step.
    assert ((layer.weight_int8.float() * step - w).abs() <= 0.5 * step * (1 + 1e-5)).all()
    assert (layer.weight_int8.abs().amax(dim=1) == 127).all()
    dequantised = layer.weight_int8.float() * layer.scale.float()[:, None]  # the scale the kernel gets (bf16)
    x = torch.randn(2, 7, 64).bfloat16()
    with torch.no_grad():
        y = layer(x)
    reference = x.float() @ dequantised.T + linear.bias.detach()
    assert y.shape == (2, 7, 40) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=2e-2)


def test_int8_refuses_a_width_its_kernel_cannot_run():
    with pytest.raises(ValueError, match="n_embd divisible by 16.*got 24"):
        prepare(tiny(n_embd=24, n_head=2), "int8")
    with pytest.raises(ValueError, match="weights must be one of float32, bfloat16, int8, got 'fp8'"):
        prepare(tiny(), "fp8")


def test_prepare_leaves_the_model_alone():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for weights in decode_weights.WEIGHTS:
        decoding, description = prepare(model, weights)
        assert description.startswith(weights)
        assert decoding.transformer.wte.weight.dtype == (torch.float32 if weights == "float32" else torch.bfloat16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert all(isinstance(m, nn.Linear) for m in (model.lm_head, model.transformer.h[0].mlp.c_fc))


def test_engine_greedy_tokens_equal_across_fp32_kernels():
    """oneDNN's fp32 linear is the same math as torch's: the same greedy tokens, through ragged batches."""
    model = tiny()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (int(n),), generator=g).tolist() for n in (3, 9, 1, 5)]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    plain = Engine(model, max_batch=3).generate(prompts, params)
    names = {"torch": "torch", "onednn": "oneDNN", "split": "split bmm"}
    classes = {"torch": nn.Linear, "onednn": OneDNNLinear, "split": SplitLinear}
    for kernel in ("torch", "onednn", "split"):
        decoding, description = prepare(model, "float32", kernel=kernel)
        assert description == f"float32 via {names[kernel]}"  # every Linear
        assert type(decoding.lm_head) is classes[kernel]
        assert Engine(decoding, max_batch=3).generate(prompts, params) == plain
    auto, description = prepare(model, "float32", batch=2)  # "auto": whichever timed faster here
    engine = Engine(auto, max_batch=2)
    assert description.startswith("float32 via ")
    streamed = decode_weights.streamed_bytes(model, torch.float32)  # what each shape was timed with
    assert streamed == 4 * (2 * 12 * 32 * 32 + 96 * 32)  # 2 layers of 12 C^2 weights, and the head
    for layer in (auto.lm_head, auto.transformer.h[0].attn.c_attn, auto.transformer.h[1].mlp.c_proj):
        chosen = decode_weights.linear_kernel(layer.in_features, layer.out_features, torch.float32, streamed, batch=2)
        assert type(layer) is classes[chosen]  # timed for one row and the engine's 2
    assert engine.generate(prompts, params) == plain


def test_bf16_kernels_decode_the_same_logits():
    """bf16 weights through oneDNN's linear or torch's: the same model, up to bf16 rounding."""
    if not decode_weights.onednn_available(torch.bfloat16):
        pytest.skip("oneDNN's linear does not run in bf16 on this CPU")
    model = tiny()
    idx = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    logits = {}
    for kernel in ("torch", "onednn"):
        decoding, description = prepare(model, "bfloat16", kernel=kernel)
        assert description == f"bfloat16 via {'oneDNN' if kernel == 'onednn' else 'torch'}"
        assert isinstance(decoding.transformer.h[1].attn.c_proj, OneDNNLinear) == (kernel == "onednn")
        with torch.no_grad():
            logits[kernel] = decoding(idx)[0].float()
    assert logits["torch"].dtype == torch.float32 and logits["torch"].shape == (2, 10, 96)
    torch.testing.assert_close(logits["onednn"], logits["torch"], rtol=0.05, atol=0.05)
    with torch.no_grad():
        fp32 = model(idx)[0]
    assert (logits["onednn"].argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.8  # still the model


def test_int8_logits_stay_close_to_fp32():
    """Quantisation moves the logits a little, not the model: the next-token distributions of a
    whole sequence stay close to fp32's (KL per token) and mostly share their top token."""
    model = tiny(n_embd=64, n_head=4)
    idx = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = torch.log_softmax(model(idx)[0].float(), dim=-1)
        int8_model, _ = prepare(model, "int8")
        quantised = torch.log_softmax(int8_model(idx)[0].float(), dim=-1)
    kl = (reference.exp() * (reference - quantised)).sum(-1).mean()
    agree = (reference.argmax(-1) == quantised.argmax(-1)).float().mean()
    assert kl < 0.05, kl
    assert agree >= 0.8, agree


def test_sample_cli_runs_int8_and_refuses_a_width_it_cannot_run(tmp_path, capsys):
    from sample import main

    tiny(n_embd=32, vocab_size=50257).save_pretrained(tmp_path / "hf")
    code = main(["--checkpoint", str(tmp_path / "hf"), "--dtype", "int8", "--prompt", "Hello", "--max_new_tokens", "5",
                 "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "decoding with int8 via torch's int8 weight-only kernel weights" in err
    assert out.startswith("Hello")
    tiny(n_embd=24, n_head=2, vocab_size=50257).save_pretrained(tmp_path / "odd")
    code = main(["--checkpoint", str(tmp_path / "odd"), "--dtype", "int8", "--prompt", "Hello", "--max_new_tokens", "5"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: --dtype int8 with {tmp_path / 'odd'}: int8 weights need n_embd divisible "
                                        f"by 16 (torch's int8 kernel), got 24; use bfloat16 or float32"]


def test_bf16_weights_attend_in_fp32_on_the_cpu():
    """bf16 weights, but the KV cache (and so attention) stays fp32 on a CPU, where torch's bf16
    attention is slow: the engine's logprobs still follow the bf16 model's full forward pass."""
    model = tiny()
    engine = Engine(prepare(model, "bfloat16", batch=2)[0], max_batch=2)
    assert engine.dtype == torch.bfloat16 and engine.cache.k.dtype == engine.cache.v.dtype == torch.float32
    prompt = [5, 17, 3, 60]
    out = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=0))
    tokens = out[0]
    with torch.no_grad():
        full = torch.log_softmax(engine.model(torch.tensor([prompt + tokens]))[0][0].float(), dim=-1)
    expected = full[len(prompt) - 1: -1].gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    seqs = []
    engine.add(prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=0), lambda s, o: seqs.append(o))
    while engine.step():
        pass
    got = torch.tensor([o.logprob for o in seqs if o.token is not None])
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)  # bf16 rounding of q, k, v and of x
