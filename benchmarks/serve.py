"""`python bench.py serve`: serve.py under 1, 4 and 16 concurrent streaming clients; then the
engine's batched decode against transformers' generate.
Figures: docs/benchmarks.md#serving-python-benchpy-serve-2026-12-02-zen-5-quiet."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, cpu_name, decode_models, named_shapes, timed

HELP = "serve.py under 1/4/16 concurrent streaming clients"


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--requests", type=int, default=16, help="streaming requests per concurrency level (default: 16)")
    parser.add_argument("--shapes", default="small,124m", help="small, 124m or both (default: small,124m)")
    parser.add_argument("--threads", type=int, default=None,
                        help="serve.py's --threads (default: its own, all cores but one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8", "auto"),
                        help="serve.py's --dtype (default: float32)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times the levels run in turn; each level keeps its fastest (default: 2)")


async def _stream_request(port: int, body: dict) -> tuple[float | None, int, float]:
    """One streaming /v1/completions to 127.0.0.1:port over a raw HTTP/1.1 connection: a lean load
    generator (the clients share the CPU with the server; a client library parsing every chunk would
    take much of it). Returns (seconds to the first text, completion tokens, seconds)."""
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"serve.py answered {status.decode().strip()}: {(await reader.read()).decode()[:300]}")
    first, usage = None, 0
    async for line in reader:  # headers, chunk sizes, then the events: "data: {...}" lines
        if not line.startswith(b"data: {"):
            continue
        if first is None and any(c["text"] for c in json.loads(line[6:])["choices"]):
            first = time.perf_counter() - start
        elif line.startswith(b'data: {"id"') and b'"usage"' in line:
            usage = json.loads(line[6:])["usage"]["completion_tokens"]
    writer.close()
    return first, usage, time.perf_counter() - start


async def _clients(port: int, bodies: list[dict], concurrency: int) -> list[tuple[float | None, int, float]]:
    """Send every body, `concurrency` requests at a time (each client starts its next when one ends)."""
    todo, results = list(bodies), []

    async def client():
        while todo:
            results.append(await _stream_request(port, todo.pop()))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def run(requests: int = 16, shapes: str = "small,124m", concurrency: tuple[int, ...] = (1, 4, 16),
        threads: int | None = None, dtype: str = "float32", rounds: int = 2) -> None:
    """serve.py (a subprocess on a free local port, --max_batch 16) under 1, 4 and 16 concurrent
    streaming clients, `requests` requests per level: aggregate completion tokens/s and p50/p95
    time to first token; then the engine's batched greedy decode (16 equal prompts) against
    transformers' generate on the same batch. Batch-1 figures: `bench.py sample`. threads: serve.py's
    --threads (default: its own default, all cores but one); dtype: its --dtype. The levels run in
    turn `rounds` times and each keeps its fastest round: on a shared machine the load drifts, and
    a ratio between levels measured minutes apart would carry that drift."""
    server_threads = threads or max(1, torch.get_num_threads() - 1)
    print(f"serve benchmark: {requests} streaming requests per level (16-token prompts), greedy, the levels in turn "
          f"{rounds} times (each level's fastest round); serve.py --dtype {dtype} on {server_threads} of "
          f"{torch.get_num_threads()} threads on {cpu_name()}; in-process rows: {torch.get_num_threads()} threads")
    for name, shape in named_shapes(shapes):
        new = 64 if name == "small.py" else 32
        ours, hf = decode_models(shape)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(Path(tmp) / "run")  # a GPT-2 directory, which serve.py loads as it is
            proc, port = start_server(Path(tmp) / "run", server_threads, dtype)
            try:
                g = torch.Generator().manual_seed(2)
                bodies = [{"model": "run", "prompt": torch.randint(0, 50256, (16,), generator=g).tolist(),
                           "max_tokens": new, "temperature": 0} for _ in range(requests)]
                asyncio.run(_clients(port, bodies[:1], 1))  # warm-up
                print(f"\n{name}, {new} new tokens per request:\n")
                print_levels(port, bodies, concurrency, rounds)
            finally:
                proc.terminate()
                proc.wait()
        print_batched(ours, hf, new)


def start_server(checkpoint: Path, threads: int, dtype: str) -> tuple[subprocess.Popen, int]:
    """serve.py on `checkpoint`, on a free local port, once its /health answers: (process, port)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(checkpoint),
                             "--port", str(port), "--max_batch", "16", "--max_queue", "64",
                             "--threads", str(threads), "--dtype", dtype],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.2)
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    return proc, port


def print_levels(port: int, bodies: list[dict], concurrency: tuple[int, ...], rounds: int) -> None:
    """The table of aggregate tokens/s and TTFT per concurrency level, each level's fastest of `rounds`."""
    print("| concurrent clients | aggregate tokens/s | vs 1 client | p50 TTFT ms | p95 TTFT ms |")
    print("|---|---|---|---|---|")
    best: dict[int, tuple[float, list]] = {}  # level -> (tokens/s, its round's results)
    for _ in range(rounds):
        for c in concurrency:
            start = time.perf_counter()
            results = asyncio.run(_clients(port, bodies, c))
            rate = sum(r[1] for r in results) / (time.perf_counter() - start)
            if rate > best.get(c, (0.0, None))[0]:
                best[c] = (rate, results)
    for c in concurrency:
        rate, results = best[c]
        ttft = sorted(1000 * r[0] for r in results)
        p95 = ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))]
        print(f"| {c} | {rate:,.1f} | {rate / best[concurrency[0]][0]:.2f}x | {statistics.median(ttft):.0f} "
              f"| {p95:.0f} |", flush=True)


def print_batched(ours, hf, new: int) -> None:
    """The engine's greedy decode of a batch of 16 equal-length prompts (fp32, bf16 and int8
    weights) against transformers' generate on the same batch, in this process."""
    from decode_weights import prepare
    from engine import Engine
    from sampling import SamplingParams

    batch = torch.randint(0, 50256, (16, 16), generator=torch.Generator().manual_seed(3))
    engines = {w: Engine(prepare(ours, w, batch=16)[0], max_batch=16) for w in ("float32", "bfloat16", "int8")}
    params = SamplingParams(max_tokens=new, temperature=0.0)
    runs = {"hf": lambda: hf.generate(batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, 16:].tolist(),
            **{w: (lambda e=e: e.generate(batch.tolist(), params)) for w, e in engines.items()}}
    seconds, outputs = timed(runs, reps=2)
    rate = {k: 16 * new / t for k, t in seconds.items()}
    print(f"\nbatch of 16 equal-length prompts, {new} new tokens each, in-process: engine (fp32, as serve.py lays it "
          f"out) {rate['float32']:,.1f} tokens/s, transformers generate {rate['hf']:,.1f} "
          f"({rate['float32'] / rate['hf']:.2f}x); same tokens: {'yes' if outputs['float32'] == outputs['hf'] else 'no'}; "
          f"engine with bf16 weights {rate['bfloat16']:,.1f} ({rate['bfloat16'] / rate['float32']:.2f}x fp32), "
          f"int8 {rate['int8']:,.1f} ({rate['int8'] / rate['float32']:.2f}x)")
