"""Benchmarks, one function per section; they print the figures quoted in the README.

    python bench.py data     # prepare_data.py throughput against single-threaded tiktoken, and its peak memory
    python bench.py train    # training tokens/s and MFU, this GPT vs transformers' GPT2LMHeadModel
    python bench.py          # every section
"""

from __future__ import annotations

import argparse
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
TINYSHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

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


def base_text() -> tuple[str, str]:
    """The text the data corpus is made of: tinyshakespeare if present, else the built-in plays."""
    if TINYSHAKESPEARE.is_file():
        return TINYSHAKESPEARE.read_text(encoding="utf-8"), "tinyshakespeare"
    from prepare_data import read_shakespeare, shakespeare_play_files

    return "\n".join(read_shakespeare(shakespeare_play_files()[0])), "the built-in shakespeare plays"


def make_documents(total_mb: float, doc_kb: float) -> list[str]:
    """~total_mb MB of text as distinct documents of ~doc_kb KB, cut at paragraph breaks.
    Each starts with its number, so no two are equal (equal documents would all fall in one split)."""
    text, _ = base_text()
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


def bench_data(mb: float = 50.0, doc_kb: float = 5.0, num_workers: int | None = None, repeats: int = 5) -> dict:
    """prepare_data.py on ~mb MB of JSONL documents of ~doc_kb KB.

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
    docs = make_documents(mb, doc_kb)
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

    print(f"data: {results['text_mb']:.1f} MB of text ({base_text()[1]}, {len(docs):,} JSONL documents of "
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


def _train_steps(model, x, y, precision: str, steps: int) -> float:
    """Seconds per optimizer step (median of `steps`) of forward + backward + fused AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    for i in range(steps + 2):  # 2 warm-up steps (and compilation) are not timed
        start = time.perf_counter()
        with autocast:
            logits = model(x)
            logits = logits[0] if isinstance(logits, tuple) else logits.logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_train(steps: int = 5) -> None:
    """Training tokens/s and MFU: this project's GPT vs transformers' GPT2LMHeadModel, same shape."""
    import transformers
    from model import GPT, GPTConfig
    from train import load_config, native_bf16

    cfg = load_config([str(ROOT / "configs" / "small.py")])
    shape = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size)
    B, T = cfg.micro_batch_size, cfg.block_size
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (B, T))
    y = torch.randint(0, 50257, (B, T))
    bf16 = native_bf16(torch.device("cpu"))

    print(f"training benchmark: configs/small.py shape {shape}, micro-batch {B} x {T} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    peak32 = measure_matmul_peak(torch.float32)
    peak16 = measure_matmul_peak(torch.bfloat16, n=2048 if bf16 else 256, seconds=1.0)
    print(f"matmul peak measured now: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s "
          f"({'native' if bf16 else 'emulated: no AMX / AVX512-BF16 on this CPU'})")

    def ours():
        return GPT(GPTConfig(**shape, vocab_size=50257))

    def theirs():
        hf = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                     n_positions=cfg.block_size, vocab_size=50257,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(hf).train()

    rows = [("fp32 eager", "fp32", False), ("fp32 + compile", "fp32", True),
            ("bf16", "bf16", False), ("bf16 + compile", "bf16", True)]
    flops_per_token = ours().flops_per_token(T)
    print("\n| setting | ours tok/s | ours MFU | HF GPT2LMHeadModel tok/s | HF MFU | ours / HF |")
    print("|---|---|---|---|---|---|")
    for label, precision, compiled in rows:
        if precision == "bf16" and not bf16:
            print(f"| {label} | skipped: bf16 is emulated here (~{peak32 / peak16:.0f}x slower matmuls than fp32) | | | | |")
            continue
        peak = peak16 if precision == "bf16" else peak32
        results = {}
        for name, make in (("ours", ours), ("hf", theirs)):
            model = make()
            if compiled:
                model.compile()
            results[name] = (B * T) / _train_steps(model, x, y, precision, steps)
        ratio = results["ours"] / results["hf"]
        print(f"| {label} | {results['ours']:,.0f} | {100 * flops_per_token * results['ours'] / peak:.1f}% | "
              f"{results['hf']:,.0f} | {100 * flops_per_token * results['hf'] / peak:.1f}% | {ratio:.2f}x |",
              flush=True)


SECTIONS = {"data": bench_data, "train": bench_train}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks; with no section, every section runs with its defaults.")
    sections = parser.add_subparsers(dest="section", metavar="SECTION")
    data = sections.add_parser("data", help="prepare_data.py tokens/s vs single-threaded tiktoken, and peak memory")
    data.add_argument("--mb", type=float, default=50.0, help="corpus size in MB; memory is also measured at half (default: 50)")
    data.add_argument("--doc_kb", type=float, default=5.0, help="document size in KB (default: 5)")
    data.add_argument("--num_workers", type=int, default=None, help="encoding processes (default: every core)")
    data.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement, taken in turn (default: 5)")
    train = sections.add_parser("train", help="training tokens/s and MFU: this GPT vs transformers' GPT2LMHeadModel")
    train.add_argument("--steps", type=int, default=5, help="timed optimizer steps per measurement (default: 5)")
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
