"""sampling.py: the counter-based random numbers are splitmix64, the chunked argmax is torch's,
top-k/top-p never emit an excluded token, and every bad setting is refused by name. CPU."""

import pytest
import torch

from sampling import ARGMAX_CHUNK, SamplingParams, argmax_rows, sample_rows, uniforms


def test_uniforms_are_splitmix64():
    def reference(seed: int, counter: int) -> float:
        m = 1 << 64
        z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) % m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53

    seeds = [0, 1, -1, 2**62 + 12345, -(2**63), 987654321]
    counters = [0, 5, 2**40, 7, 1, 3]
    got = uniforms(torch.tensor(seeds), torch.tensor(counters)).tolist()
    assert got == [reference(s % 2**64, c) for s, c in zip(seeds, counters)]
    assert all(0 <= u < 1 for u in got)


@pytest.mark.parametrize("width", [ARGMAX_CHUNK - 1, 2 * ARGMAX_CHUNK, 3 * ARGMAX_CHUNK + 17, 50257])
def test_argmax_rows_is_argmax_with_ties_and_nans(width):
    """The chunked argmax returns exactly torch's index: the first of equal maxima, in a chunk or in
    the columns past the last whole chunk, and a NaN wherever argmax picks one."""
    g = torch.Generator().manual_seed(width)
    logits = torch.randint(-4, 5, (64, width), generator=g).float()  # many ties
    logits[1, -1] = 9.0  # the max in the last column (the tail, where the width leaves one)
    logits[2, :] = 1.0  # every column tied
    logits[3, width // 2] = float("nan")
    logits[4, -1] = float("nan")  # NaN in the tail
    logits[5, 0] = logits[5, -1] = float("nan")
    wide = torch.randn(8, width + 47, generator=g)[:, :width]  # a view of wider rows, as the engine's vocab prefix
    for x in (logits, wide, logits[:1]):
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def draws(logits: torch.Tensor, n: int = 20_000, temperature: float = 1.0, top_k: int = 0, top_p: float = 2.0):
    """n draws from one row of logits (V,), each with its own random number."""
    u = uniforms(torch.arange(n), torch.zeros(n, dtype=torch.long))
    filtered = top_k > 0 or top_p <= 1
    return sample_rows(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_k),
                       torch.full((n,), float(top_p)), torch.full((n,), filtered), u)


def test_top_k_and_top_p_never_emit_excluded_tokens():
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    probs = torch.empty(6)
    probs[order] = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    logits = probs.log()
    plain = draws(logits)
    assert (plain == 3).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (plain == 2).float().mean().item() == pytest.approx(0.02, abs=0.005)
    assert set(draws(logits, top_k=3).tolist()) == {3, 0, 5}
    tokens = draws(logits, top_p=0.7)  # 0.5 + 0.3 >= 0.7: the first two make the nucleus
    assert set(tokens.tolist()) == {3, 0}
    assert (tokens == 3).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.02)  # renormalised
    assert set(draws(logits, top_p=0.85).tolist()) == {3, 0, 5}
    assert set(draws(logits, top_k=4, top_p=0.99).tolist()) == {3, 0, 5, 1}  # top-k first, then top-p
    assert set(draws(logits, temperature=0.0).tolist()) == {3}


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=True), "prompt_logprobs"),
])
def test_bad_sampling_settings_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
