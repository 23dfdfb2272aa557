"""`python bench.py data`: prepare_data.py's tokens/s against single-threaded tiktoken and a
ceiling of processes that only encode, and the peak memory of prepare_data.py as a command.
Figures: docs/benchmarks.md#data-preparation-python-benchpy-data-2026-11-25-zen-5."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.common import ROOT, cpu_busy_fraction, cpu_name

HELP = "prepare_data.py tokens/s vs single-threaded tiktoken, and peak memory"


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB; memory is also measured at half (default: 50)")
    parser.add_argument("--doc_kb", type=float, default=5.0, help="document size in KB (default: 5)")
    parser.add_argument("--num_workers", type=int, default=None, help="encoding processes (default: every core)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement, taken in turn (default: 5)")
    parser.add_argument("--text_file", default=None,
                        help="a UTF-8 text file the corpus is made of (default: the built-in Shakespeare plays)")


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


def base_text(text_file: str | None = None) -> tuple[str, str]:
    """The text the data corpus is made of, and its name: text_file (UTF-8) if given, else the
    built-in Shakespeare plays that prepare_data.py --dataset shakespeare reads."""
    if text_file is not None:
        return Path(text_file).read_text(encoding="utf-8"), Path(text_file).name
    from documents import read_shakespeare, shakespeare_play_files

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


def run(mb: float = 50.0, doc_kb: float = 5.0, num_workers: int | None = None, repeats: int = 5,
        text_file: str | None = None) -> dict:
    """prepare_data.py on ~mb MB of JSONL documents of ~doc_kb KB, made of text_file's text (default:
    the built-in Shakespeare plays).

    Throughput: the pipeline (prepare_data.prepare, in this process), single-threaded
    encode_ordinary over the same documents, and a ceiling (num_workers processes that only
    encode their share of the documents), run `repeats` times in turn. Memory: the command's
    process tree at mb/2 and mb MB, with the default shard size and with 1M-token shards.
    Returns the figures as a dict and prints them.
    """
    from prepare_data import default_num_workers

    num_workers = num_workers or default_num_workers()
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.1:
        print(f"warning: the CPUs were {busy:.0%} busy before the benchmark; the figures will be low", file=sys.stderr)
    text, text_name = base_text(text_file)
    docs = make_documents(text, mb, doc_kb)
    results: dict = {"cpu": cpu_name(), "cores": default_num_workers(), "num_workers": num_workers,
                     "documents": len(docs), "text_mb": sum(len(d.encode()) for d in docs) / 1e6}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        corpora = write_corpora(tmp, docs, results)
        results.update(measure_throughput(tmp, docs, corpora["full"], num_workers, repeats))
        memory = measure_memory(tmp, corpora, num_workers)
        results["memory"] = {f"{k[0]}:{k[1]}": v for k, v in memory.items()}
        results["import_memory"] = measure_cli([sys.executable, "-c", "import prepare_data"])
    print_results(results, memory, text_name, doc_kb, repeats)
    return results


def write_corpora(tmp: Path, docs: list[str], results: dict) -> dict[str, Path]:
    """docs as JSONL files in tmp: "full" (all) and "half" (the first half); their sizes (MB) go
    into results as full_mb and half_mb."""
    corpora = {}
    for name, subset in (("full", docs), ("half", docs[: len(docs) // 2])):
        corpora[name] = tmp / f"{name}.jsonl"
        with open(corpora[name], "w", encoding="utf-8") as f:
            for doc in subset:
                f.write(json.dumps({"text": doc}) + "\n")
        results[f"{name}_mb"] = corpora[name].stat().st_size / 1e6
    return corpora


def measure_throughput(tmp: Path, docs: list[str], corpus: Path, num_workers: int, repeats: int) -> dict:
    """Tokens/s of single-threaded encode_ordinary, of the ceiling and of the pipeline over corpus
    (docs as JSONL), the best of `repeats`, and the two speed-ups over the single-threaded run."""
    from prepare_data import prepare, worker_context
    from tokenizer import gpt2_tokenizer

    enc = gpt2_tokenizer()
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
                meta = prepare(tmp / "out", inputs=[str(corpus)], num_workers=num_workers, progress=False)
            pipeline_s.append(time.perf_counter() - start)
            shutil.rmtree(tmp / "out")
    assert meta["tokens"] == baseline_tokens + len(docs), "the pipeline adds one EOT per document"

    def speedup(times: list[float], tokens: int) -> float:
        """The median over rounds of (tokens/s of this run) / (tokens/s of the single-threaded run beside it)."""
        return statistics.median((tokens / t) / (baseline_tokens / b) for b, t in zip(baseline_s, times))

    return dict(
        tokens=meta["tokens"],
        baseline_tokens_per_s=baseline_tokens / min(baseline_s),
        ceiling_tokens_per_s=baseline_tokens / min(ceiling_s),
        pipeline_tokens_per_s=meta["tokens"] / min(pipeline_s),
        ceiling_speedup=speedup(ceiling_s, baseline_tokens),
        speedup=speedup(pipeline_s, meta["tokens"]),
    )


def measure_memory(tmp: Path, corpora: dict[str, Path], num_workers: int) -> dict[tuple[int, str], dict]:
    """measure_cli of prepare_data.py on each corpus, with the default shard size and 1M-token
    shards: (shard_tokens, corpus name) -> its figures."""
    memory = {}
    for shard_tokens in (100_000_000, 1_000_000):
        for name in ("half", "full"):
            memory[(shard_tokens, name)] = measure_cli(
                [sys.executable, "prepare_data.py", "--input", str(corpora[name]), "--out",
                 str(tmp / f"mem_{name}_{shard_tokens}"), "--shard_tokens", str(shard_tokens),
                 "--num_workers", str(num_workers)])
    return memory


def print_results(results: dict, memory: dict[tuple[int, str], dict], text_name: str, doc_kb: float,
                  repeats: int) -> None:
    """The section's lines, from run()'s results and measure_memory's figures."""
    num_workers = results["num_workers"]
    print(f"data: {results['text_mb']:.1f} MB of text ({text_name}, {results['documents']:,} JSONL documents of "
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
