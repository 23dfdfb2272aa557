"""Benchmarks, one function per section; they print the figures in docs/benchmarks.md.

    python bench.py data     # prepare_data.py throughput against single-threaded tiktoken, and its peak memory
    python bench.py train    # training tokens/s and MFU, this GPT vs transformers' GPT2LMHeadModel; peak memory
    python bench.py head     # the loss head alone: full vs chunked, over chunk sizes
    python bench.py sample   # batch-1 decode tokens/s, ours vs transformers' generate, fp32 and bf16 weights
    python bench.py serve    # serve.py under 1/4/16 concurrent streaming clients; batched decode vs transformers
    python bench.py eval     # HellaSwag examples/s (needs `make hellaswag`)
    python bench.py optimizer  # one optimizer step, AdamW vs Muon + AdamW, at small.py's shape and GPT-2 124M
    python bench.py          # every section
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

# Runs a command and prints, as JSON, its wall time, the peak over time of the summed PSS of its
# process tree (the command and its worker processes; PSS splits shared pages between the
# processes that share them, so the sum is the memory the tree really holds) and the largest RSS
# of one process in the tree. Polls /proc every 50 ms, so it needs Linux.
_MEASURE = r"""
import json, os, resource, subprocess, sys, tempfile, time

def tree(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids

def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

with tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=err, text=True)
    peak_kb = 0
    while proc.poll() is None:
        peak_kb = max(peak_kb, sum(pss_kb(pid) for pid in tree(proc.pid)))
        time.sleep(0.05)
    wall_s = time.perf_counter() - start
    if proc.returncode:
        err.seek(0)
        sys.exit(err.read())
print(json.dumps({"wall_s": wall_s, "peak_pss_mb": peak_kb / 1024,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """How busy all CPUs are over `seconds`, from /proc/stat (None where there is no /proc/stat)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def base_text(text_file: str | None = None) -> tuple[str, str]:
    """The text the data corpus is made of, and its name: text_file (UTF-8) if given, else the
    built-in Shakespeare plays that prepare_data.py --dataset shakespeare reads."""
    if text_file is not None:
        return Path(text_file).read_text(encoding="utf-8"), Path(text_file).name
    from prepare_data import read_shakespeare, shakespeare_play_files

    return "\n".join(read_shakespeare(shakespeare_play_files()[0])), "the built-in shakespeare plays"


def make_documents(text: str, total_mb: float, doc_kb: float) -> list[str]:
    """~total_mb MB of `text`, repeated, as distinct documents of ~doc_kb KB, cut at paragraph breaks.
    Each starts with its number, so no two are equal (equal documents would all fall in one split)."""
    paragraphs = text.split("\n\n")
    docs, current, size, total, i = [], [], 0, 0, 0
    while total < total_mb * 1e6:
        paragraph = paragraphs[i % len(paragraphs)]
        i += 1
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= doc_kb * 1e3:
            docs.append(f"Document {len(docs)}\n\n" + "\n\n".join(current))
            total += len(docs[-1])
            current, size = [], 0
    return docs


def bare_encode(docs: list[str]) -> int:
    """Encode docs one after another, nothing else: one worker's share of the ceiling measurement."""
    from tokenizer import gpt2_tokenizer

    enc = gpt2_tokenizer()
    return sum(len(enc.encode_to_numpy(doc, allowed_special=set(), disallowed_special=())) for doc in docs)


def measure_cli(argv: list[str]) -> dict:
    """Wall time and peak memory (MB) of one command and its worker processes, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def bench_data(mb: float = 50.0, doc_kb: float = 5.0, num_workers: int | None = None, repeats: int = 5,
               text_file: str | None = None) -> dict:
    """prepare_data.py on ~mb MB of JSONL documents of ~doc_kb KB, made of text_file's text (default:
    the built-in Shakespeare plays).

    Throughput: the pipeline (prepare_data.prepare, in this process), single-threaded
    encode_ordinary over the same documents, and a ceiling (num_workers processes that only
    encode their share of the documents), run `repeats` times in turn. Memory: the command's
    process tree at mb/2 and mb MB, with the default shard size and with 1M-token shards.
    Returns the figures as a dict and prints them.
    """
    from prepare_data import default_num_workers, prepare, worker_context
    from tokenizer import gpt2_tokenizer

    num_workers = num_workers or default_num_workers()
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.1:
        print(f"warning: the CPUs were {busy:.0%} busy before the benchmark; the figures will be low", file=sys.stderr)
    enc = gpt2_tokenizer()
    text, text_name = base_text(text_file)
    docs = make_documents(text, mb, doc_kb)
    results: dict = {"cpu": cpu_name(), "cores": default_num_workers(), "num_workers": num_workers,
                     "documents": len(docs), "text_mb": sum(len(d.encode()) for d in docs) / 1e6}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        corpora = {}
        for name, subset in (("full", docs), ("half", docs[: len(docs) // 2])):
            corpora[name] = tmp / f"{name}.jsonl"
            with open(corpora[name], "w", encoding="utf-8") as f:
                for doc in subset:
                    f.write(json.dumps({"text": doc}) + "\n")
            results[f"{name}_mb"] = corpora[name].stat().st_size / 1e6

        # The three measurements take turns, so that all see the same background load (on a
        # shared VM it varies by tens of percent from one second to the next).
        baseline_s, ceiling_s, pipeline_s = [], [], []
        parts = [docs[i::num_workers] for i in range(num_workers)]
        with ProcessPoolExecutor(num_workers, mp_context=worker_context()) as pool:
            list(pool.map(bare_encode, [["warm up"]] * num_workers))
            for _ in range(repeats):
                start = time.perf_counter()
                baseline_tokens = sum(len(enc.encode_ordinary(doc)) for doc in docs)
                baseline_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                assert sum(pool.map(bare_encode, parts)) == baseline_tokens
                ceiling_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # its summary lines
                    meta = prepare(tmp / "out", inputs=[str(corpora["full"])], num_workers=num_workers, progress=False)
                pipeline_s.append(time.perf_counter() - start)
                shutil.rmtree(tmp / "out")
        assert meta["tokens"] == baseline_tokens + len(docs), "the pipeline adds one EOT per document"

        def speedup(times: list[float], tokens: int) -> float:
            """The median over rounds of (tokens/s of this run) / (tokens/s of the single-threaded run beside it)."""
            return statistics.median((tokens / t) / (baseline_tokens / b) for b, t in zip(baseline_s, times))

        results.update(
            tokens=meta["tokens"],
            baseline_tokens_per_s=baseline_tokens / min(baseline_s),
            ceiling_tokens_per_s=baseline_tokens / min(ceiling_s),
            pipeline_tokens_per_s=meta["tokens"] / min(pipeline_s),
            ceiling_speedup=speedup(ceiling_s, baseline_tokens),
            speedup=speedup(pipeline_s, meta["tokens"]),
        )

        memory = {}
        for shard_tokens in (100_000_000, 1_000_000):
            for name in ("half", "full"):
                memory[(shard_tokens, name)] = measure_cli(
                    [sys.executable, "prepare_data.py", "--input", str(corpora[name]), "--out",
                     str(tmp / f"mem_{name}_{shard_tokens}"), "--shard_tokens", str(shard_tokens),
                     "--num_workers", str(num_workers)])
        results["memory"] = {f"{k[0]}:{k[1]}": v for k, v in memory.items()}
        results["import_memory"] = measure_cli([sys.executable, "-c", "import prepare_data"])

    print(f"data: {results['text_mb']:.1f} MB of text ({text_name}, {len(docs):,} JSONL documents of "
          f"~{doc_kb:g} KB, {results['tokens']:,} tokens), {results['cores']} cores ({results['cpu']}), "
          f"{num_workers} workers")
    print(f"  single-threaded encode_ordinary       : {results['baseline_tokens_per_s'] / 1e6:5.2f} M tokens/s")
    print(f"  prepare_data pipeline                 : {results['pipeline_tokens_per_s'] / 1e6:5.2f} M tokens/s  "
          f"{results['speedup']:.2f}x  (reading JSONL, encoding, splitting, writing shards)")
    print(f"  ceiling: {num_workers} processes encoding only    : {results['ceiling_tokens_per_s'] / 1e6:5.2f} M tokens/s  "
          f"{results['ceiling_speedup']:.2f}x  (each encodes its share of the document list)")
    print(f"  (tokens/s: the best of {repeats} runs taken in turn; speed-ups: the median of the {repeats} ratios to "
          "the single-threaded run beside them)")
    print(f"  prepare_data.py as a command          : {memory[(100_000_000, 'full')]['wall_s']:.1f} s wall for the "
          f"{results['full_mb']:.0f} MB file, interpreter start and imports included")
    print("  peak memory of prepare_data.py and its workers (summed PSS; largest single-process RSS in brackets):")
    print(f"    {'':31} {results['half_mb']:4.0f} MB corpus    {results['full_mb']:4.0f} MB corpus")
    for shard_tokens, label in ((100_000_000, "--shard_tokens 100M (default)"), (1_000_000, "--shard_tokens 1M")):
        cells = [f"{memory[(shard_tokens, n)]['peak_pss_mb']:5.0f} MB ({memory[(shard_tokens, n)]['max_rss_mb']:.0f})"
                 for n in ("half", "full")]
        print(f"    {label:<31} {cells[0]:>14}    {cells[1]:>14}")
    print(f"    (`import prepare_data` alone: {results['import_memory']['peak_pss_mb']:.0f} MB; a shard buffer grows to "
          f"2 bytes x shard_tokens per split as tokens arrive)")
    return results


def measure_matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of an n x n matmul in dtype on the CPU (a practical peak for MFU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def measure_bandwidth(gigabytes: float = 1.0, reps: int = 5) -> float:
    """Bytes/s of reading one large fp32 tensor (a sum: no matmul, bound by memory), the best of reps."""
    t = torch.ones(int(gigabytes * 2**30) // 4)
    t.sum()
    best = min(_seconds(t.sum) for _ in range(reps))
    return t.numel() * 4 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)  # configs/small.py's shape (checked below)
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)


def _small_shape() -> dict:
    from train import load_config

    cfg = load_config([str(ROOT / "configs" / "small.py")])
    shape = {k: getattr(cfg.model, k) for k in SMALL}
    assert shape == SMALL, f"configs/small.py changed shape: {shape}"
    return shape


def hf_twin(model):
    """transformers' GPT2LMHeadModel with the same shape and weights as one of ours."""
    import transformers

    import hf_weights

    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_weights.config_to_hf(c)))
    missing, unexpected = hf.load_state_dict(hf_weights.to_hf_state_dict(model.state_dict(), c.tie_embeddings),
                                             strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf


def print_auto_precision(kind: str, shapes: dict[str, dict]) -> None:
    """What `auto` (mixed_precision, --dtype) picks at each shape for `kind` ("batched" or
    "decode") and the two rates it picks by, timed now (devices.measure_bf16, no cache)."""
    from devices import BF16_MIN_SPEEDUP, Workload, measure_bf16, native_bf16

    if not native_bf16(torch.device("cpu")):
        print("auto precision: fp32 (bf16 is emulated on this CPU: no AVX512-BF16 or AMX, nothing timed)")
        return
    for name, shape in shapes.items():
        start = time.perf_counter()
        speed = measure_bf16(Workload(kind, shape["n_embd"], shape["n_layer"], 50257))
        print(f"auto precision at {name} ({kind} matmuls, {torch.get_num_threads()} threads, timed now in {time.perf_counter() - start:.2f} s): "
              f"fp32 {speed.fp32 / 1e9:.1f} GFLOP/s, bf16 {speed.bf16 / 1e9:.1f} GFLOP/s, bf16 {speed.ratio:.2f}x fp32 "
              f"-> {'bf16' if speed.bf16_wins else 'fp32'} (bf16 needs {BF16_MIN_SPEEDUP}x)")


class _Trainer:
    """One model's training step (forward + backward + fused AdamW), timed step by step."""

    def __init__(self, model, x, y, precision: str, ours: bool):
        self.model, self.x, self.y, self.ours = model.train(), x, y, ours
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        with self.autocast:
            if self.ours:  # through the model's configured loss head
                _, loss = self.model(self.x, self.y)
            else:  # GPT2LMHeadModel: logits, then the same fp32 cross-entropy as our "full" head
                logits = self.model(self.x).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.y.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def _memory_of_one_step(kind: str) -> dict:
    """In a fresh process: peak RSS (MB) of one forward + backward of GPT-2 124M on 4 x 1,024
    tokens, fp32, with our chunked head ("ours") or GPT2LMHeadModel ("hf"); and the RSS before it."""
    import resource

    from model import GPT, GPTConfig

    import transformers

    torch.manual_seed(0)
    if kind == "hf":  # built directly, so that both processes start from the same footing
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = GPT(GPTConfig(**GPT2_124M))
    x, y = torch.randint(0, 50257, (4, 1024)), torch.randint(0, 50257, (4, 1024))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind == "hf":
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    else:
        _, loss = model(x, y)
    loss.backward()
    return {"before_mb": before, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_train(steps: int = 7, compile: bool = True) -> None:
    """Training tokens/s and MFU at configs/small.py's shape: our GPT with the chunked and the full
    loss head against transformers' GPT2LMHeadModel, eager and compiled, fp32 (and bf16 where the
    CPU runs it natively); then peak memory at GPT-2 124M."""
    import multiprocessing

    from devices import native_bf16
    from model import GPT, GPTConfig
    from train import load_config

    shape = _small_shape()
    cfg = load_config([str(ROOT / "configs" / "small.py")])
    B, T = cfg.micro_batch_size, cfg.model.block_size
    torch.manual_seed(0)
    x, y = torch.randint(0, 50257, (B, T)), torch.randint(0, 50257, (B, T))
    bf16 = native_bf16(torch.device("cpu"))
    print(f"training benchmark: configs/small.py shape {shape}, micro-batch {B} x {T} tokens, "
          f"{torch.get_num_threads()} threads on {cpu_name()}, torch {torch.__version__}")
    peaks = {"fp32": measure_matmul_peak(torch.float32)}
    peaks["bf16"] = measure_matmul_peak(torch.bfloat16, n=2048 if bf16 else 256, seconds=2.0 if bf16 else 1.0)
    print(f"matmul peak measured now (2048 x 2048): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
          f"{peaks['bf16'] / 1e9:.1f} GFLOP/s ({'native' if bf16 else 'emulated: no AMX / AVX512-BF16 on this CPU'})")
    print_auto_precision("batched", {"configs/small.py": shape})
    flops_per_token = GPT(GPTConfig(**shape)).flops_per_token(T)

    print("\n| setting | ours chunked tok/s (MFU) | ours full tok/s (MFU) | GPT2LMHeadModel tok/s (MFU) | chunked / HF |")
    print("|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        for compiled in (False, True) if compile else (False,):
            label = precision + (" + compile" if compiled else " eager")
            if precision == "bf16" and not bf16:
                print(f"| {label} | skipped: bf16 is emulated here (~{peaks['fp32'] / peaks['bf16']:.0f}x slower matmuls) | | | |")
                continue
            trainers = {}
            for name, impl in (("chunked", "chunked"), ("full", "full"), ("hf", None)):
                torch.manual_seed(0)
                model = GPT(GPTConfig(**shape, loss_impl=impl or "full"))
                if impl is None:
                    model = hf_twin(model)
                if compiled:
                    model.compile()
                trainers[name] = _Trainer(model, x, y, precision, ours=impl is not None)
            for trainer in trainers.values():  # warm-up (and compilation) steps are not timed
                trainer.step(), trainer.step()
            for _ in range(steps):  # in turn, so that all see the same background load
                for trainer in trainers.values():
                    trainer.times.append(trainer.step())
            rate = {k: B * T / statistics.median(t.times) for k, t in trainers.items()}
            cells = [f"{rate[k]:,.0f} ({100 * flops_per_token * rate[k] / peaks[precision]:.0f}%)" for k in trainers]
            print(f"| {label} | {' | '.join(cells)} | {rate['chunked'] / rate['hf']:.2f}x |", flush=True)

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        memory = {kind: pool.submit(_memory_of_one_step, kind).result() for kind in ("ours", "hf")}
    print("\npeak RSS of one forward + backward, GPT-2 124M, fp32, micro-batch 4 x 1,024 (a fresh process each; "
          "model built before):")
    for kind, label in (("ours", "ours, chunked head"), ("hf", "GPT2LMHeadModel + cross_entropy")):
        m = memory[kind]
        print(f"  {label:<32} {m['peak_mb']:7,.0f} MB peak ({m['peak_mb'] - m['before_mb']:6,.0f} MB above the model)")
    print(f"  ours / GPT2LMHeadModel: {memory['ours']['peak_mb'] / memory['hf']['peak_mb']:.0%} of the peak, "
          f"{(memory['ours']['peak_mb'] - memory['ours']['before_mb']) / (memory['hf']['peak_mb'] - memory['hf']['before_mb']):.0%} "
          f"of the growth")


def bench_head(reps: int = 5) -> None:
    """The loss head alone (forward + backward of lm_head + cross-entropy) at small.py's and GPT-2
    124M's shapes: the full path against both chunked implementations over chunk sizes. The
    fastest chunk sizes here are the rule in loss_head.cpu_chunk_rows."""
    import torch.nn.functional as F

    from loss_head import linear_cross_entropy

    print(f"loss head, forward + backward, ms (median of {reps}), {torch.get_num_threads()} threads on {cpu_name()}")
    impls = ["own"] + (["torch"] if hasattr(F, "linear_cross_entropy") else [])
    for rows, C in ((1024, 128), (4096, 768)):
        torch.manual_seed(0)
        h = torch.randn(rows, C, requires_grad=True)
        w = (torch.randn(50257, C) * 0.02).requires_grad_()
        y = torch.randint(0, 50257, (rows,))
        for dtype in (torch.float32, torch.bfloat16):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

            def full():
                with autocast:
                    loss = F.cross_entropy(F.linear(h, w).float(), y)
                loss.backward()

            def chunked(impl, chunk_rows):
                with autocast:
                    loss = linear_cross_entropy(h, w, y, impl=impl, chunk_rows=chunk_rows)
                loss.backward()

            cells = {"full": full}
            for impl in impls:
                for chunk_rows in (128, 256, 512, 1024):
                    cells[f"{impl} {chunk_rows}"] = lambda impl=impl, c=chunk_rows: chunked(impl, c)
            times = {}
            for name, fn in cells.items():
                fn()
                times[name] = statistics.median(_seconds(fn) for _ in range(reps))
            line = "  ".join(f"{name} {1000 * t:.0f}" for name, t in times.items())
            best = min((t, n) for n, t in times.items() if n != "full")
            print(f"  {rows} x {C}, {str(dtype)[6:]:>8}: {line}  | best chunked {best[1]} = "
                  f"{times['full'] / best[0]:.2f}x the full path")


def _decode_models(shape: dict):
    """Our GPT with spread-out random weights (confident predictions: greedy has no near-ties) and
    transformers' twin with the same weights."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    ours = GPT(GPTConfig(**shape)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = hf_twin(ours).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf


def _timed(runs: dict, reps: int = 3) -> tuple[dict, dict]:
    """Median seconds of each callable (after one warm-up), taken in turn; and each one's last output."""
    outputs, times = {}, {k: [] for k in runs}
    for run in runs.values():
        run()
    for _ in range(reps):
        for key, run in runs.items():
            start = time.perf_counter()
            outputs[key] = run()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, outputs


def _shapes(names: str) -> list[tuple[str, dict]]:
    """`small`, `124m` or both (comma-separated) as (label, shape)."""
    known = {"small": lambda: ("small.py", _small_shape()), "124m": lambda: ("GPT-2 124M", GPT2_124M)}
    return [known[n.strip()]() for n in names.split(",")]


def _agreement(reference, other, ids: list[int]) -> tuple[float, float]:
    """Teacher-forced over `ids` (one sequence): how often two decoding models' most likely next
    tokens agree, and the mean KL(reference || other) of their next-token distributions (nats)."""
    idx = torch.tensor([ids])
    with torch.inference_mode():
        ref = torch.log_softmax(reference(idx)[0][0].float(), dim=-1)
        oth = torch.log_softmax(other(idx)[0][0].float(), dim=-1)
    top1 = (ref.argmax(-1) == oth.argmax(-1)).float().mean().item()
    return top1, (ref.exp() * (ref - oth)).sum(-1).mean().item()


def _val_loss_by_weights(checkpoint: str, data: str, windows: int = 64) -> None:
    """A trained model's val loss with each decoding layout of its weights, teacher-forced over the
    first `windows` windows of the val shards (the difference int8 and bf16 make to a real model)."""
    import numpy as np

    import checkpoints
    from decode_weights import WEIGHTS, prepare
    from shards import ShardLoader, list_shards

    directory, _, model = checkpoints.load_latest(checkpoint, checkpoints.load_model, need_state=False, warn=print)
    loader = ShardLoader(list_shards(data, "val"), model.config.block_size, 1, shuffle=False)
    tokens = loader.read_windows(np.arange(min(windows, loader.num_windows)))  # (N, T + 1)
    print(f"\nval loss of {directory} over {tokens[:, 1:].numel():,} val tokens of {data}, by weights:\n")
    print("| weights | val loss | minus fp32's |")
    print("|---|---|---|")
    losses = {}
    for weights in WEIGHTS:
        decoding, _ = prepare(model, weights)
        with torch.inference_mode():
            logits = torch.cat([decoding(tokens[i : i + 8, :-1])[0].float() for i in range(0, len(tokens), 8)])
        losses[weights] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
        print(f"| {weights} | {losses[weights]:.4f} | {losses[weights] - losses['float32']:+.4f} |")


def _compiled_decode_rate(decoding, ids: list[int], params) -> tuple[float, float]:
    """Batch-1 tokens/s of the engine with its decode step's forward (model.hidden_states with
    per-row positions) under torch.compile (dynamic shapes: the attention span grows every step),
    and the seconds the first generation took (compiling)."""
    from engine import Engine

    eager = decoding.hidden_states
    compiled = torch.compile(eager, dynamic=True)
    decoding.hidden_states = lambda idx, cache=None, positions=None: (
        compiled(idx, cache, positions) if positions is not None else eager(idx, cache, positions))
    try:
        engine = Engine(decoding, max_batch=1)
        first = _seconds(lambda: engine.generate([ids], params))
        seconds = statistics.median(_seconds(lambda: engine.generate([ids], params)) for _ in range(3))
    finally:
        del decoding.hidden_states
    return params.max_tokens / seconds, first


def bench_sample(new_tokens: int = 128, shapes: str = "small,124m", checkpoint: str | None = None,
                 data: str = "data/shakespeare", compile: bool = False) -> None:
    """Batch-1 greedy decode tokens/s on engine.Engine against transformers' generate with the same
    weights, at small.py's shape and GPT-2 124M: fp32 through torch's linear only, fp32 as the
    engine lays it out (decode_weights: the fastest of torch's, oneDNN's and split linears per
    shape), bf16 and int8 weights; how closely bf16 and int8 follow fp32; and the limit memory bandwidth puts on each (every new
    token reads every matmul weight once). With `checkpoint`, also a trained model's val loss
    (its val shards in `data`) with each layout; with `compile`, fp32 with the decode step under
    torch.compile too."""
    from decode_weights import prepare
    from engine import Engine, SamplingParams

    print(f"decode benchmark: batch 1, 16-token prompt, up to {new_tokens} new tokens, greedy, "
          f"{torch.get_num_threads()} threads on {cpu_name()}")
    bandwidth = measure_bandwidth()
    print(f"memory bandwidth measured now (sum of a 1 GiB fp32 tensor): {bandwidth / 1e9:.1f} GB/s")
    print_auto_precision("decode", dict(_shapes(shapes)))
    kinds = {"torch fp32": ("float32", "torch"), "fp32": ("float32", "auto"), "bf16": ("bfloat16", "auto"),
             "int8": ("int8", "auto")}
    agreement = []
    print("\n| shape | transformers fp32 | ours, fp32, torch's linear | ours, fp32 | ours / transformers | same tokens "
          "| ours, bf16 | ours, int8 | bf16 / fp32 | int8 / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape in _shapes(shapes):
        ours, hf = _decode_models(shape)
        decoding = {k: prepare(ours, w, linear) for k, (w, linear) in kinds.items()}
        prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
        n = min(new_tokens, shape["block_size"] - prompt.size(1))  # transformers stops at the context length
        params = SamplingParams(max_tokens=n, temperature=0.0)
        ids = prompt[0].tolist()
        engines = {k: Engine(m, max_batch=1) for k, (m, _) in decoding.items()}
        runs = {"hf": lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, 16:].tolist(),
                **{k: (lambda e=e: e.generate([ids], params)[0]) for k, e in engines.items()}}
        seconds, outputs = _timed(runs)
        rate = {k: n / t for k, t in seconds.items()}
        same = "yes" if outputs["fp32"] == outputs["hf"] == outputs["torch fp32"] else "no"
        print(f"| {name}, {n} new tokens | {rate['hf']:,.1f} | {rate['torch fp32']:,.1f} | {rate['fp32']:,.1f} "
              f"| {rate['fp32'] / rate['hf']:.2f}x | {same} | {rate['bf16']:,.1f} | {rate['int8']:,.1f} "
              f"| {rate['bf16'] / rate['fp32']:.2f}x | {rate['int8'] / rate['fp32']:.2f}x |", flush=True)
        text = ids + outputs["fp32"]
        for k in ("bf16", "int8"):
            greedy = next((i for i, (a, b) in enumerate(zip(outputs["fp32"], outputs[k])) if a != b), n)
            agreement.append((name, k, greedy, n, *_agreement(decoding["fp32"][0], decoding[k][0], text)))
        if name == "GPT-2 124M":
            matmul = ours.num_params() - ours.transformer.wpe.weight.numel()  # every weight but the position table
            limit = {"fp32": bandwidth / (4 * matmul), "bf16": bandwidth / (2 * matmul), "int8": bandwidth / matmul}
            print(f"\n124M reads {4 * matmul / 1e6:.0f} MB of fp32 matmul weights per token (bf16 half, int8 a quarter); "
                  f"at {bandwidth / 1e9:.1f} GB/s, fp32 reaches {rate['fp32'] / limit['fp32']:.0%} of its limit "
                  f"({limit['fp32']:.1f} tokens/s; torch's linear only: {rate['torch fp32'] / limit['fp32']:.0%}), "
                  f"bf16 {rate['bf16'] / limit['bf16']:.0%} of {limit['bf16']:.1f}, int8 {rate['int8'] / limit['int8']:.0%} "
                  f"of {limit['int8']:.1f}")
        print(f"fp32 layout at {name}: {decoding['fp32'][1]}", flush=True)
        if compile:
            # torch's linears: inductor picks its own kernels (it cannot trace oneDNN's packed weights)
            compiled, first = _compiled_decode_rate(prepare(ours, "float32", "torch")[0], ids, params)
            print(f"fp32 with the decode step compiled: {compiled:,.1f} tokens/s ({compiled / rate['fp32']:.2f}x the "
                  f"eager fp32 layout; the first generation, compiling, took {first:.1f} s)", flush=True)
    print("\nHow closely bf16 and int8 follow fp32 (random weights: near-ties are commoner than in a trained model), "
          "teacher-forced over the prompt and fp32's greedy text:\n")
    print("| shape | weights | greedy tokens equal to fp32's | top-1 agreement | mean KL from fp32 (nats) |")
    print("|---|---|---|---|---|")
    for name, k, greedy, n, top1, kl in agreement:
        print(f"| {name} | {k} | first {greedy} of {n} | {top1:.1%} | {kl:.4f} |")
    if checkpoint:
        _val_loss_by_weights(checkpoint, data)


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


def bench_serve(requests: int = 16, shapes: str = "small,124m", concurrency: tuple[int, ...] = (1, 4, 16),
                threads: int | None = None, dtype: str = "float32", rounds: int = 2) -> None:
    """serve.py (a subprocess on a free local port, --max_batch 16) under 1, 4 and 16 concurrent
    streaming clients, `requests` requests per level: aggregate completion tokens/s and p50/p95
    time to first token; then the engine's batched greedy decode (16 equal prompts) against
    transformers' generate on the same batch. Batch-1 figures: `bench.py sample`. threads: serve.py's
    --threads (default: its own default, all cores but one); dtype: its --dtype. The levels run in
    turn `rounds` times and each keeps its fastest round: on a shared machine the load drifts, and
    a ratio between levels measured minutes apart would carry that drift."""
    import socket
    import urllib.request

    from engine import Engine, SamplingParams

    server_threads = threads or max(1, torch.get_num_threads() - 1)
    print(f"serve benchmark: {requests} streaming requests per level (16-token prompts), greedy, the levels in turn "
          f"{rounds} times (each level's fastest round); serve.py --dtype {dtype} on {server_threads} of "
          f"{torch.get_num_threads()} threads on {cpu_name()}; in-process rows: {torch.get_num_threads()} threads")
    for name, shape in _shapes(shapes):
        new = 64 if name == "small.py" else 32
        ours, hf = _decode_models(shape)
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_pretrained(Path(tmp) / "run")  # a GPT-2 directory, which serve.py loads as it is
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(Path(tmp) / "run"),
                                     "--port", str(port), "--max_batch", "16", "--max_queue", "64",
                                     "--threads", str(server_threads), "--dtype", dtype],
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            base = f"http://127.0.0.1:{port}"
            try:
                for _ in range(600):
                    try:
                        urllib.request.urlopen(base + "/health", timeout=5)
                        break
                    except OSError:
                        time.sleep(0.2)
                g = torch.Generator().manual_seed(2)
                bodies = [{"model": "run", "prompt": torch.randint(0, 50256, (16,), generator=g).tolist(),
                           "max_tokens": new, "temperature": 0} for _ in range(requests)]
                asyncio.run(_clients(port, bodies[:1], 1))  # warm-up
                print(f"\n{name}, {new} new tokens per request:\n")
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
            finally:
                proc.terminate()
                proc.wait()
        batch = torch.randint(0, 50256, (16, 16), generator=torch.Generator().manual_seed(3))
        engines = {w: Engine(ours, max_batch=16, weights=w) for w in ("float32", "bfloat16", "int8")}
        params = SamplingParams(max_tokens=new, temperature=0.0)
        runs = {"hf": lambda: hf.generate(batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, 16:].tolist(),
                **{w: (lambda e=e: e.generate(batch.tolist(), params)) for w, e in engines.items()}}
        seconds, outputs = _timed(runs, reps=2)
        rate = {k: 16 * new / t for k, t in seconds.items()}
        print(f"\nbatch of 16 equal-length prompts, {new} new tokens each, in-process: engine (fp32, as serve.py lays it "
              f"out) {rate['float32']:,.1f} tokens/s, transformers generate {rate['hf']:,.1f} "
              f"({rate['float32'] / rate['hf']:.2f}x); same tokens: {'yes' if outputs['float32'] == outputs['hf'] else 'no'}; "
              f"engine with bf16 weights {rate['bfloat16']:,.1f} ({rate['bfloat16'] / rate['float32']:.2f}x fp32), "
              f"int8 {rate['int8']:,.1f} ({rate['int8'] / rate['float32']:.2f}x)")


def bench_eval(examples: int = 200, batch_size: int = 16) -> None:
    """HellaSwag examples/s (4 choices each, batched) at small.py's shape and GPT-2 124M, with the
    real validation examples when `make hellaswag` has fetched them, fp32 and (where native) bf16."""
    import evaluation
    from devices import autocast, native_bf16
    from model import GPT, GPTConfig
    from tokenizer import gpt2_tokenizer

    data = ROOT / "data" / "hellaswag"
    if not data.is_dir():
        print(f"eval benchmark: skipped, {data} is missing: run `make hellaswag` first")
        return
    enc = gpt2_tokenizer()
    chosen = evaluation.load_hellaswag(data, enc, examples)
    tokens = sum(len(e.query) + len(c) for e in chosen for c in e.choices)
    print(f"eval benchmark: {len(chosen)} HellaSwag validation examples ({tokens / len(chosen) / 4:.0f} tokens per "
          f"sequence on average), batches of {batch_size} sequences, {torch.get_num_threads()} threads on {cpu_name()}")
    print_auto_precision("batched", {"small.py": _small_shape(), "GPT-2 124M": GPT2_124M})
    print("\n| shape | dtype | examples/s | acc_norm (random weights: chance is 0.25) |")
    print("|---|---|---|---|")
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(torch.device("cpu")) else [])
    for name, shape, n in (("small.py", _small_shape(), len(chosen)), ("GPT-2 124M", GPT2_124M, min(len(chosen), 50))):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape)).eval()
        for dtype in dtypes:
            context = autocast(torch.device("cpu"), dtype)
            evaluation.score_choices(model, chosen[:4], batch_size, torch.device("cpu"), context)  # warm-up
            start = time.perf_counter()
            scores = evaluation.score_choices(model, chosen[:n], batch_size, torch.device("cpu"), context)
            rate = n / (time.perf_counter() - start)
            _, _, correct_norm = evaluation.hellaswag_counts(scores, chosen[:n])
            print(f"| {name} ({n} examples) | {str(dtype)[6:]} | {rate:.1f} | {correct_norm / n:.3f} |", flush=True)


def _newton_schulz_flops(model, steps: int = 5) -> float:
    """FLOPs of torch.optim.Muon's Newton-Schulz iterations over the model's Muon matrices: per step,
    for an m x n matrix (m <= n), X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n)."""
    from train import muon_params

    total = 0.0
    for p in muon_params(model):
        m, n = sorted(p.shape)
        total += steps * (4 * m * m * n + 2 * m**3)
    return total


def bench_optimizer(steps: int = 5) -> None:
    """The cost of one optimizer step: AdamW on every parameter (optimizer=adamw) against Muon on
    the blocks' matrices + AdamW on the rest (optimizer=muon), built as train.py builds them, on
    the same random gradients, timed in turn; next to one forward + backward of a micro-batch, for
    scale. At configs/small.py's shape and at GPT-2 124M's."""
    from model import GPT, GPTConfig
    from train import TrainConfig, make_optimizers, with_derived

    print(f"optimizer step: {torch.get_num_threads()} threads on {cpu_name()}, torch {torch.__version__}; "
          f"medians of {steps} steps taken in turn")
    print("\n| shape | AdamW step | Muon + AdamW step | difference | Newton-Schulz FLOPs | forward + backward (tokens) |")
    print("|---|---|---|---|---|---|")
    for label, shape, batch in (("small.py", _small_shape(), 8), ("GPT-2 124M", GPT2_124M, 1)):
        torch.manual_seed(0)
        models = {name: GPT(GPTConfig(**shape)) for name in ("adamw", "muon")}
        optimizers = {name: make_optimizers(model, with_derived(TrainConfig.from_flat(optimizer=name), 1),
                                            torch.device("cpu"))
                      for name, model in models.items()}
        for model in models.values():
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
        times = {name: [] for name in models}
        for repeat in range(steps + 1):  # the first step of each (state allocation) is not timed
            for name, opts in optimizers.items():
                start = time.perf_counter()
                for opt in opts:
                    opt.step()
                if repeat:
                    times[name].append(time.perf_counter() - start)
        adamw, muon = (statistics.median(times[k]) for k in ("adamw", "muon"))
        model, T = models["adamw"], shape["block_size"]
        x = torch.randint(0, 50257, (batch, T))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()  # warm-up
        fwd_bwd = []
        for _ in range(2):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            fwd_bwd.append(time.perf_counter() - start)
        print(f"| {label} | {1e3 * adamw:,.0f} ms | {1e3 * muon:,.0f} ms | {1e3 * (muon - adamw):+,.0f} ms "
              f"({muon / adamw:.2f}x) | {_newton_schulz_flops(model) / 1e9:,.1f} GFLOP | "
              f"{1e3 * min(fwd_bwd):,.0f} ms ({batch} x {T}, bf16) |", flush=True)
    busy = cpu_busy_fraction()
    if busy is not None:
        print(f"\n(all CPUs {busy:.0%} busy just after: other work on this machine slows every figure above)")


SECTIONS = {"data": bench_data, "train": bench_train, "head": bench_head, "sample": bench_sample, "serve": bench_serve,
            "eval": bench_eval, "optimizer": bench_optimizer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks; with no section, every section runs with its defaults.")
    sections = parser.add_subparsers(dest="section", metavar="SECTION")
    data = sections.add_parser("data", help="prepare_data.py tokens/s vs single-threaded tiktoken, and peak memory")
    data.add_argument("--mb", type=float, default=50.0, help="corpus size in MB; memory is also measured at half (default: 50)")
    data.add_argument("--doc_kb", type=float, default=5.0, help="document size in KB (default: 5)")
    data.add_argument("--num_workers", type=int, default=None, help="encoding processes (default: every core)")
    data.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement, taken in turn (default: 5)")
    data.add_argument("--text_file", default=None,
                      help="a UTF-8 text file the corpus is made of (default: the built-in Shakespeare plays)")
    train = sections.add_parser("train", help="training tokens/s and MFU: our GPT (chunked and full head) vs "
                                              "GPT2LMHeadModel; peak memory at 124M")
    train.add_argument("--steps", type=int, default=7, help="timed optimizer steps per model and setting (default: 7)")
    train.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    head = sections.add_parser("head", help="the loss head alone: full vs chunked over chunk sizes")
    head.add_argument("--reps", type=int, default=5, help="timed runs per cell (default: 5)")
    sample = sections.add_parser("sample", help="batch-1 greedy decode tokens/s, ours vs transformers' generate")
    sample.add_argument("--new_tokens", type=int, default=128, help="tokens generated per run (default: 128)")
    sample.add_argument("--checkpoint", default=None,
                        help="also a trained checkpoint's val loss with each weight layout (e.g. make demo's run directory)")
    sample.add_argument("--data", default="data/shakespeare", help="its data directory, for the val shards (default: data/shakespeare)")
    sample.add_argument("--compile", action="store_true", help="also time the fp32 decode step under torch.compile")
    serve = sections.add_parser("serve", help="serve.py under 1/4/16 concurrent streaming clients")
    serve.add_argument("--requests", type=int, default=16, help="streaming requests per concurrency level (default: 16)")
    for section in (sample, serve):
        section.add_argument("--shapes", default="small,124m", help="small, 124m or both (default: small,124m)")
    serve.add_argument("--threads", type=int, default=None,
                       help="serve.py's --threads (default: its own, all cores but one)")
    serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8", "auto"),
                       help="serve.py's --dtype (default: float32)")
    serve.add_argument("--rounds", type=int, default=2,
                       help="times the levels run in turn; each level keeps its fastest (default: 2)")
    evaluate = sections.add_parser("eval", help="HellaSwag examples/s at small.py's shape and GPT-2 124M")
    evaluate.add_argument("--examples", type=int, default=200, help="examples scored at small.py's shape (default: 200)")
    evaluate.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (default: 16)")
    optimizer = sections.add_parser("optimizer", help="one optimizer step, AdamW vs Muon + AdamW, at small.py's "
                                                      "shape and GPT-2 124M")
    optimizer.add_argument("--steps", type=int, default=5, help="timed steps per optimizer and shape (default: 5)")
    args = parser.parse_args(argv)
    if args.section is None:
        for run in SECTIONS.values():
            run()
    else:
        options = {k: v for k, v in vars(args).items() if k != "section"}
        SECTIONS[args.section](**options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
