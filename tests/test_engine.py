"""engine.py: ragged batches equal one-at-a-time decoding, the cache's masks and positions equal a
full recompute, slot reuse, seeds independent of the batch, sampling filters, stop tokens,
cancellation and every settings error. CPU; float64 where argmax must not meet near-ties."""

import pytest
import torch

from engine import FINISH_CANCELLED, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Engine
from sampling import SamplingError, SamplingParams
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared, busy machine: one thread is 5-10x faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(attention: str = "sdpa", seed: int = 0, dtype=torch.float64) -> GPT:
    """A tiny model with spread-out random weights (so greedy text varies with the context)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY, attention=attention))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype).eval()


def prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY["vocab_size"], (int(length),), generator=g).tolist()
            for length in torch.randint(1, 9, (n,), generator=g)]


@torch.no_grad()
def recompute_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by running the whole (cropped) text through the model at every step."""
    ids = list(prompt)
    for _ in range(max_tokens):
        logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_ragged_batch_equals_one_at_a_time_and_full_recompute(attention):
    model = tiny(attention)
    ps = prompts(7)
    max_tokens = [5, 12, 3, 9, 14, 7, 11]  # rows leave at different steps; their slots are reused
    params = [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens]
    batched = Engine(model, max_batch=3).generate(ps, params)  # 7 requests through 3 slots
    alone = [Engine(model, max_batch=1).generate([p], prm)[0] for p, prm in zip(ps, params)]
    assert batched == alone
    assert batched == [recompute_greedy(model, p, m) for p, m in zip(ps, max_tokens)]
    assert [len(t) for t in batched] == max_tokens
    assert len({tuple(t) for t in batched}) == len(ps) and max(len(set(t)) for t in batched) > 3


@torch.no_grad()
def test_logprobs_of_every_token_equal_the_full_forward_pass():
    # Checks masks and per-row positions directly: each token's log-probability, in a ragged
    # batch, equals log_softmax of a plain forward pass over the whole text.
    model = tiny()
    ps = prompts(4, seed=1)
    engine = Engine(model, max_batch=4)
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=5, logprobs=3, prompt_logprobs=True)
    outputs = {}
    seqs = {}
    for where, seq, out in engine.stream(ps, params):
        seqs[where] = seq
        if out.token is not None:
            outputs.setdefault(where, []).append(out)
    for (p, _), outs in outputs.items():
        seq = seqs[(p, 0)]
        text = ps[p] + seq.tokens
        logits, _ = model(torch.tensor([text]))
        reference = torch.log_softmax(logits[0].float(), dim=-1)  # (T, V)
        T = len(ps[p])
        for i, out in enumerate(outs):
            assert out.logprob == pytest.approx(reference[T - 1 + i, out.token].item(), abs=1e-5)
            best = reference[T - 1 + i].topk(3)
            assert [t for t, _ in out.top_logprobs] == best.indices.tolist()
            assert [v for _, v in out.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-5)
        assert seq.prompt_logprobs[0] is None
        for i in range(1, T):
            value, top = seq.prompt_logprobs[i]
            assert value == pytest.approx(reference[i - 1, ps[p][i]].item(), abs=1e-5)
            assert [t for t, _ in top] == reference[i - 1].topk(3).indices.tolist()


def test_manual_and_sdpa_attention_agree_through_the_cache():
    sdpa, manual = tiny("sdpa", dtype=torch.float32), tiny("manual", dtype=torch.float32)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    ps = prompts(3, seed=2)
    a = [o.logprob for _, _, o in Engine(sdpa, max_batch=3).stream(ps, params) if o.token is not None]
    b = [o.logprob for _, _, o in Engine(manual, max_batch=3).stream(ps, params) if o.token is not None]
    assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_context_shift_past_block_size_equals_recompute(attention):
    model = tiny(attention)
    ps = [[3, 1, 4, 1, 5], [9, 2]]
    engine = Engine(model, max_batch=2, context_shift=True)
    got = engine.generate(ps, SamplingParams(max_tokens=32, temperature=0))  # block_size is 24
    assert got == [recompute_greedy(model, p, 32) for p in ps]
    with pytest.raises(ValueError, match="exceeds the context"):
        Engine(model).add([1, 2], SamplingParams(max_tokens=23), lambda *a: None)


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = tiny(dtype=torch.float32)
    target = prompts(1, seed=3)[0]
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=11)
    alone = Engine(model, max_batch=1).generate([target], params)[0]
    others = prompts(5, seed=4)
    mixed = [SamplingParams(max_tokens=m, temperature=t, top_k=k, seed=s)
             for m, t, k, s in [(9, 0.0, None, None), (14, 1.3, 5, 1), (4, 0.7, None, None), (15, 1.0, 2, 3),
                                (6, 0.0, None, None)]]
    batched = Engine(model, max_batch=4).generate(others[:2] + [target] + others[2:], mixed[:2] + [params] + mixed[2:])
    assert batched[2] == alone
    assert Engine(model, max_batch=1).generate([target], SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9,
                                                                        seed=12))[0] != alone


def test_choices_of_one_request_share_a_prefill_and_differ():
    model = tiny(dtype=torch.float32)
    engine = Engine(model, max_batch=4)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    three = engine.generate([[5, 6, 7]], params, n=3)
    assert len({tuple(t) for t in three}) == 3
    assert engine.generate([[5, 6, 7]], params, n=3) == three
    # Prefilled once and copied, or prefilled alone (more choices than slots): the same tokens.
    assert Engine(model, max_batch=1).generate([[5, 6, 7]], params, n=3) == three


def test_top_k_one_is_greedy_and_stop_tokens_end_a_sequence():
    model = tiny()
    p = prompts(1, seed=5)[0]
    engine = Engine(model, max_batch=2)
    greedy = engine.generate([p], SamplingParams(max_tokens=12, temperature=0))[0]
    assert engine.generate([p], SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=0))[0] == greedy
    stop = greedy[4]
    events = [(o.token, o.finish_reason) for _, _, o in
              engine.stream([p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,)))]
    first = greedy.index(stop)
    assert [t for t, _ in events[:-1]] == greedy[:first]  # the stop token itself is not output
    assert events[-1] == (None, FINISH_STOP)
    assert [o.finish_reason for _, _, o in engine.stream([p], SamplingParams(max_tokens=3, temperature=0))][-1] \
        == FINISH_LENGTH


def one_slot_running_and_waiting(running_tokens: int):
    """A one-slot engine given two greedy requests: [1, 2, 3] for running_tokens tokens (it takes the
    slot) and [4, 5] for 3 (it waits). Returns the model, engine, both sequences and the sink's events."""
    model = tiny(dtype=torch.float32)
    engine = Engine(model, max_batch=1)
    events = []
    sink = lambda seq, out: events.append((seq, out))  # noqa: E731
    running = engine.add([1, 2, 3], SamplingParams(max_tokens=running_tokens, temperature=0), sink)
    waiting = engine.add([4, 5], SamplingParams(max_tokens=3, temperature=0), sink)
    return model, engine, running, waiting, events


def test_cancel_frees_the_slot_for_the_next_request():
    model, engine, first, second, events = one_slot_running_and_waiting(20)
    for _ in range(3):
        engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel(first)
    engine.step()  # the cancelled row leaves and the waiting request takes its slot in the same step
    assert first[0].finish_reason == FINISH_CANCELLED and len(first[0].tokens) == 4  # prefill + decode per step
    assert engine.rows == second
    while engine.step():
        pass
    assert second[0].tokens == Engine(model, max_batch=1).generate([[4, 5]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert [o.finish_reason for s, o in events if o.token is None] == [FINISH_CANCELLED, FINISH_LENGTH]


def test_a_step_that_raises_fails_its_sequences_and_the_next_step_goes_on():
    """An internal bug in one decode step (injected): the step's sequences end with FINISH_ERROR and
    free their slots, a waiting request is untouched, and the engine serves on."""
    model, engine, running, waiting, _ = one_slot_running_and_waiting(5)
    engine.step()  # prefill: running holds the one slot
    real = engine._decode

    def broken():
        engine._decode = real
        raise RuntimeError("injected fault")

    engine._decode = broken
    with pytest.raises(RuntimeError, match="injected fault"):
        engine.step()
    assert running[0].finish_reason == FINISH_ERROR and engine.num_running == 0 and engine.num_waiting == 1
    while engine.step():
        pass
    expected = Engine(model, max_batch=1).generate([[4, 5]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert waiting[0].tokens == expected and waiting[0].finish_reason == FINISH_LENGTH


def test_top_k_at_or_past_the_vocabulary_means_all_and_seeds_are_64_bit():
    model = tiny(dtype=torch.float32)
    sampled = lambda top_k, seed=3: Engine(model, max_batch=1).generate(  # noqa: E731
        [[1, 2]], SamplingParams(max_tokens=8, temperature=1.0, top_k=top_k, seed=seed))[0]
    assert sampled(None) == sampled(TINY["vocab_size"]) == sampled(2**63) == sampled(2**100)
    assert sampled(None, -1) == sampled(None, 2**64 - 1)
    for seed in (2**64, -(2**63) - 1, 1.5, True):
        with pytest.raises(SamplingError, match="seed"):
            SamplingParams(seed=seed)




def test_bad_requests_are_refused_by_name():
    engine = Engine(tiny(), max_batch=2)
    sink = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError, match="1 to 24 tokens, got 0"):
        engine.add([], SamplingParams(), sink)
    with pytest.raises(ValueError, match="token id 64"):
        engine.add([1, 64], SamplingParams(), sink)
    with pytest.raises(ValueError, match="n must be >= 1"):
        engine.add([1], SamplingParams(), sink, n=0)
