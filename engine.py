"""The decoding engine: KV-cache slots, prefill, the batched decode step, per-sequence sampling
settings and continuous batching. It takes and yields token ids: no tokenizer, no HTTP.

    engine = Engine(model, max_batch=8)  # from sampling import SamplingParams
    outputs = engine.generate([[50256, 464], [464]], SamplingParams(max_tokens=20, temperature=0))

How a step works (`Engine.step`):
  1. cancelled sequences leave, freeing their slots;
  2. waiting requests are prefilled, each into free slots (a request with n choices is prefilled
     once and its keys/values copied to the other n - 1 slots), and their first token is drawn;
  3. every running sequence advances one token in ONE forward pass of shape (B, 1): each row
     sits at its own position (GPT-2's absolute positions: a row's next position is its length)
     and attends only to its own keys (a (B, 1, 1, span) mask hides keys past its length);
  4. sequences that drew a stop token or reached max_tokens leave; the last running row moves
     into the freed slot, so the running rows are always slots 0..B-1 and the decode step works
     on views of the cache, never on gathered copies.

Sampling is per row (temperature, top_k, top_p, a seed) and lives in sampling.py: a seeded
request gives the same tokens whatever else is in the batch.

Weights: the engine decodes with the model it is given, computing in its dtype, except that on
a CPU the KV cache and attention stay in fp32. The caller lays the weights out for decoding
first where it wants to (decode_weights.prepare: float32 or bfloat16, each Linear through the
kernel that timed fastest here for one row and for max_batch rows, or int8 weight-only). `python bench.py sample`
measures each against transformers and the memory-bandwidth bound.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

import devices
from sampling import SamplingParams, _signed64, _top_logprobs, derive_seed, sample_rows, uniforms


FINISH_STOP = "stop"  # drew one of its stop tokens (not part of the output)
FINISH_LENGTH = "length"  # reached max_tokens
FINISH_CANCELLED = "cancelled"  # Engine.cancel
FINISH_ERROR = "error"  # the step it was in raised (see Engine.step)


@dataclass
class Output:
    """One event of a sequence: a new token, or its end (token None, finish_reason set).

    logprob: the token's log-probability under the model; top_logprobs: [(token, logprob)] of the
    N most likely tokens, most likely first (both None unless the request asked for logprobs).
    """

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


class Sequence:
    """One generation: the prompt, its settings, the tokens so far, and `sink`, called as
    sink(sequence, Output) for each event on the thread that runs Engine.step."""

    def __init__(self, prompt: list[int], params: SamplingParams, seed: int, index: int,
                 sink: Callable[["Sequence", Output], None]):
        self.prompt = prompt
        self.params = params
        self.seed = seed  # a signed 64-bit int
        self.index = index  # which choice of its request (0..n-1)
        self.sink = sink
        self.tokens: list[int] = []
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ------------------------------------------------------------------------- the cache


class SlotCache:
    """Keys and values of `slots` sequences for every layer: k and v (n_layer, slots, nh,
    block_size, hs), in `dtype`. A slot holds one sequence. A forward pass is handed what it
    needs, a `PrefillPass` or a `DecodePass` over this cache; its attention layers call their
    `update` (see model.CausalSelfAttention.forward)."""

    def __init__(self, config, slots: int, device, dtype):
        shape = (config.n_layer, slots, config.n_head, config.block_size, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = torch.arange(slots, device=device)
        self.positions = torch.arange(config.block_size, device=device)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (every layer)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class PrefillPass:
    """One sequence (1, T) at positions 0..T-1, its keys and values written into `slot`."""

    cache: SlotCache
    slot: int
    T: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (1, nh, T, hs); attend over them causally (mask None), in the cache's dtype."""
        k, v = k.to(self.cache.k.dtype), v.to(self.cache.v.dtype)
        self.cache.k[layer, self.slot, :, : self.T] = k[0]
        self.cache.v[layer, self.slot, :, : self.T] = v[0]
        return k, v, None


class DecodePass:
    """One token for each of slots 0..B-1, slot b's at positions[b] (B,); every row attends over
    keys 0..span-1 of its own slot, up to and including its position (a (B, 1, 1, span) mask)."""

    def __init__(self, cache: SlotCache, positions: torch.Tensor, span: int):
        B = positions.size(0)
        self.cache, self.positions, self.span, self.rows = cache, positions, span, cache.rows[:B]
        self.mask = (cache.positions[:span].unsqueeze(0) <= positions.unsqueeze(1)).view(B, 1, 1, span)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values k, v (B, nh, 1, hs) at each row's position; return (keys,
        values, mask) to attend over, views of the cache in its dtype."""
        k, v = k.to(self.cache.k.dtype), v.to(self.cache.v.dtype)
        # Row b's new key goes to position positions[b]. An indexed assignment, not scatter_: torch's
        # bf16 CPU scatter_ was over 100x slower at batch 16 (docs/internals.md, "Decoding weights").
        self.cache.k[layer][self.rows, :, self.positions] = k[:, :, 0]  # (B, nh, hs)
        self.cache.v[layer][self.rows, :, self.positions] = v[:, :, 0]
        B, span = self.rows.size(0), self.span
        keys, values = self.cache.k[layer, :B], self.cache.v[layer, :B]  # views (B, nh, block_size, hs)
        return keys[:, :, :span], values[:, :, :span], self.mask


def prefill(model, cache: SlotCache, slot: int, tokens: list[int]) -> torch.Tensor:
    """Run `tokens` (at positions 0..T-1) through the model into `slot`; their hidden states (T, C)."""
    idx = torch.tensor([tokens], dtype=torch.long, device=cache.k.device)
    return model.hidden_states(idx, PrefillPass(cache, slot, len(tokens)))[0]


def decode_one_token(model, cache: SlotCache, inputs: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
    """One token per row of slots 0..B-1: inputs (B,) at positions (B,), each row attending over
    its own keys (span: the largest position + 1, known to the caller without reading the
    device). The hidden states (B, C)."""
    return model.hidden_states(inputs.unsqueeze(1), DecodePass(cache, positions, span), positions.unsqueeze(1))[:, 0]


# ------------------------------------------------------------------------ the engine


def _check_request(prompt: list[int], params: SamplingParams, n: int, block_size: int, vocab: int,
                   context_shift: bool) -> SamplingParams:
    """Engine.add's checks (see there); returns params with a top_k that keeps every token dropped."""
    T = len(prompt)
    if not 1 <= T <= block_size:
        raise ValueError(f"the prompt must hold 1 to {block_size} tokens, got {T}")
    if not context_shift and T + params.max_tokens > block_size:
        raise ValueError(f"prompt ({T} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                         f"(block_size {block_size})")
    if any(not 0 <= t < vocab for t in prompt):
        raise ValueError(f"prompt token id {next(t for t in prompt if not 0 <= t < vocab)} is outside "
                         f"the vocabulary (vocab_size={vocab})")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if params.top_k is not None and params.top_k >= vocab:  # keeps every token: the same as no top_k
        params = dataclasses.replace(params, top_k=None)
    return params


class Batch:
    """The running sequences: rows 0..B-1 of the cache's slots (`rows`), each row's sampling
    state on the device, and the passes that advance them (prefill, one decode step, the draw).
    Used by Engine, on the thread that steps it."""

    def __init__(self, model, max_batch: int, vocab_limit: int | None):
        self.model, self.vocab_limit, self.block_size = model, vocab_limit, model.config.block_size
        weight = model.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype  # activations
        # The cache, and so attention, in fp32 on a CPU, where torch's bf16 attention made bf16 weights
        # decode no faster than fp32 (devices.fp32_kv_cache; measured in docs/benchmarks.md).
        cache_dtype = torch.float32 if devices.fp32_kv_cache(self.device) else self.dtype
        self.cache = SlotCache(model.config, max_batch, self.device, cache_dtype)
        S, dev = max_batch, self.device
        self.rows: list[Sequence] = []
        self.inputs = torch.zeros(S, dtype=torch.long, device=dev)  # the token each row feeds next
        self.lengths = torch.zeros(S, dtype=torch.long, device=dev)  # tokens in the row's cache
        self.temperature = torch.ones(S, device=dev)
        self.top_k = torch.zeros(S, dtype=torch.long, device=dev)
        self.top_p = torch.ones(S, device=dev)
        self.filtered = torch.zeros(S, dtype=torch.bool, device=dev)
        self.seeds = torch.zeros(S, dtype=torch.long, device=dev)
        self.counters = torch.zeros(S, dtype=torch.long, device=dev)  # tokens drawn so far

    def _set_row(self, r: int, seq: Sequence, length: int) -> None:
        p = seq.params
        self.lengths[r] = length
        self.temperature[r] = p.temperature
        self.top_k[r] = p.top_k or 0
        self.top_p[r] = p.top_p if p.top_p is not None and p.top_p < 1 else 2.0  # 2: never drops a token
        self.filtered[r] = p.filtered
        self.seeds[r] = seq.seed
        self.counters[r] = len(seq.tokens)

    def prefill(self, group: list[Sequence]) -> None:
        """Run the group's shared prompt into the next free slot, copy it to one slot per further
        choice, and draw every choice's first token."""
        prompt = group[0].prompt
        T, r = len(prompt), len(self.rows)
        logits = self._forward_prompt(r, prompt, all_rows=group[0].params.prompt_logprobs)  # (T or 1, V)
        for j, seq in enumerate(group):
            if j:
                self.cache.copy_slot(r, r + j, T)
            self.rows.append(seq)
            self._set_row(r + j, seq, T)
        if group[0].params.prompt_logprobs:
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            values, tops = _top_logprobs(logprobs, torch.tensor(prompt[1:], device=self.device),
                                         group[0].params.logprobs)
            prompt_lp = [None] + list(zip(values, tops))
            for seq in group:
                seq.prompt_logprobs = prompt_lp
        self._draw(r, r + len(group), logits[-1:].expand(len(group), -1))

    def _forward_prompt(self, slot: int, tokens: list[int], all_rows: bool) -> torch.Tensor:
        """Prefill `tokens` (at positions 0..T-1) into `slot`; the fp32 logits of the last
        position (1, V), or of every position (T, V) with all_rows."""
        h = prefill(self.model, self.cache, slot, tokens)  # (T, C)
        return self._logits(h if all_rows else h[-1:])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h).float()[:, : self.vocab_limit]  # a prefix: an index is still the id

    def decode(self) -> None:
        B, L = len(self.rows), self.block_size
        # Each row's cached tokens, known on the host (the prompt and every token drawn but the one
        # it feeds now): the span and the rows at the context limit need no read of the device.
        cached = [min(len(s.prompt) + len(s.tokens) - 1, L) for s in self.rows]
        lengths = self.lengths[:B]  # the same numbers, on the device
        positions = lengths.clamp(max=L - 1)  # a row at the context limit is re-read below instead
        h = decode_one_token(self.model, self.cache, self.inputs[:B], positions, span=min(max(cached), L - 1) + 1)
        logits = self._logits(h)  # (B, V)
        lengths.add_(1).clamp_(max=L)
        for r in (r for r, n in enumerate(cached) if n == L):  # context shift: the newest block_size tokens
            seq = self.rows[r]
            logits[r] = self._forward_prompt(r, (seq.prompt + seq.tokens)[-L:], all_rows=False)[0]
        self._draw(0, B, logits)

    def _draw(self, start: int, end: int, logits: torch.Tensor) -> None:
        """Sample a token for rows start..end-1 from logits (end - start, V), hand each to its
        sequence, and release the rows that finished."""
        rows = slice(start, end)
        seqs = self.rows[start:end]
        any_sampled = any(s.params.temperature > 0 for s in seqs)
        any_filtered = any(s.params.filtered for s in seqs)
        u = uniforms(self.seeds[rows], self.counters[rows]) if any_sampled else None
        tokens = sample_rows(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows],
                             self.filtered[rows], u, any_sampled, any_filtered)
        self.inputs[rows] = tokens
        self.counters[rows] += 1
        want = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=None)
        values = tops = None
        if want is not None:
            values, tops = _top_logprobs(torch.log_softmax(logits, dim=-1), tokens, want)
        done = []
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            p = seq.params
            if token in p.stop_token_ids:
                done.append((start + i, FINISH_STOP))
                continue
            seq.tokens.append(token)
            out = Output(token)
            if p.logprobs is not None:
                out.logprob, out.top_logprobs = values[i], tops[i][: p.logprobs]
            seq.sink(seq, out)
            if len(seq.tokens) >= p.max_tokens:
                done.append((start + i, FINISH_LENGTH))
        for r, reason in reversed(done):
            seq = self.rows[r]
            self.release(r)
            _finish(seq, reason)

    def release(self, r: int) -> None:
        """Free row r: the last running row moves into it, so rows stay 0..B-1."""
        last = len(self.rows) - 1
        if r != last:
            length = int(self.lengths[last])
            self.cache.copy_slot(last, r, length)
            for t in (self.inputs, self.lengths, self.temperature, self.top_k, self.top_p, self.filtered,
                      self.seeds, self.counters):
                t[r] = t[last]
            self.rows[r] = self.rows[last]
        self.rows.pop()


class Engine:
    """Continuous batching over a fixed number of cache slots.

    model: a model.GPT (put in eval mode; not otherwise changed), as it is or laid out for
        decoding by the caller (decode_weights.prepare, or checkpoints.LoadedModel.for_decoding);
        the engine computes in its dtype.
    max_batch: cache slots, i.e. sequences decoded together at most.
    vocab_limit: sample only ids below it (a tokenizer with fewer tokens than a padded vocab).
    context_shift: let a sequence run past block_size by re-reading its last block_size tokens
        at every further step (the positions are absolute, so nothing cached can be kept); without
        it `add` refuses a prompt + max_tokens longer than block_size.

    Thread safety: `add` and `cancel` may be called from any thread; `step` (or `run`) from one.
    """

    def __init__(self, model, max_batch: int = 8, vocab_limit: int | None = None, context_shift: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = model.config
        if vocab_limit is not None and not 1 <= vocab_limit <= cfg.vocab_size:
            raise ValueError(f"vocab_limit must be in [1, {cfg.vocab_size}] or None, got {vocab_limit}")
        self.model = model.eval()
        self.batch = Batch(self.model, max_batch, vocab_limit)
        self.device, self.dtype, self.cache = self.batch.device, self.batch.dtype, self.batch.cache
        self.block_size, self.max_batch = cfg.block_size, max_batch
        self.vocab_limit, self.context_shift = vocab_limit, context_shift
        self._waiting: deque[list[Sequence]] = deque()
        self._cancelled: set[Sequence] = set()
        self._admitting: list[Sequence] = []  # the group being prefilled
        self._cond = threading.Condition()
        self._seed_source = torch.Generator().manual_seed(torch.initial_seed())

    @property
    def rows(self) -> list[Sequence]:  # the running sequences, row by row
        return self.batch.rows

    def add(self, prompt: list[int], params: SamplingParams, sink: Callable[[Sequence, Output], None],
            n: int = 1) -> list[Sequence]:
        """Queue a request of n choices that share `prompt` (1..block_size token ids); each
        choice's events go to sink(sequence, Output) (choice i has .index == i; its seed is
        derived from params.seed and i). The choices are prefilled max_batch at a time (one
        prefill each time, copied to the others). Returns the n Sequences (for `cancel`).
        Raises ValueError for an empty or too long prompt, an id outside the vocabulary, or n < 1.
        """
        params = _check_request(prompt, params, n, self.block_size, self.vocab_limit or self.model.config.vocab_size,
                                self.context_shift)
        if params.seed is None:
            seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=self._seed_source))
        else:
            seed = _signed64(params.seed)
        group = [Sequence(list(prompt), params, derive_seed(seed, i), i, sink) for i in range(n)]
        with self._cond:
            for start in range(0, n, self.max_batch):
                self._waiting.append(group[start : start + self.max_batch])
            self._cond.notify()
        return group

    def cancel(self, sequences: Iterable[Sequence]) -> None:
        """End these sequences at the next step (their slots are freed then); a finished one is ignored."""
        with self._cond:
            self._cancelled.update(sequences)
            self._cond.notify()

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        """Requests (not choices) queued and not yet prefilled."""
        return len(self._waiting)

    @torch.inference_mode()
    def step(self) -> bool:
        """Cancel, admit, decode once (see the module docstring). Returns whether any sequence
        is still running or waiting.

        If anything in the step raises, every sequence the step held (the running ones and the
        request being admitted) ends with FINISH_ERROR, its slot freed, and the exception is
        re-raised; the requests still waiting are untouched and the next step goes on with them.
        """
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                self._waiting = deque(g for g in self._waiting if not all(s in cancelled for s in g))
        try:
            self._cancel(cancelled)
            self._admit()
            if self.rows:
                self._decode()
        except Exception:
            self._fail_step()
            raise
        finally:
            self._admitting = []
        return bool(self.rows or self._waiting)

    def run(self, stop: threading.Event, idle_wait_s: float = 0.05,
            on_error: Callable[[Exception], None] | None = None) -> None:
        """Step until `stop` is set, sleeping while there is no work (woken by add/cancel). A step
        that raises has failed its own sequences (see `step`); the exception then goes to
        on_error(exception) and the loop goes on, or, with no on_error, ends the loop."""
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception as err:
                if on_error is None:
                    raise
                on_error(err)
                continue
            if not busy:
                with self._cond:
                    self._cond.wait_for(lambda: self._waiting or self._cancelled or stop.is_set(), idle_wait_s)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], n: int = 1
                 ) -> list[list[int]]:
        """Generate for every prompt (n choices each) on this thread; returns the tokens of each
        choice, prompt by prompt, choice by choice (stop tokens not included)."""
        return generate(self, prompts, params, n)

    def stream(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], n: int = 1
               ) -> Iterator[tuple[tuple[int, int], Sequence, Output]]:
        """Generate on this thread, yielding ((prompt index, choice), sequence, Output) as they
        come. Closing the iterator early cancels what is unfinished."""
        return stream(self, prompts, params, n)

    # ------------------------------------------------------------------ internals

    def _cancel(self, cancelled: set[Sequence]) -> None:
        for seq in cancelled:
            if seq.finished:
                continue
            if seq in self.rows:
                self.batch.release(self.rows.index(seq))
            _finish(seq, FINISH_CANCELLED)

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting or len(self._waiting[0]) > self.max_batch - len(self.rows):
                    return
                group = self._waiting.popleft()
            group = [s for s in group if not s.finished]
            if group:
                self._admitting = group  # for _fail_step: some may not be in self.rows yet
                self.batch.prefill(group)
                self._admitting = []

    def _decode(self) -> None:
        self.batch.decode()

    def _fail_step(self) -> None:
        """End every sequence of a step that raised with FINISH_ERROR and free every slot."""
        failed = self.rows + [s for s in self._admitting if s not in self.rows]
        self.batch.rows[:], self._admitting = [], []
        for seq in failed:
            if not seq.finished:
                _finish(seq, FINISH_ERROR)


def _finish(seq: Sequence, reason: str) -> None:
    seq.finish_reason = reason
    seq.sink(seq, Output(None, finish_reason=reason))


def generate(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], n: int = 1
             ) -> list[list[int]]:
    """Engine.generate."""
    results: dict[tuple[int, int], list[int]] = {}
    for i, _, out in stream(engine, prompts, params, n):
        if out.token is not None:
            results.setdefault(i, []).append(out.token)
    return [results.get((p, c), []) for p in range(len(prompts)) for c in range(n)]


def stream(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], n: int = 1
           ) -> Iterator[tuple[tuple[int, int], Sequence, Output]]:
    """Engine.stream."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    events: deque[tuple[Sequence, Output]] = deque()
    groups = [engine.add(prompt, prm, lambda seq, out: events.append((seq, out)), n)
              for prompt, prm in zip(prompts, params_list, strict=True)]
    where = {id(s): (p, s.index) for p, g in enumerate(groups) for s in g}
    pending = len(where)
    try:
        while pending:
            more = engine.step()
            while events:
                seq, out = events.popleft()
                pending -= out.finish_reason is not None
                yield where[id(seq)], seq, out
            if pending and not more:
                raise RuntimeError("the engine went idle with sequences unfinished")  # internal invariant
    finally:
        if pending:
            engine.cancel([s for g in groups for s in g if not s.finished])
            engine.step()
