"""serve.py: one real server (a subprocess on a free local port, a tiny random GPT-2 saved by the
project's own checkpoint writer) driven through the real `openai` client: completions streamed
and not, prompt lists, n, stop strings, seeds, logprobs against the model's own log-softmax,
greedy text equal to transformers' greedy decode alone and inside a busy batch, every error,
the queue bound, a disconnect freeing its slots, the edge (413 unread, 415, 404/405, bodies that
do not parse, the Bearer header, the playground's headers), and SIGTERM (it stops the server).
A second server, last, checks --port 0 and the streams still open when --shutdown_timeout ends."""

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import openai
import pytest
import torch

from conftest import ROOT, env, save_weights, wait_until
from model import GPT, GPTConfig
from serve import DEFAULT_MAX_REQUEST_BYTES
from tokenizer import gpt2_tokenizer

KEY = "test-key"
NAME = "tiny"
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=256)
MAX_BATCH, MAX_QUEUE = 4, 4


def tiny_model() -> GPT:
    """Random weights spread out enough that greedy text varies with the context."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / NAME
    ckpt = save_weights(run_dir, 1, tiny_model())
    port = free_port()
    # on the CPU: the tests compare against transformers and log-softmax in CPU fp32
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(run_dir), "--port", str(port),
                             "--device", "cpu", "--max_batch", str(MAX_BATCH), "--max_queue", str(MAX_QUEUE), "--shutdown_timeout", "5"],
                            cwd=ROOT, env={**env(), "SERVE_API_KEY": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()

    def up() -> bool:
        try:
            return http("GET", base + "/health", key=KEY)[0] == 200
        except OSError:
            return proc.poll() is not None  # stop waiting if it died

    assert wait_until(up, timeout=120, interval=0.2) and proc.poll() is None, "".join(lines)
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    yield dict(proc=proc, base=base, client=client, ckpt=ckpt, lines=lines)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def http(method: str, url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def weights(server):
    return GPT.from_pretrained(server["ckpt"]).eval()


def create(server, **kwargs):
    return server["client"].completions.create(model=NAME, **kwargs)


def streamed(server, **kwargs) -> tuple[dict[int, str], dict[int, str], object]:
    """Texts and finish reasons by choice index of a streamed completion, and its usage chunk."""
    texts, reasons, usage = {}, {}, None
    for chunk in create(server, stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


@torch.no_grad()
def hf_greedy(server, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(server["ckpt"], torch_dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=50256)
    return out[0, len(prompt_ids):].tolist()


# ---------------------------------------------------------------------------- completions


def test_models_and_health(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [NAME]
    status, body = http("GET", server["base"] + "/health", key=KEY)
    assert status == 200 and body["status"] == "ok"


def test_stream_pieces_join_to_the_whole_completion(server):
    kwargs = dict(prompt="ROMEO:", max_tokens=24, temperature=1.0, seed=3)
    whole = create(server, **kwargs)
    texts, reasons, usage = streamed(server, **kwargs)
    assert texts == {0: whole.choices[0].text} and len(whole.choices[0].text) > 10
    assert reasons == {0: "length"} and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == usage.prompt_tokens == 3  # "ROMEO:" is 3 tokens
    assert whole.usage.completion_tokens == usage.completion_tokens == 24
    assert whole.usage.total_tokens == 27


def test_greedy_equals_transformers_alone_and_in_a_busy_batch(server, enc):
    prompt = enc.encode_ordinary("To be, or not to be")
    expected = enc.decode(hf_greedy(server, prompt, 40))
    alone = create(server, prompt=prompt, max_tokens=40, temperature=0)
    assert alone.choices[0].text == expected

    done = threading.Event()
    busy_results = []

    def busy(seed):  # long sampled streams that keep the batch full meanwhile
        texts, _, _ = streamed(server, prompt=f"Busy {seed}", max_tokens=120, temperature=1.0, seed=seed)
        busy_results.append((done.is_set(), texts))

    threads = [threading.Thread(target=busy, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    assert wait_until(lambda: http("GET", server["base"] + "/health", key=KEY)[1]["running"] >= 3, timeout=30)
    in_batch = create(server, prompt=prompt, max_tokens=40, temperature=0)
    done.set()
    for t in threads:
        t.join()
    assert in_batch.choices[0].text == expected
    assert any(finished_after for finished_after, _ in busy_results)  # the batch really was busy


def test_prompt_lists_and_n_each_equal_their_solo_run(server):
    prompts = ["Once upon a time", "The king said", "Hello"]
    batch = create(server, prompt=prompts, n=2, max_tokens=12, temperature=0.9, seed=11)
    assert sorted(c.index for c in batch.choices) == list(range(6))
    by_index = {c.index: c.text for c in batch.choices}
    for p, prompt in enumerate(prompts):
        solo = create(server, prompt=prompt, n=2, max_tokens=12, temperature=0.9, seed=11)
        assert [by_index[2 * p], by_index[2 * p + 1]] == [c.text for c in sorted(solo.choices, key=lambda c: c.index)]
        assert by_index[2 * p] != by_index[2 * p + 1]  # two choices, two seeds
    assert batch.usage.completion_tokens == 6 * 12


def test_seeds_repeat_and_differ(server):
    def text(seed):
        return create(server, prompt="A", max_tokens=16, temperature=1.0, seed=seed).choices[0].text

    assert text(1) == text(1)
    assert text(1) != text(2)


def test_concurrent_requests_each_equal_their_solo_run(server):
    jobs = [dict(prompt=f"Request {i}", max_tokens=20, temperature=0.8, seed=i, extra_body={"top_k": 40})
            for i in range(6)]
    solo = [create(server, **job).choices[0].text for job in jobs]
    results = [None] * len(jobs)

    def go(i):
        results[i] = streamed(server, **jobs[i])[0][0] if i % 2 else create(server, **jobs[i]).choices[0].text

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_stop_strings_cut_the_text(server, enc):
    prompt = enc.encode_ordinary("ROMEO:")
    full = create(server, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = full[12:15]
    cut = full[: full.index(stop)]
    stopped = create(server, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "\u2603never"])
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 30
    texts, reasons, _ = streamed(server, prompt=prompt, max_tokens=30, temperature=0, stop=stop)
    assert texts == {0: cut} and reasons == {0: "stop"}


@torch.no_grad()
def test_logprobs_and_echo_equal_the_models_log_softmax(server, enc, weights):
    prompt = enc.encode_ordinary("Good morning, my lord")
    out = create(server, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, echo=True)
    choice = out.choices[0]
    lp = choice.logprobs
    prompt_text = enc.decode(prompt)
    assert choice.text.startswith(prompt_text)
    generated = hf_greedy(server, prompt, 8)
    ids = prompt + generated
    reference = torch.log_softmax(weights(torch.tensor([ids]))[0][0], dim=-1)  # (T, V)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(reference[i - 1, ids[i]].item(), abs=1e-4)
        best = reference[i - 1].topk(3)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert len(lp.top_logprobs[i]) <= 3
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[len(prompt)] == len(prompt_text)


# ------------------------------------------------------------------------------- errors


def test_prompt_past_the_context_is_400_naming_both_numbers(server):
    with pytest.raises(openai.BadRequestError) as err:
        create(server, prompt="ROMEO:", max_tokens=300)
    assert err.value.status_code == 400
    message = err.value.body["message"]
    assert "256" in message and "303" in message and "300" in message, message


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(logprobs=9), "logprobs"), (dict(stop=["a"] * 5), "stop"),
    (dict(extra_body={"temperature": "hot"}), "temperature"), (dict(prompt=[[]]), "prompt"),
    (dict(prompt=[70000]), "prompt"), (dict(frequency_penalty=1.0), "frequency_penalty"),
    # integers past 64 bits (top_k and seed used to overflow the engine's int64 settings in its step)
    (dict(prompt=[2**64]), "prompt"), (dict(n=2**64), "n"), (dict(logprobs=2**64), "logprobs"),
    (dict(extra_body={"seed": 2**64}), "seed"), (dict(extra_body={"seed": -(2**63) - 1}), "seed"),
    (dict(extra_body={"top_k": -(2**64)}), "top_k"), (dict(extra_body={"top_p": 10**400}), "top_p"),
    (dict(extra_body={"temperature": 10**400}), "temperature"), (dict(max_tokens=-(2**64)), "max_tokens"),
    (dict(extra_body={"stream": True, "stream_options": {"include_usage": "yes"}}), "stream_options"),
])
def test_bad_fields_are_400_naming_the_field(server, kwargs, param):
    kwargs = {"prompt": "Hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        create(server, **kwargs)
    assert err.value.body["param"] == param and param in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"


def test_huge_integers_leave_the_engine_serving_and_top_k_past_the_vocabulary_means_all(server):
    kwargs = dict(prompt="a", max_tokens=8, temperature=1.0, seed=4)
    unfiltered = create(server, **kwargs).choices[0].text
    for k in (2**63, 50257):  # 2**63 used to raise in the engine's step and hang every later request
        assert create(server, **kwargs, extra_body={"top_k": k}).choices[0].text == unfiltered
    with pytest.raises(openai.BadRequestError) as err:
        create(server, prompt="a", max_tokens=2**63)
    assert err.value.body["code"] == "context_length_exceeded"
    assert create(server, prompt="a", max_tokens=2, extra_body={"seed": -1}).choices[0].text == \
        create(server, prompt="a", max_tokens=2, extra_body={"seed": 2**64 - 1}).choices[0].text


def test_echo_of_an_empty_prompt_is_empty(server):
    plain = create(server, prompt="", max_tokens=6, temperature=0).choices[0]
    echoed = create(server, prompt="", max_tokens=6, temperature=0, echo=True, logprobs=1).choices[0]
    assert echoed.text == plain.text and "<|endoftext|>" not in echoed.text
    assert "".join(echoed.logprobs.tokens) == plain.text and echoed.logprobs.text_offset[0] == 0
    texts, _, _ = streamed(server, prompt="", max_tokens=6, temperature=0, echo=True)
    assert texts == {0: plain.text}


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        server["client"].completions.create(model="gpt-4", prompt="Hi")
    assert "gpt-4" in err.value.body["message"] and err.value.body["code"] == "model_not_found"


def test_api_key_is_checked_on_every_request(server):
    wrong = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=NAME, prompt="Hi")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert http("GET", server["base"] + "/health")[0] == 401


def test_full_queue_is_429_and_a_disconnect_frees_the_slots(server):
    health = lambda: http("GET", server["base"] + "/health", key=KEY)[1]  # noqa: E731
    stream = create(server, prompt="Hold", n=MAX_BATCH + MAX_QUEUE, max_tokens=250, temperature=1.0, stream=True)
    next(iter(stream))  # admitted and generating: every slot and queue place is taken
    with pytest.raises(openai.RateLimitError) as err:
        create(server, prompt="One more", max_tokens=4)
    assert err.value.status_code == 429 and "busy" in err.value.body["message"]
    assert health()["running"] == MAX_BATCH
    stream.close()  # the client goes away mid-stream
    assert wait_until(lambda: health()["running"] == 0, timeout=5), health()
    assert create(server, prompt="Back", max_tokens=4).choices[0].finish_reason == "length"
    assert any("cancelled" in line for line in server["lines"]), server["lines"][-5:]


def raw_request(server, head: str, body_parts=(), timeout: float = 10) -> tuple[int, dict]:
    """Send `head` (request line and headers, no blank line) and `body_parts` over one socket;
    the status and JSON body of the answer (read until the server closes)."""
    host, port = server["base"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n")
        for part in body_parts:
            sock.sendall(part)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    headers, _, body = data.partition(b"\r\n\r\n")
    return int(headers.split()[1]), json.loads(body)


def post_raw(server, body: bytes, content_type: str = "application/json", key: str = KEY) -> httpx.Response:
    return httpx.post(server["base"] + "/v1/completions", content=body, timeout=30,
                      headers={"Content-Type": content_type, "Authorization": f"Bearer {key}"})


def test_a_body_past_max_request_bytes_is_413_unread(server):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
    start = time.perf_counter()  # the body is never sent: only its announced length is refused
    status, body = raw_request(server, head + "\r\nContent-Length: 100000000")
    assert status == 413 and time.perf_counter() - start < 5
    assert body["error"]["code"] == "request_too_large" and "--max_request_bytes" in body["error"]["message"]
    # Chunked: refused once the bytes received pass the limit (the client stops there, unanswered till then).
    piece = 65536
    parts = [f"{piece:x}\r\n".encode() + b" " * piece + b"\r\n"] * (DEFAULT_MAX_REQUEST_BYTES // piece) + [b"1\r\n \r\n"]
    status, body = raw_request(server, head + "\r\nTransfer-Encoding: chunked", parts)
    assert status == 413 and body["error"]["type"] == "invalid_request_error"


def test_health_answers_while_a_large_prompt_is_parsed(server):
    """800,000 one-token prompts (4 MB, under the limit) take the server a second or more to check;
    /health answers meanwhile, as that work runs off the event loop."""
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(reply=http(
        "POST", server["base"] + "/v1/completions", {"model": NAME, "prompt": [[1]] * 800_000, "max_tokens": 1}, KEY)))
    start = time.perf_counter()
    thread.start()
    latencies = []
    while thread.is_alive():
        asked = time.perf_counter()
        assert http("GET", server["base"] + "/health", key=KEY)[0] == 200
        latencies.append(time.perf_counter() - asked)
    elapsed = time.perf_counter() - start
    status, body = answer["reply"]
    assert status == 400 and "800000 sequences" in body["error"]["message"], body  # past --max_batch + --max_queue
    assert len(latencies) >= 3 and max(latencies) < elapsed / 3, (latencies, elapsed)


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe{}", b"[" * 2000 + b"]" * 2000,
                                  b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"n": ' + b"1" * 5000 + b"}",
                                  b"[1]", b'{"model": 5, "prompt": "Hi"}', b'{"model": ["tiny"], "prompt": "Hi"}'])
def test_every_unparsable_body_is_an_openai_400(server, body):
    response = post_raw(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_routes_methods_and_media_types_are_openai_errors(server):
    def call(method, path, **kwargs):
        response = httpx.request(method, server["base"] + path, headers={"Authorization": f"Bearer {KEY}",
                                 **kwargs.pop("headers", {})}, timeout=30, **kwargs)
        return response.status_code, response.json()["error"]

    for path in ("/nowhere", "/v1/chat/completions", "/docs", "/redoc", "/openapi.json"):  # no --api_docs: none
        status, error = call("GET", path)
        assert status == 404 and path in error["message"], (path, error)
    status, error = call("GET", "/v1/completions")
    assert status == 405 and "GET" in error["message"]
    assert call("DELETE", "/health")[0] == 405
    body = json.dumps({"model": NAME, "prompt": "Hi", "max_tokens": 2})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, error = call("POST", "/v1/completions", content=body, headers={"Content-Type": content_type})
        assert status == 415 and "application/json" in error["message"], (content_type, error)
    response = post_raw(server, body.encode(), "application/json; charset=utf-8")
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"


def test_bearer_is_any_case_and_the_key_exact(server):
    for authorization, status in ((f"bearer {KEY}", 200), (f"BEARER  {KEY}", 200), (f"Basic {KEY}", 401),
                                  (f"Bearer {KEY}x", 401), (f"Bearer {KEY[:-1]}", 401), ("Bearer", 401)):
        response = httpx.get(server["base"] + "/v1/models", headers={"Authorization": authorization}, timeout=30)
        assert response.status_code == status, authorization
        if status == 401:
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_playground_forbids_framing_and_foreign_scripts_and_fits_the_context(server):
    response = httpx.get(server["base"] + "/", timeout=30)  # no key: the page holds none
    page, policy = response.text, response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert directives["connect-src"] == "'self'"
    for tag in ("script", "style"):  # the page's own inline code, allowed by its hash and nothing else
        inline = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        assert len(inline) == 1
        digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
        assert directives[f"{tag}-src"] == f"'sha256-{digest}'"
    slider = re.search(r'<input id="max_tokens"[^>]*>', page).group(0)
    assert 'max="256"' in slider and 'value="64"' in slider, slider  # block_size 256: 64 leaves room


def test_every_request_is_logged(server):
    started = next(line for line in server["lines"] if line.startswith("serving "))
    threads = max(1, torch.get_num_threads() - 1)  # all cores but one: the default
    assert "float32 via " in started and f"{threads} thread(s)" in started, started
    logged = [line for line in server["lines"] if line.startswith("POST /v1/completions")]
    assert len(logged) >= 10
    assert all("prompt_tokens=" in line and "ttft=" in line and "tokens/s" in line for line in logged)


def test_playground_streams_the_completion_in_a_real_browser(server):
    """GET / needs no key; in headless Chromium the page (settings from its URL, the key from its
    fragment) streams the same text the API gives for the same greedy request, and a bad setting
    shows the server's error."""
    from chromium import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; .ci/run installs it)")
    with urllib.request.urlopen(server["base"] + "/", timeout=30) as response:  # no Authorization header
        assert response.status == 200 and '<textarea id="prompt"' in response.read().decode()
    expected = create(server, prompt="To be, or", max_tokens=12, temperature=0).choices[0].text
    browser = Chromium(binary)
    try:
        page = browser.open(f"{server['base']}/?prompt=To%20be%2C%20or&max_tokens=12&temperature=0&run=1#key={KEY}")
        state = "document.getElementById('output').dataset.state"
        assert browser.wait_for(page, f"['done', 'error'].includes({state}) && {state}") == "done"
        assert browser.evaluate(page, "document.getElementById('output').textContent") == expected
        assert re.fullmatch(r"12 tokens in [\d.]+ s", browser.evaluate(page, "document.getElementById('status').textContent"))
        assert browser.evaluate(page, "document.getElementById('model').textContent") == NAME
        # The slider stops at the context (256), which with the prompt's token is one past it: the 400's message shows.
        page = browser.open(f"{server['base']}/?prompt=x&max_tokens=1000&run=1#key={KEY}")
        assert browser.wait_for(page, f"['done', 'error'].includes({state}) && {state}") == "error"
        status = browser.evaluate(page, "document.getElementById('status').textContent")
        assert status.startswith("error: ") and "maximum context length is 256 tokens" in status, status
    finally:
        browser.close()


def test_bad_options_are_refused_before_anything_loads(capsys):
    from serve import parse_args

    for option, value, message in (("--threads", "0", "--threads must be >= 1, got 0"),
                                   ("--max_batch", "0", "--max_batch must be >= 1, got 0"),
                                   ("--max_request_bytes", "0", "--max_request_bytes must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            parse_args(["--checkpoint", "nowhere", option, value])
        assert message in capsys.readouterr().err


def test_a_key_no_header_can_carry_is_refused_at_start(capsys):
    from serve import main

    assert main(["--checkpoint", "nowhere", "--api_key", "cl\u00e9-\u2603"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --api_key") and "ASCII" in err, err


# ------------------------------------------- in-process: a padded vocabulary, engine faults

PADDED_BATCH, PADDED_QUEUE = 2, 1  # a small bound, so a leaked place shows at once


@pytest.fixture(scope="module")
def padded():
    """serve's app in this process (FastAPI's TestClient under the real `openai` client) over a
    tiny model whose vocabulary is padded to 50304, as the speed configs pad it: the engine object
    is at hand for fault injection."""
    from fastapi.testclient import TestClient

    from serve import Server, build_app

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50304)).eval()
    lines, deaths = [], []
    server = Server(model, "padded", gpt2_tokenizer(), PADDED_BATCH, PADDED_QUEUE, None, None, log=lines.append,
                    on_engine_death=lambda: deaths.append(True))
    with TestClient(build_app(server)) as http_client:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", max_retries=0, timeout=30,
                               http_client=http_client)
        yield dict(server=server, client=client, http=http_client, lines=lines, deaths=deaths)


def idle(padded) -> bool:
    server = padded["server"]
    return server.outstanding == 0 and server.engine.num_running == 0 and not server.runs


def test_ids_the_tokenizer_lacks_are_400_and_no_failure_keeps_a_queue_place(padded):
    client = padded["client"]
    for i in range(100):  # 50257-50303: in the model's padded vocabulary, not the tokenizer's
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="padded", prompt=[464, 50257 + i % 47], max_tokens=2)
        assert err.value.body["param"] == "prompt" and "50257" in err.value.body["message"]
    assert client.completions.create(model="padded", prompt="Hi", max_tokens=3).choices[0].finish_reason == "length"
    assert idle(padded)


def fail_next_decode(engine, error) -> None:
    """Make the engine's next decode step raise `error` (an internal bug, simulated)."""
    real = engine._decode

    def broken():
        engine._decode = real
        raise error

    engine._decode = broken


def test_a_step_that_raises_fails_its_requests_and_the_engine_goes_on(padded):
    server, client = padded["server"], padded["client"]
    fail_next_decode(server.engine, RuntimeError("injected fault"))
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="padded", prompt="Hi", max_tokens=4, n=2)
    assert err.value.status_code == 500 and err.value.body["type"] == "server_error"
    assert wait_until(lambda: idle(padded), timeout=10)

    fail_next_decode(server.engine, RuntimeError("injected fault"))
    with pytest.raises(openai.APIError, match="failed while generating"):  # the client raises at the error event
        list(client.completions.create(model="padded", prompt="Hi", max_tokens=4, stream=True))
    assert wait_until(lambda: idle(padded), timeout=10)
    fail_next_decode(server.engine, RuntimeError("injected fault"))
    raw = padded["http"].post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True})
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["type"] == "server_error", events
    assert wait_until(lambda: idle(padded), timeout=10)
    assert any("injected fault" in line for line in padded["lines"])

    for _ in range(PADDED_BATCH + PADDED_QUEUE + 1):  # every place came back
        assert client.completions.create(model="padded", prompt="Hi", max_tokens=3).usage.completion_tokens == 3
    assert padded["http"].get("/health").json()["status"] == "ok"


class EngineCrash(BaseException):
    """Not an Exception: it escapes the engine's per-step recovery, as a bug in it would."""


# ------------------------------------- in-process: shutdown, docs behind the key, early disconnects


@contextlib.contextmanager
def own_server(api_key=None, api_docs=False):
    """A server of its own in this process (one a test may stop), its engine's decode steps held
    at `gate` until the test sets it."""
    from fastapi.testclient import TestClient

    from serve import Server, build_app

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    lines, gate = [], threading.Event()
    server = Server(model, "own", gpt2_tokenizer(), 2, 2, None, api_key, log=lines.append)
    real = server.engine._decode
    server.engine._decode = lambda: (gate.wait(30), real())
    app = build_app(server, api_docs=api_docs)
    with TestClient(app) as http:
        try:
            yield dict(server=server, http=http, app=app, lines=lines, gate=gate)
        finally:
            gate.set()  # before the engine thread is joined


def test_a_request_ended_at_shutdown_is_logged_as_ended_by_the_shutdown():
    with own_server() as s:
        result = {}
        waiter = threading.Thread(target=lambda: result.update(response=s["http"].post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 40})))
        waiter.start()
        assert wait_until(lambda: s["server"].engine.num_running == 1, 30)
        s["http"].portal.call(s["app"].state.end_requests, "a test")
        waiter.join(timeout=30)
        assert result["response"].status_code == 503
    logged = [line for line in s["lines"] if line.startswith("POST /v1/completions")]
    assert len(logged) == 1 and "shutting down" in logged[0] and "client gone" not in logged[0], logged


def test_with_an_api_key_the_docs_need_it_too():
    with own_server(api_key="k", api_docs=True) as s:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert s["http"].get(path).status_code == 401, path
            assert s["http"].get(path, headers={"Authorization": "Bearer k"}).status_code == 200, path
        assert s["http"].get("/").status_code == 200  # the playground page holds no key


def test_a_stream_whose_client_leaves_before_its_first_byte_is_cancelled():
    """The client is gone before the first byte (its disconnect is the first thing the app hears
    after the body; Starlette cancels the response while it sends the headers, before the body
    starts): the sequence is cancelled, not decoded to max_tokens."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 40, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "server": ("testserver", 80), "client": ("testclient", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    with own_server() as s:
        server, added = s["server"], []
        real_add = server.engine.add
        server.engine.add = lambda *a, **k: added.extend(real_add(*a, **k)) or added
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message):  # the client is gone while the headers go out: the body never starts
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.2)

        async def request():
            await s["app"](scope, receive, send)
            s["gate"].set()
            while server.outstanding:  # the engine's events reach this loop
                await asyncio.sleep(0.01)

        s["http"].portal.call(request)
        assert len(added) == 1 and added[0].finish_reason == "cancelled" and len(added[0].tokens) < 40
        assert server.engine.num_running == 0 and not server.runs


def test_a_dead_engine_fails_open_requests_and_health_is_503(padded):
    # Last of the in-process tests: the engine thread ends.
    server, client = padded["server"], padded["client"]
    fail_next_decode(server.engine, EngineCrash("injected crash"))
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="padded", prompt="Hi", max_tokens=4)
    assert padded["deaths"] == [True] and isinstance(server.engine_error, EngineCrash)
    health = padded["http"].get("/health")
    assert health.status_code == 503 and health.json()["status"] == "engine stopped"
    with pytest.raises(openai.InternalServerError) as err:  # 503: no hang, no 429
        client.completions.create(model="padded", prompt="Hi", max_tokens=4)
    assert err.value.status_code == 503 and "engine has stopped" in err.value.body["message"]


def test_a_dead_engine_thread_ends_the_process_non_zero(server):
    """`python serve.py` whose engine thread dies at once (Engine.run replaced by one that raises):
    the server shuts down by itself and exits 1 with the traceback, for a supervisor to restart it."""
    code = ("import sys, engine, serve\n"
            "def crash(self, stop, **kwargs):\n    raise RuntimeError('injected crash')\n"
            "engine.Engine.run = crash\n"
            "sys.exit(serve.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(server["ckpt"]), "--port", str(free_port())],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "injected crash" in proc.stderr and "the engine thread stopped" in proc.stderr, proc.stderr


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    # Last in this file: it stops the module's server.
    proc = server["proc"]
    texts = {}
    stream = create(server, prompt="Last", max_tokens=60, temperature=0, stream=True)
    first = next(iter(stream))
    texts[0] = first.choices[0].text
    proc.send_signal(signal.SIGTERM)
    start = time.time()
    for chunk in stream:  # the running request still completes
        for c in chunk.choices:
            texts[0] += c.text
    assert proc.wait(timeout=30) == 0
    assert time.time() - start < 20
    assert len(texts[0]) > 0
    with pytest.raises(openai.APIConnectionError):
        create(server, prompt="After", max_tokens=4)


def test_port_0_and_streams_open_past_the_shutdown_timeout_end_whole(tmp_path):
    """A second server (the first is stopped): --port 0 prints the port it got; --api_docs serves
    the schema; SIGTERM with --shutdown_timeout 0 while four streams are open (one decoding, three
    queued behind --max_batch 1) ends each with a final chunk naming why and [DONE], answers a
    queued non-streamed request 503, logs one line and no traceback, and exits 0."""
    run_dir = tmp_path / NAME
    save_weights(run_dir, 1, tiny_model())
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(run_dir), "--port", "0", "--max_batch", "1",
                             "--max_queue", "7", "--shutdown_timeout", "0", "--api_docs"],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    try:
        assert wait_until(lambda: any(line.startswith("serving ") for line in lines) or proc.poll() is not None, 120)
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+)$", next(l for l in lines if l.startswith("serving "))
                             .strip()).group(1))
        base = f"http://127.0.0.1:{port}"
        assert port != 0 and wait_until(lambda: _answers(base + "/health"), 60, 0.2), "".join(lines)
        assert httpx.get(base + "/openapi.json", timeout=30).json()["info"]["title"] == "gpt2-accelerate"

        streams, events = [], []
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(4):  # each admitted (its headers sent) before the next
                stream = client.stream("POST", "/v1/completions", json={
                    "model": NAME, "prompt": f"Stream {i}", "max_tokens": 250, "n": 1, "stream": True})
                response = stream.__enter__()
                assert response.status_code == 200
                streams.append((stream, response))
            whole = {}
            waiter = threading.Thread(target=lambda: whole.update(response=client.post("/v1/completions", json={
                "model": NAME, "prompt": "Whole", "max_tokens": 250})))
            waiter.start()
            assert wait_until(lambda: client.get("/health").json()["waiting"] == 4, 30)  # 3 streams + it
            proc.send_signal(signal.SIGTERM)
            for stream, response in streams:
                events.append([line.removeprefix("data: ") for line in response.iter_lines() if line])
                stream.__exit__(None, None, None)
            waiter.join(timeout=30)
        assert whole["response"].status_code == 503 and whole["response"].json()["error"]["code"] == "server_shutdown"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    cut = 0
    for received in events:
        assert received[-1] == "[DONE]", received[-3:]
        last = json.loads(received[-2])
        assert [c["index"] for c in last["choices"]] == [0]
        if last["choices"][0]["finish_reason"] == "shutdown":
            cut += 1
            assert last["error"]["code"] == "server_shutdown" and "shutting down" in last["error"]["message"]
        else:
            assert last["choices"][0]["finish_reason"] == "length" and "error" not in last
    assert cut >= 3  # the three queued ones at least
    log = "".join(lines)
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert len([line for line in lines if line.startswith("stopping: ")]) == 1, log[-3000:]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
