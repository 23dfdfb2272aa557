"""Sampling settings and the per-row draw: one token per row of logits, each row with its own
temperature (0 = greedy), top_k, top_p and seed. A row's random number for its i-th token is a
hash of (its seed, i) (splitmix64, computed for all rows at once), and the token is found by
inverse-CDF over its probabilities, so a seeded request gives the same tokens whatever else is in
the batch. Rows with top-k/top-p sample in sorted order, rows without in vocabulary order: which
one depends only on the row's own settings. engine.py schedules; this module only draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import devices


MAX_LOGPROBS = 20  # alternatives per token a request may ask for


class SamplingError(ValueError):
    """A sampling setting outside its range. `setting` is its SamplingParams field name; the
    message starts with it ("top_p must be in (0, 1] ...")."""

    def __init__(self, setting: str, rule: str):
        super().__init__(f"{setting} {rule}")
        self.setting, self.rule = setting, rule


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated.

    max_tokens: tokens to generate at most (>= 1).
    temperature: 0 picks the most likely token (greedy); else logits / temperature.
    top_k: sample among the k most likely tokens (None, or k at or past the vocabulary: all).
    top_p: sample among the most likely tokens holding top_p of the probability (None or 1: all);
        applied after top_k.
    seed: the same seed gives the same tokens (None: a random one). A 64-bit integer, signed or
        unsigned: in [-2**63, 2**64), a negative seed being the same as seed + 2**64.
    stop_token_ids: tokens that end the sequence; the stop token is not part of the output.
    logprobs: None, or N >= 0: with every token, its log-probability under the model (before
        temperature and filtering) and the N most likely alternatives.
    prompt_logprobs: also give the prompt's tokens' log-probabilities (and N alternatives).
    Raises SamplingError (a ValueError) naming a setting outside its range; these checks are the
    only ones: sample.py and serve.py pass on what they raise.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise SamplingError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise SamplingError("top_k", f"must be an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise SamplingError("seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs and self.logprobs is None:
            raise SamplingError("prompt_logprobs", "needs logprobs (how many alternatives per token)")

    @property
    def filtered(self) -> bool:
        """Whether this row samples in sorted order (top-k or top-p on)."""
        return self.temperature > 0 and (self.top_k is not None or (self.top_p is not None and self.top_p < 1))




_U64 = 1 << 64


def _signed64(x: int) -> int:
    x %= _U64
    return x - _U64 if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One number in [0, 1) per row from (seed, counter), both int64 (B,): splitmix64's output
    for state seed + (counter + 1) * golden ratio (Steele et al. 2014). Pure integer arithmetic
    (wrapping int64 multiplies), so a row's number depends on nothing but its own two values."""
    z = seeds + (counters + 1) * _GOLDEN
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 11).to(torch.float64) * 2.0**-53


def derive_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded with `seed` (a signed 64-bit int)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) % _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _U64
    return _signed64(z ^ (z >> 31))


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds u (B,) times the total;
    zero-probability entries are never chosen. probs (B, V) -> (B,) int64."""
    cdf = probs.cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)


ARGMAX_CHUNK = 256  # argmax_rows' chunk: 128-1,024 timed alike (docs/benchmarks.md, "Decoding and serving")


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Per row of logits (B, V) the index of the largest value, the first of equal ones (NaN
    counting as largest), exactly as logits.argmax(-1). torch's CPU argmax does not vectorise, where
    its max (amax) does (the timings: docs/internals.md, "Decoding weights"). So: each chunk's max,
    the first chunk holding the row's max, the argmax within that chunk, and the columns past the
    last whole chunk compared on their own. Off the CPU, torch's argmax itself."""
    B, V = logits.shape
    n = V // ARGMAX_CHUNK
    if n < 2 or not devices.chunked_argmax(logits.device):
        return logits.argmax(dim=-1)
    chunked = logits[:, : n * ARGMAX_CHUNK].reshape(B, n, ARGMAX_CHUNK)  # (B, n, chunk)
    chunk_max = chunked.amax(dim=-1)  # (B, n)
    best = chunk_max.argmax(dim=-1)  # (B,) the first chunk holding the max
    rows = torch.arange(B, device=logits.device)
    index = best * ARGMAX_CHUNK + chunked[rows, best].argmax(dim=-1)
    if n * ARGMAX_CHUNK < V:
        tail = logits[:, n * ARGMAX_CHUNK:]  # (B, V mod chunk)
        tail_index = tail.argmax(dim=-1)
        tail_max, head_max = tail[rows, tail_index], chunk_max[rows, best]
        later_wins = (tail_max > head_max) | (tail_max.isnan() & ~head_max.isnan())
        index = torch.where(later_wins, n * ARGMAX_CHUNK + tail_index, index)
    return index


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                filtered: torch.Tensor, u: torch.Tensor, any_sampled: bool = True,
                any_filtered: bool = True) -> torch.Tensor:
    """One token per row of logits (B, V), each row with its own settings.

    temperature (B,): 0 = greedy (argmax). top_k (B,) int64, 0 = off. top_p (B,), > 1 = off.
    filtered (B,) bool: the row samples in sorted order with top-k then top-p applied (a token is
    dropped when the tokens ranked above it already hold top_p of the mass; the most likely
    always stays); other rows sample in vocabulary order. u (B,) float64 in [0, 1): the row's
    random number. any_sampled / any_filtered: whether some row samples / is filtered (False
    skips that work). Returns (B,) int64.
    """
    greedy = argmax_rows(logits)
    if not any_sampled:
        return greedy
    scaled = logits / temperature.clamp(min=1e-6).unsqueeze(1).to(logits.dtype)  # (B, V)
    tokens = _inverse_cdf(torch.softmax(scaled, dim=-1), u)
    if any_filtered:
        rows = filtered.nonzero().squeeze(1)
        sorted_logits, order = torch.sort(scaled[rows], dim=-1, descending=True)  # (R, V)
        rank = torch.arange(sorted_logits.size(-1), device=logits.device)
        k = top_k[rows]
        sorted_logits.masked_fill_((k > 0).unsqueeze(1) & (rank >= k.unsqueeze(1)), float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p[rows].unsqueeze(1).to(probs.dtype)
        drop[:, 0] = False  # the most likely token stays, even where rounding leaves its prefix sum above 0
        probs = probs.masked_fill(drop, 0.0)
        picked = order.gather(1, _inverse_cdf(probs, u[rows]).unsqueeze(1)).squeeze(1)
        tokens = tokens.index_put((rows,), picked)
    return torch.where(temperature == 0, greedy, tokens)


def _top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, n: int):
    """Per row of log-probabilities (R, V): the chosen token's value and the n best (token, value)."""
    values = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    if n == 0:
        return values, [[] for _ in values]
    top = torch.topk(logprobs, n, dim=-1)
    return values, [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
