"""OpenAI's completions protocol: the request checked and tokenized, each choice's text as it is
generated (stop strings, held-back partial stops), and the response shapes (whole JSON, server-sent
event chunks, echo, logprobs, usage, OpenAI's error body). Pure objects over token ids and a
tokenizer: no socket, no engine, no event loop; serve.py runs them.

A body's fields: prompt (a string, a list of strings, token ids, or a list of token-id lists),
max_tokens (default 16), temperature, top_p, top_k (an extension), n, stop (up to 4 strings),
seed, stream (server-sent events ending `data: [DONE]`), stream_options.include_usage, logprobs
(0-5 alternatives per token), echo, model (the served one); user is ignored.

    req = parse_completion({"prompt": "ROMEO:", "max_tokens": 8}, enc, block_size=1024, vocab_size=50257)
    answer = Completion(req, enc, "small")  # one Choice per prompt x n
    answer.choices[0].add(output)  # an engine.Output; True when a stop string ends the choice
    answer.body(usage)  # the non-streamed response; answer.piece(...) / answer.chunk(...) for a stream
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from engine import FINISH_LENGTH, Output
from sampling import SamplingError, SamplingParams
from tokenizer import EOT_TOKEN, TextStream

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_LOGPROBS = 5  # alternatives per token (OpenAI's limit)
MAX_N = 128
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
FINISH_SHUTDOWN = "shutdown"  # the finish_reason of a choice the server ended because it is stopping


# ------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------- requests


@dataclass
class CompletionRequest:
    """A checked /v1/completions body: prompts as token ids, and the sampling settings."""

    prompts: list[list[int]]
    shown: list[bool]  # per prompt: False for "", which starts from <|endoftext|> and echoes as ""
    params: SamplingParams
    n: int
    stop: list[str]
    stream: bool
    echo: bool
    include_usage: bool


def read_json(raw: bytes):
    """A request body parsed as JSON. Raises APIError (400) for anything unparsable."""
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise APIError(400, f"the request body is not valid JSON ({err})") from None
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (nested too deeply)") from None


def check_model(body, served: str) -> None:
    """The body's 'model', where it names one, must be the `served` one. Raises APIError (400 for
    a non-string, 404 model_not_found for another model)."""
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {json.dumps(model)[:80]}", "model")
    if model is not None and model != served:
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{served}')",
                       "model", "model_not_found")


def _check_type(body: dict, name: str, kinds: tuple, what: str, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise APIError(400, f"'{name}' must be {what}, got {value!r}", name)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def parse_completion(body, enc, block_size: int, vocab_size: int) -> CompletionRequest:
    """Check a /v1/completions body and tokenize its prompts. vocab_size: the ids a prompt may
    hold (the tokenizer's, where the model's vocabulary is padded past it). Raises APIError (400)
    naming the field, its value and the rule."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, neutral in (("frequency_penalty", 0), ("presence_penalty", 0), ("logit_bias", None),
                          ("suffix", None), ("best_of", None)):
        value = body.get(name)
        if value is not None and value != neutral and not (name == "best_of" and value == body.get("n", 1)):
            raise APIError(400, f"'{name}' is not supported by this server (got {json.dumps(value)[:80]})", name)
    prompts, shown = _prompts(body.get("prompt"), enc, vocab_size)
    max_tokens = _check_type(body, "max_tokens", (int,), "an integer >= 1", DEFAULT_MAX_TOKENS)
    for ids in prompts:
        if len(ids) + max_tokens > block_size:
            raise APIError(400, f"This model's maximum context length is {block_size} tokens, however you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in your prompt; {max_tokens} for the "
                                f"completion). Please reduce your prompt; or completion length.",
                           "max_tokens", "context_length_exceeded")
    temperature = _check_type(body, "temperature", (int, float), "a number in [0, 2]", 1.0)
    if not 0 <= temperature <= 2:  # OpenAI's range, narrower than the engine's
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = _check_type(body, "top_p", (int, float), "a number in (0, 1]", 1.0)
    top_k = _check_type(body, "top_k", (int,), "an integer (-1 or 0: off; at or past the vocabulary: all)", 0)
    if top_k < -1:
        raise APIError(400, f"'top_k' must be >= 1, or -1 or 0 for off, got {top_k}", "top_k")
    n = _check_type(body, "n", (int,), f"an integer in [1, {MAX_N}]", 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be in [1, {MAX_N}], got {n}", "n")
    seed = _check_type(body, "seed", (int,), "an integer in [-2**63, 2**64)", None)
    logprobs = _check_type(body, "logprobs", (int,), f"an integer in [0, {MAX_LOGPROBS}]", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", "logprobs")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them, "
                            f"got {json.dumps(body.get('stop'))[:80]}", "stop")
    stream = _check_type(body, "stream", (bool,), "a boolean", False)
    echo = _check_type(body, "echo", (bool,), "a boolean", False)
    options = _check_type(body, "stream_options", (dict,), "an object", {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, f"'stream_options.include_usage' must be a boolean, got {json.dumps(include_usage)[:80]}",
                       "stream_options")
    try:  # the engine's ranges are checked once, in SamplingParams (top_p before any float(): 1e400 is an int)
        params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature),
                                top_k=top_k if top_k > 0 else None, top_p=top_p if top_p != 1 else None,
                                seed=seed, stop_token_ids=(EOT_TOKEN,) if vocab_size > EOT_TOKEN else (),
                                logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
    except SamplingError as err:
        raise APIError(400, f"'{err.setting}' {err.rule}", err.setting) from None
    return CompletionRequest(prompts, shown, params, n, stop, stream, echo, include_usage)


def _prompts(prompt, enc, vocab_size: int) -> tuple[list[list[int]], list[bool]]:
    """`prompt` as token-id lists (ids in [0, vocab_size)): a string, a list of strings, a list of
    ids, or a list of id lists; and per prompt whether its tokens are its text. An empty string
    starts from <|endoftext|>, as sample.py does, which is not its text."""
    rule = "a string, a list of strings, a list of token ids, or a list of token-id lists"
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, f"'prompt' must be {rule}, got {json.dumps(prompt)[:80]}", "prompt")
    out, shown = [], []
    for item in prompt:
        shown.append(item != "")
        if isinstance(item, str):
            out.append(enc.encode_ordinary(item) or [EOT_TOKEN])
        elif (isinstance(item, list) and item
              and all(isinstance(t, int) and not isinstance(t, bool) for t in item)):
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"'prompt' holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})", "prompt")
            out.append(list(item))
        else:
            raise APIError(400, f"'prompt' must be {rule}, got an item {json.dumps(item)[:80]}", "prompt")
    return out, shown


# ----------------------------------------------------------------------- choices


@dataclass
class Choice:
    """One choice's text as it is generated: detokenized incrementally, cut at a stop string,
    with the part that could still become a stop string held back from a stream."""

    index: int
    stream: TextStream
    stops: list[str]
    text: str = ""  # generated text so far (cut at a stop string once one appears)
    sent: int = 0  # characters of `text` already streamed
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prefix: str = ""  # the echoed prompt, sent before the first piece

    def add(self, out: Output) -> bool:
        """Take one token; returns True when a stop string now ends the choice."""
        self.offsets.append(len(self.text))
        self.tokens.append(out.token)
        self.token_logprobs.append(out.logprob)
        self.top_logprobs.append(out.top_logprobs)
        before = len(self.text)
        self.text += self.stream.feed([out.token])
        if self.stops:
            longest = max(map(len, self.stops))
            start = max(0, before - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"
                return True
        return False

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.text += self.stream.finish()
            self.finish_reason = "stop" if reason != FINISH_LENGTH else "length"

    def ready(self) -> str:
        """New text safe to send: all of it once finished, else all but a possible stop-string start."""
        end = len(self.text)
        if self.finish_reason is None:
            for k in range(min(end - self.sent, max(map(len, self.stops), default=1) - 1), 0, -1):
                if any(s.startswith(self.text[end - k:]) for s in self.stops):
                    end -= k
                    break
        piece, self.sent = self.text[self.sent: end], max(self.sent, end)
        return piece




# ---------------------------------------------------------------------- responses


def token_text(enc, token: int) -> str:
    """One token's text as OpenAI's logprobs show it (bytes that are not UTF-8 on their own replaced)."""
    return enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Completion:
    """One request's answer: its choices (choice p * n + i is prompt p's i-th) and the JSON it is
    sent as. `prompt_logprobs` (for echo) and `completion_tokens` (for usage) come from whoever ran
    the sequences, as the engine's counts (a choice cut at a stop string may have drawn more)."""

    def __init__(self, req: CompletionRequest, enc, model_name: str):
        self.req, self.enc, self.model_name = req, enc, model_name
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        n = req.n
        self.choices = [Choice(p * n + i, TextStream(enc), req.stop) for p in range(len(req.prompts)) for i in range(n)]
        self._sent_tokens = [0] * len(self.choices)  # per choice: tokens already streamed

    def usage(self, completion_tokens: int) -> dict:
        return usage(sum(len(p) for p in self.req.prompts), completion_tokens)

    def echo(self, choice: Choice, prompt_logprobs) -> tuple[str, dict | None]:
        """The prompt's text and logprobs for an echoed choice; prompt_logprobs: the engine's
        Sequence.prompt_logprobs of that choice (None where it gave none)."""
        p = choice.index // self.req.n
        prompt = self.req.prompts[p]
        if not self.req.shown[p]:  # "": the <|endoftext|> it starts from is not its text
            return "", None if self.req.params.logprobs is None else {
                "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        text = self.enc.decode(prompt)
        lp = None
        if self.req.params.logprobs is not None:
            offsets, at = [], 0
            for t in prompt:
                offsets.append(at)
                at += len(token_text(self.enc, t))
            entries = prompt_logprobs or [None] * len(prompt)
            lp = {"tokens": [token_text(self.enc, t) for t in prompt],
                  "token_logprobs": [e[0] if e else None for e in entries],
                  "top_logprobs": [self._top(e[1]) if e else None for e in entries],
                  "text_offset": offsets}
        return text, lp

    def _top(self, pairs) -> dict:
        out = {}
        for token, value in pairs:
            out.setdefault(token_text(self.enc, token), value)
        return out

    def logprobs(self, choice: Choice, first: int, last: int, base: int) -> dict | None:
        """OpenAI's logprobs object for the choice's tokens first..last-1, text offsets from `base`
        (None unless the request asked for logprobs). Tokens past a stop string are left out."""
        if self.req.params.logprobs is None:
            return None
        keep = [i for i in range(first, last) if choice.offsets[i] < len(choice.text) or i == first == last - 1]
        return {"tokens": [token_text(self.enc, choice.tokens[i]) for i in keep],
                "token_logprobs": [choice.token_logprobs[i] for i in keep],
                "top_logprobs": [self._top(choice.top_logprobs[i]) for i in keep],
                "text_offset": [base + choice.offsets[i] for i in keep]}

    def body(self, prompt_logprobs: list, completion_tokens: int) -> dict:
        """The whole (non-streamed) response; prompt_logprobs: per choice, as for `echo`."""
        choices = []
        for choice in self.choices:
            text, lp, base = "", None, 0
            if self.req.echo:
                text, lp = self.echo(choice, prompt_logprobs[choice.index])
                base = len(text)
            gen_lp = self.logprobs(choice, 0, len(choice.tokens), base)
            if lp is not None and gen_lp is not None:
                lp = {k: lp[k] + gen_lp[k] for k in lp}
            choices.append({"text": text + choice.text, "index": choice.index, "logprobs": lp or gen_lp,
                            "finish_reason": choice.finish_reason})
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model_name, "choices": choices, "usage": self.usage(completion_tokens)}

    def chunk(self, choices: list[dict], usage: dict | None = None, **extra) -> str:
        """One server-sent event: `data: {...}` and a blank line."""
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        body.update(extra)
        return f"data: {json.dumps(body)}\n\n"

    def echo_chunks(self, prompt_logprobs: list) -> list[str]:
        """The first events of an echoed stream: each choice's prompt."""
        chunks = []
        for choice in self.choices:
            text, lp = self.echo(choice, prompt_logprobs[choice.index])
            choice.prefix = text
            chunks.append(self.chunk([{"text": text, "index": choice.index, "logprobs": lp, "finish_reason": None}]))
        return chunks

    def piece(self, choice: Choice, finished: bool) -> str | None:
        """The chunk carrying what `choice` has that is not sent yet (None: nothing to send)."""
        piece = choice.ready()
        if not piece and not finished:
            return None
        first, self._sent_tokens[choice.index] = self._sent_tokens[choice.index], len(choice.tokens)
        lp = self.logprobs(choice, first, len(choice.tokens), len(choice.prefix))
        return self.chunk([{"text": piece, "index": choice.index, "logprobs": lp,
                            "finish_reason": choice.finish_reason if finished else None}])

    def cut_chunk(self, reason: str, error: APIError) -> str:
        """The last event of a stream the server ends: finish_reason `reason` for every open choice,
        with OpenAI's error object."""
        cut = [{"text": "", "index": c.index, "logprobs": None, "finish_reason": reason}
               for c in self.choices if c.finish_reason is None]
        return self.chunk(cut, **error.body())


DONE = "data: [DONE]\n\n"  # a stream's last event


def error_event(error: APIError) -> str:
    """OpenAI's error shape as a server-sent event."""
    return f"data: {json.dumps(error.body())}\n\n"
