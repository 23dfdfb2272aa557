"""An OpenAI-compatible HTTP server over the decoding engine.

    python serve.py --checkpoint out/small --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "small", "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0.8}'

--checkpoint takes what sample.py takes (a run's out_dir, a checkpoint, a GPT-2 directory) and
is loaded by the same helper. Endpoints:

  POST /v1/completions   OpenAI's completions API (the fields it takes: completions.py)
  GET  /v1/models        the one model served (named after the checkpoint, or --model_name)
  GET  /health           {"status": "ok", "running": ..., "waiting": ...}; 503 once the engine thread
                         has stopped (a request the engine fails on is a 500; the engine goes on)
  GET  /                 a playground (playground.html): a prompt, the sampling settings, the
                         completion streamed as it is generated; the page itself needs no API key
                         (it holds none), its requests send the one typed into it

Every request is tokenized here and runs on one engine.Engine in a background thread, so
requests decode together (continuous batching, --max_batch slots). At most --max_queue further
sequences wait for a slot; past that a request gets 429. Errors have OpenAI's JSON shape
({"error": {"message", "type", "param", "code"}}): 400 for a body that is not JSON, a bad field or
a prompt + max_tokens past the context, 401 for a missing or wrong API key (--api_key or
$SERVE_API_KEY), 404 for an unknown model or route, 405 for a wrong method, 413 for a body past
--max_request_bytes (refused before it is read), 415 for a body not sent as application/json,
429 for a full queue. A client that disconnects has its sequences cancelled at the next decode
step. SIGTERM (or Ctrl-C) stops accepting connections and lets running requests finish for up to
--shutdown_timeout seconds; then each open stream gets a final chunk (finish_reason 'shutdown' and
an error object) and `data: [DONE]`, other requests a 503, and the server exits 0. One line per
request goes to stderr: tokens in and out, time to first token, tokens/s, finish reasons. FastAPI's
/docs, /redoc and /openapi.json are off unless --api_docs (and need the API key where there is one).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import hmac
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import torch

import checkpoints
from completions import (DONE, FINISH_SHUTDOWN, APIError, Choice, Completion, CompletionRequest, check_model, error_event,
                         parse_completion, read_json)
from engine import FINISH_CANCELLED, FINISH_ERROR, Engine, Output
from errors import ServeError, exit_status
from tokenizer import gpt2_tokenizer

try:  # the optional `serve` extra; run() says how to install it when it is missing
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:
    _MISSING_EXTRA: ImportError | None = err
else:
    _MISSING_EXTRA = None

API_KEY_ENV = "SERVE_API_KEY"
# A legal request is at most --max_batch + --max_queue prompts (40 by default) of at most block_size
# tokens (1,024 for GPT-2): as token ids ~7 bytes of JSON each (~7 KB a prompt), as text rarely
# more than ~8 bytes a token even with escapes. 4 MiB holds that ten times over and is read and
# parsed in well under a second.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
PLAYGROUND = Path(__file__).resolve().with_name("playground.html")  # GET /


# ------------------------------------------------------------------------- server


class Server:
    """The model, its engine (stepped by a background thread), the tokenizer and the queue bound.
    `model` comes laid out for decoding (checkpoints.LoadedModel.for_decoding); `weights` says how,
    for the start line (None: as the model holds them).

    A step that raises fails only its own requests (a 500) and the engine goes on. If the engine
    thread ends anyway, every open request fails, new ones and /health get 503, and
    on_engine_death() is called (serve.run: shut down and exit non-zero, for a supervisor to restart).
    """

    def __init__(self, model, model_name: str, enc, max_batch: int, max_queue: int, weights: str | None,
                 api_key: str | None, log=None, on_engine_death=None):
        self.model_name, self.enc, self.api_key = model_name, enc, api_key
        self.config = model.config
        self.weights = weights or f"{str(model.transformer.wte.weight.dtype).removeprefix('torch.')} (the model's)"
        self.engine = Engine(model, max_batch=max_batch,
                             vocab_limit=enc.n_vocab if model.config.vocab_size > enc.n_vocab else None)
        self.capacity = max_batch + max_queue  # sequences running or waiting
        self.outstanding = 0  # sequences admitted and not finished (event-loop thread only)
        self.runs: set[_Generation] = set()  # requests admitted and not answered (event-loop thread only)
        self.engine_error: BaseException | None = None  # what ended the engine thread
        self.on_engine_death = on_engine_death
        self.created = int(time.time())
        self.playground = PLAYGROUND.read_text(encoding="utf-8")
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        # Engine events wait here for the event loop, which takes them all in one callback: one
        # wake-up per step, not one per token (deque appends and pops are thread-safe).
        self._handoff: deque = deque()
        self._drain_scheduled = False

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self.engine.run(self._stop, on_error=self._step_failed)
        except BaseException as err:
            self.engine_error = err
            self.log("engine: the engine thread stopped; failing every open request:\n"
                     + "".join(traceback.format_exception(err)).rstrip())
            for generation in list(self.runs):
                generation.loop.call_soon_threadsafe(generation.engine_stopped)
            if self.on_engine_death is not None:
                self.on_engine_death()

    def _step_failed(self, err: Exception) -> None:
        """On the engine's thread: a step raised; its requests have been failed (500s)."""
        self.log("engine: a decode step raised; its requests get a 500, the engine goes on:\n"
                 + "".join(traceback.format_exception(err)).rstrip())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def post(self, loop, deliver, *event) -> None:
        """On the engine's thread: have `deliver(*event)` called on the event loop, soon."""
        self._handoff.append((deliver, event))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False  # first: an event posted from now on schedules another drain
        while self._handoff:
            deliver, event = self._handoff.popleft()
            deliver(*event)

    def completion(self, body) -> CompletionRequest:
        """Check one /v1/completions body against the model and tokenize it; runs off the event loop
        (a large prompt takes a while). Raises APIError."""
        if self.engine_error is not None:
            raise APIError(503, "the server's engine has stopped (see its log); the server is shutting down")
        check_model(body, self.model_name)
        req = parse_completion(body, self.enc, self.config.block_size, min(self.config.vocab_size, self.enc.n_vocab))
        count = len(req.prompts) * req.n
        if count > self.capacity:
            raise APIError(400, f"this request asks for {count} sequences ({len(req.prompts)} prompts x n={req.n}); "
                                f"the server holds at most {self.capacity} (--max_batch + --max_queue)", "n")
        return req

    def admit(self, generation, count: int) -> None:
        """Hold `count` places in the queue bound for `generation` and tell it if the engine thread
        stops, until `release` gives the places back and `forget` lets it go (event-loop thread only).
        Raises APIError (429) when the bound is full."""
        if self.outstanding + count > self.capacity:
            raise APIError(429, f"the server is busy: {self.outstanding} sequences running or queued, {count} more "
                                f"would pass its bound of {self.capacity} (--max_batch + --max_queue); retry later")
        self.outstanding += count
        self.runs.add(generation)

    def release(self, count: int) -> None:
        """Give back `count` places in the bound (a sequence ended, or was never queued)."""
        self.outstanding -= count

    def forget(self, generation) -> None:
        """`generation` no longer needs telling that the engine thread stopped."""
        self.runs.discard(generation)


def build_app(server: Server, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, api_docs: bool = False):
    """The FastAPI application for `server`. A body past `max_request_bytes` gets 413 without being
    read whole; `api_docs` serves /docs, /redoc and /openapi.json. `app.state.end_requests(why)`
    ends every open request now (streams with a final chunk and `data: [DONE]`, the others with a
    503); run() calls it when --shutdown_timeout has passed after SIGTERM."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        server.stop()

    docs = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
    app = FastAPI(title="gpt2-accelerate", lifespan=lifespan, **(docs if api_docs else dict.fromkeys(docs)))

    # Pure ASGI middleware; the last added runs first: the key is checked before a body is read.
    app.add_middleware(_LimitBody, limit=max_request_bytes)
    if server.api_key is not None:
        app.add_middleware(_RequireKey, key=server.api_key, open_paths=frozenset({"/"}))  # the docs need it too

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        """Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's shape."""
        message = {404: f"there is no route {request.url.path}",
                   405: f"{request.url.path} does not accept {request.method}"}.get(err.status_code, str(err.detail))
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code, headers=err.headers)

    block_size = server.config.block_size  # max_tokens leaves room for the prompt
    page = server.playground.replace("{{block_size}}", str(block_size)).replace("{{max_tokens}}", str(min(64, max(1, block_size // 2))))
    playground_headers = {"X-Frame-Options": "DENY", "Content-Security-Policy": _playground_policy(page)}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page, headers=playground_headers)

    @app.get("/health")
    async def health():
        if server.engine_error is not None:
            return JSONResponse({"status": "engine stopped", "error": repr(server.engine_error)}, status_code=503)
        running = server.engine.num_running
        return {"status": "ok", "running": running, "waiting": max(server.outstanding - running, 0)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "gpt2-accelerate", "max_model_len": block_size}]}

    stopping = _Stopping(server)
    app.state.end_requests = stopping.end

    @app.post("/v1/completions")
    async def completions(request: Request):
        start = time.perf_counter()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, f"the body must be JSON sent with 'Content-Type: application/json', got "
                                f"{media_type or 'no Content-Type'!r}")
        req = await asyncio.to_thread(_parse_body, server, await request.body())
        generation = _Generation(server, req, start, request)
        if req.stream:
            return StreamingResponse(stopping.stream(generation), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(generation.abandon))  # run however the response ended
        return JSONResponse(await stopping.whole(generation))

    return app


def _parse_body(server: Server, raw: bytes) -> CompletionRequest:
    """A /v1/completions body as a checked request; run on a worker thread, as parsing and
    tokenizing a large body takes a while. Raises APIError (400 for anything unparsable)."""
    with _collector_paused():
        body = read_json(raw)
        try:
            return server.completion(body)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None


class _Stopping:
    """Ends the open requests when the server stops: `end(why)` (run() calls it once
    --shutdown_timeout has passed after SIGTERM) gives each open stream a final chunk with
    finish_reason 'shutdown' and an error object, then `data: [DONE]`, and each other request a
    503, where uvicorn would cut them mid-body. Event-loop thread only."""

    def __init__(self, server: Server):
        self.server, self.event, self.open = server, asyncio.Event(), 0

    def end(self, why: str) -> None:
        self.event.set()
        if self.open:
            self.server.log(f"stopping: {why}; ending {self.open} open request(s) (streams get a final chunk with "
                            f"finish_reason '{FINISH_SHUTDOWN}' and [DONE], the others 503)")

    @staticmethod
    def error() -> APIError:
        return APIError(503, "the server is shutting down (--shutdown_timeout passed); retry later",
                        None, "server_shutdown")

    @contextlib.asynccontextmanager
    async def _watch(self):
        """A task that finishes when `end` is called, for the duration of one request."""
        self.open += 1
        ended = asyncio.ensure_future(self.event.wait())
        try:
            yield ended
        finally:
            self.open -= 1
            ended.cancel()

    async def whole(self, generation: _Generation) -> dict:
        """generation.whole(), or a 503 when the server stops first."""
        answer = asyncio.ensure_future(generation.whole())
        try:
            async with self._watch() as ended:
                await asyncio.wait({answer, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                generation.ended_by = "503 (server shutting down)"  # what generation.whole() logs
                answer.cancel()  # generation.whole() cancels the sequences and logs the request
                await asyncio.wait({answer})
                raise self.error()
            return answer.result()
        finally:
            answer.cancel()  # a no-op once it is done

    async def stream(self, generation: _Generation):
        """generation.sse()'s chunks; when the server stops first, a final chunk for the open choices and [DONE]."""
        chunks, step = generation.sse(), None
        try:
            async with self._watch() as ended:
                while True:
                    step = asyncio.ensure_future(anext(chunks))
                    await asyncio.wait({step, ended}, return_when=asyncio.FIRST_COMPLETED)
                    if not step.done():
                        break
                    try:
                        chunk = step.result()
                    except StopAsyncIteration:
                        return
                    yield chunk
            step.cancel()  # generation.sse() cancels the sequences and logs the request
            await asyncio.wait({step})
            yield generation.answer.cut_chunk(FINISH_SHUTDOWN, self.error())
            yield DONE
        finally:
            if step is not None:
                step.cancel()
            if not chunks.ag_running:  # else the cancelled step finishes it
                await chunks.aclose()


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for a while. A parsed body is containers without
    cycles, yet building one of 800,000 lists (4 MB of JSON) set off full collections that took
    2 of the 2.05 s json.loads ran, holding the GIL: the event loop stalled for seconds. The
    collector is turned back on by whoever turned it off, so overlapping parses never leave it off."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _playground_policy(page: str) -> str:
    """A Content-Security-Policy that lets `page` run its own inline script and style (by their
    SHA-256) and fetch from this server, and nothing else: no other scripts, no framing."""
    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
                        for text in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S))

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
            f"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _RequireKey:
    """ASGI middleware: every HTTP request but GETs of `open_paths` (the playground page) needs
    'Authorization: Bearer <key>' (the scheme in any case, RFC 7235), else a 401 in OpenAI's error
    shape; the key is compared in constant time. Plain ASGI, not Starlette's BaseHTTPMiddleware,
    which would pass every streamed chunk through an extra task and memory stream."""

    def __init__(self, app, key: str, open_paths: frozenset):
        self.app, self.key, self.open_paths = app, key.encode("latin-1"), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not (scope["method"] == "GET" and scope["path"] in self.open_paths):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = given.strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                what = "no API key was given" if not given else "the API key is wrong"
                error = APIError(401, f"{what}: send 'Authorization: Bearer <key>' (the server's --api_key)",
                                 None, "invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _LimitBody:
    """ASGI middleware: a request body past `limit` bytes gets 413 in OpenAI's error shape without
    being read whole: at once when its Content-Length says so, else (a chunked body) as soon as the
    bytes received pass the limit. A body within it is read here and handed on in one message."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(f"is {int(length)} bytes", scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was complete
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(f"passed {self.limit} bytes", scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the body once, then what the client does next (a disconnect)
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, what: str, scope, receive, send) -> None:
        error = APIError(413, f"the request body {what}, more than this server takes ({self.limit} bytes, "
                              f"--max_request_bytes)", None, "request_too_large")
        await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)


class _Generation:
    """One admitted request: its sequences on the engine and its answer (a completions.Completion),
    delivered whole or as a stream. It holds its places in the queue bound through the server's
    admit/release calls: every sequence's finish event (sent on every way out: length, stop,
    cancel, error) releases one."""

    def __init__(self, server: Server, req: CompletionRequest, start: float, request):
        self.server, self.req, self.start, self.request = server, req, start, request
        self.answer = Completion(req, server.enc, server.model_name)
        self.choices = self.answer.choices
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = loop = asyncio.get_running_loop()
        self.sequences = []
        self.first_token_at: float | None = None
        self.open = len(self.choices)
        self.error: APIError | None = None  # set when the engine failed this request
        self.finished = False
        self.ended_by, self.logged = "cancelled (client gone)", False  # what an unfinished request logs, and whether it has
        n, count = req.n, len(self.choices)
        server.admit(self, count)  # raises APIError (429) past the bound
        try:
            for p, prompt in enumerate(req.prompts):
                sink = (lambda seq, out, p=p: server.post(loop, self._deliver, p * n + seq.index, seq, out))
                self.sequences += server.engine.add(prompt, req.params, sink, n)
        except ValueError as err:  # parse_completion checks all the engine checks: a bug if reached
            server.release(count - len(self.sequences))  # the ones queued release theirs as they end
            self._close()
            raise APIError(500, f"the server could not queue this request: {err}") from err
        if server.engine_error is not None:  # it stopped after completion() checked: it may not have seen this request
            self.engine_stopped()

    def _deliver(self, index: int, seq, out: Output) -> None:
        """On the event loop: queue an engine event; a sequence's end frees its place in the bound
        whether or not anyone still reads the response."""
        if out.finish_reason is not None:
            self.server.release(1)
            if all(s.finished for s in self.sequences):  # also when no response ever read it (a stream never started)
                self.server.forget(self)
        self.queue.put_nowait((index, seq, out))

    def _close(self) -> None:
        if not self.finished:
            self.finished = True
            self.server.forget(self)
            unfinished = [s for s in self.sequences if not s.finished]
            if unfinished:
                self.server.engine.cancel(unfinished)

    def engine_stopped(self) -> None:
        """On the event loop: the engine thread has ended; this request fails (a 500)."""
        self.queue.put_nowait((None, None, Output(None, finish_reason=FINISH_ERROR)))

    async def events(self):
        """(choice, finished) as tokens arrive, until every choice is done."""
        while self.open:
            index, seq, out = await self.queue.get()
            if out is not None and out.finish_reason == FINISH_ERROR:  # the engine failed it
                self.error = APIError(500, "the server failed while generating this completion (its log has the "
                                           "details); retrying may succeed", None, "engine_error")
                self._close()
                return
            if index is None:  # the client went away
                return
            choice = self.choices[index]
            if choice.finish_reason is not None and out.token is not None:
                continue  # a stop string already ended it; the engine is cancelling it
            if out.token is not None:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                if choice.add(out):
                    self.server.engine.cancel([seq])
                    self.open -= 1
                    yield choice, True
                    continue
                yield choice, False
            elif out.finish_reason != FINISH_CANCELLED or choice.finish_reason is None:
                if choice.finish_reason is None:
                    choice.finish(out.finish_reason)
                    self.open -= 1
                    yield choice, True

    def _prompt_logprobs(self) -> list:
        return [seq.prompt_logprobs for seq in self.sequences]

    def _completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    async def _watch(self) -> None:
        """Cancel the request's sequences when its client goes away (non-streamed requests)."""
        while not self.finished:
            if await self.request.is_disconnected():
                self._close()
                self.queue.put_nowait((None, None, None))
                return
            await asyncio.sleep(0.05)

    async def whole(self) -> dict:
        watcher = asyncio.create_task(self._watch())
        try:
            async for _ in self.events():
                pass
        finally:
            watcher.cancel()
            status = "200" if not self.open else "500 (engine error)" if self.error else self.ended_by
            self._close()
            self._log(status)
        if self.error is not None:
            raise self.error
        return self.answer.body(self._prompt_logprobs(), self._completion_tokens())

    async def sse(self):
        status = "200 stream"
        try:
            if self.req.echo:
                for chunk in self.answer.echo_chunks(self._prompt_logprobs()):
                    yield chunk
            # Events that have already arrived go out together, one chunk per choice: when the
            # server falls behind the engine, it sends fewer, longer chunks instead of lagging more.
            touched: dict[int, tuple[Choice, bool]] = {}
            async for choice, finished in self.events():
                touched[choice.index] = (choice, finished or touched.get(choice.index, (None, False))[1])
                if not self.queue.empty() and self.open:
                    continue
                for chunk in filter(None, (self.answer.piece(c, f) for c, f in touched.values())):
                    yield chunk
                touched.clear()
            if self.error is not None:  # OpenAI's error shape as the last event before [DONE]
                status = "500 stream (engine error)"
                yield error_event(self.error)
                yield DONE
                return
            if self.req.include_usage:
                yield self.answer.chunk([], self.answer.usage(self._completion_tokens()))
            yield DONE
        except BaseException:  # the client went away (or the server is stopping): free the slots
            status = "cancelled"
            raise
        finally:
            self._close()
            self._log(status)

    def abandon(self) -> None:
        """The response is over, however it ended: if `sse` never ran (the client went away before
        the first byte, and Starlette cancelled the body before it started), cancel the sequences
        and log the request here."""
        if not self.logged:
            self._close()
            self._log("cancelled (client gone before the first byte)")

    def _log(self, status: str) -> None:
        self.logged = True
        end = time.perf_counter()
        usage = self.answer.usage(self._completion_tokens())
        ttft = f"{1000 * (self.first_token_at - self.start):.0f} ms" if self.first_token_at else "-"
        decode = end - (self.first_token_at or end)
        rate = (usage["completion_tokens"] - len(self.choices)) / decode if decode > 0 else float("nan")
        reasons = ",".join(sorted({c.finish_reason or "cancelled" for c in self.choices}))
        self.server.log(f"POST /v1/completions {status} {self.answer.id}: prompt_tokens={usage['prompt_tokens']} "
                        f"completion_tokens={usage['completion_tokens']} choices={len(self.choices)} ttft={ttft} "
                        f"decode={rate:.1f} tokens/s total={1000 * (end - self.start):.0f} ms finish={reasons}")



# ---------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a GPT-2 checkpoint over OpenAI's completions API.")
    checkpoints.add_model_args(p, dtype_default="float32", decoding=True,
                               dtype_help="float32 (default: the same tokens as transformers' fp32 greedy decode), "
                                          "bfloat16 (rounded weights; faster on CPUs with fast bf16 matmuls: measured in "
                                          "docs/benchmarks.md), or auto (bf16 where it is clearly faster for one "
                                          "stream at this model's shapes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000,
                   help="port to listen on (default: 8000; 0: a free one, printed at start)")
    p.add_argument("--model_name", default=None, help="the model's name in the API (default: the checkpoint's directory name)")
    p.add_argument("--max_batch", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max_queue", type=int, default=32, help="sequences that may wait for a slot; more get 429")
    p.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV}; unset: none)")
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads() - 1),
                   help="CPU threads the model computes with (default: all but one, which the HTTP side gets; "
                        "on 2 cores that measured faster for 1 and 16 streams at small.py's shape, docs/benchmarks.md)")
    p.add_argument("--shutdown_timeout", type=float, default=10.0,
                   help="seconds running requests may take to finish after SIGTERM; then each open stream gets a "
                        "final chunk (finish_reason 'shutdown', an error object) and [DONE], the other requests 503")
    p.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"larger request bodies get 413 unread (default: {DEFAULT_MAX_REQUEST_BYTES} = 4 MiB; the "
                        "largest legal request at the defaults, 40 prompts of 1,024 token ids, is ~0.3 MB of JSON)")
    p.add_argument("--api_docs", action="store_true",
                   help="serve FastAPI's /docs, /redoc and /openapi.json (default: off)")
    args = p.parse_args(argv)
    for ok, rule in ((0 <= args.port <= 65535, f"--port must be in [0, 65535], got {args.port}"),
                     (args.max_batch >= 1, f"--max_batch must be >= 1, got {args.max_batch}"),
                     (args.max_queue >= 0, f"--max_queue must be >= 0, got {args.max_queue}"),
                     (args.threads >= 1, f"--threads must be >= 1, got {args.threads}"),
                     (args.api_key is None or args.api_key, "--api_key is empty"),
                     (args.max_request_bytes >= 1, f"--max_request_bytes must be >= 1, got {args.max_request_bytes}"),
                     (args.shutdown_timeout >= 0, f"--shutdown_timeout must be >= 0, got {args.shutdown_timeout}")):
        if not ok:
            p.error(rule)
    return args


def run(args: argparse.Namespace) -> None:
    if _MISSING_EXTRA is not None:
        raise ServeError(f"serve.py needs the serve extra ({_MISSING_EXTRA.name} is missing): "
                         f"pip install -e \".[serve]\"")
    if args.api_key is not None and not args.api_key.isascii():  # clients differ in how they encode other text
        raise ServeError("--api_key (or $SERVE_API_KEY) must be ASCII: it is sent in an HTTP header")
    # Bound now, to say so before loading the model when the port is taken, and to know the port
    # that --port 0 got; uvicorn listens on this socket.
    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as err:
        listener.close()
        raise ServeError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    port = listener.getsockname()[1]
    enc = gpt2_tokenizer()
    torch.set_num_threads(args.threads)  # before load_for_inference times anything
    loaded = checkpoints.load_for_inference(args, "decode")
    model, device = loaded.model, loaded.device
    name = args.model_name or Path(args.checkpoint).resolve().name
    # An engine thread that ends stops the server like a SIGTERM, and the exit status says it failed.
    decoding, layout = loaded.for_decoding(args.max_batch)  # the weights laid out before the engine is built
    server = Server(decoding, name, enc, args.max_batch, args.max_queue, layout, args.api_key,
                    on_engine_death=lambda: signal.raise_signal(signal.SIGTERM))
    cfg = model.config
    print(f"serving {loaded.directory} as '{name}' ({model.num_params() / 1e6:.2f}M parameters, block_size={cfg.block_size}; "
          f"{device}, {server.weights}, {args.threads} thread(s), max_batch={args.max_batch}, "
          f"max_queue={args.max_queue}"
          f"{', API key required' if args.api_key else ''}) on http://{args.host}:{port}", file=sys.stderr, flush=True)
    app = build_app(server, args.max_request_bytes, args.api_docs)

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            """uvicorn's graceful shutdown, with the open requests ended by the app itself once
            --shutdown_timeout has passed (uvicorn would cut them mid-body)."""
            asyncio.get_running_loop().call_later(args.shutdown_timeout, app.state.end_requests,
                                                  f"--shutdown_timeout={args.shutdown_timeout:g} s passed")
            await super().shutdown(sockets)

    # uvicorn's own limit is a backstop: the final chunks need a moment to go out.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout + 5)
    # uvicorn re-raises the signal that stopped it once it has shut down; a SIGTERM or Ctrl-C that
    # ends in a clean shutdown is a normal exit here (status 0), so the handler it restores ignores it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Uvicorn(config).run(sockets=[listener])
    if server.engine_error is not None:
        raise RuntimeError("the engine thread stopped (its traceback is above); exiting so a supervisor can "
                           "restart the server") from server.engine_error
    print("stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
