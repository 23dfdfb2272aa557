"""`make gpu-check`: what works on this machine's GPU, in one command and under 8 minutes on one H100.

First the `cuda` tests (`pytest -m cuda tests/`, in a child process, so the GPU is free again
after them), then the GPU benchmark rows (benchmarks/gpu.py: GPT-2 124M training tokens/s and MFU
in bf16, eager and compiled, peak memory, batch-1 and batch-16 decoding against transformers).
Prints one table and writes it, with the tests' counts and the machine, as JSON.

    python gpu_check.py [--json gpu_check.json] [--tests_timeout 300]

Exit status: 0 when every test and row passed; 1 when a test failed or errored, none ran, or a
row failed; 2 on a machine without CUDA (one line says so; nothing runs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

import atomic
import devices

ROOT = Path(__file__).resolve().parent


def parse_junit(text: str) -> dict:
    """pytest's --junitxml report -> {"passed", "failed", "errors", "skipped": counts, "failures":
    the ids (file::test) of the tests that failed or errored}."""
    root = ET.fromstring(text)
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        outcome = {child.tag for child in case}
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        if "failure" in outcome or "error" in outcome:
            counts["failed" if "failure" in outcome else "errors"] += 1
            counts["failures"].append(name)
        elif "skipped" in outcome:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_cuda_tests(timeout_s: float, paths: tuple[str, ...] = ("tests",)) -> dict:
    """`pytest -m cuda` over `paths` in a child process; its counts (parse_junit) with "seconds"
    and "ok" (something passed, nothing failed, errored or timed out)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cuda.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                   f"--junitxml={report}", *paths]
        start = time.perf_counter()
        try:
            subprocess.run(command, cwd=ROOT, timeout=timeout_s, check=False)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        seconds = time.perf_counter() - start
        counts = parse_junit(report.read_text()) if report.exists() else parse_junit("<testsuites/>")
    counts.update(seconds=seconds, timed_out=timed_out)
    counts["ok"] = not timed_out and counts["passed"] > 0 and not counts["failed"] and not counts["errors"]
    return counts


def tests_row(tests: dict) -> dict:
    """The tests' outcome as a row of the table."""
    note = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped in {tests['seconds']:.0f} s")
    if tests["timed_out"]:
        note += " (timed out: the counts are of what finished)"
    if tests["failures"]:
        note += "; failed: " + ", ".join(tests["failures"])
    return {"row": "pytest -m cuda tests/", "status": "ok" if tests["ok"] else "failed", "note": note}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="gpu_check.json", help="where the table goes as JSON (default: %(default)s)")
    parser.add_argument("--tests_timeout", type=float, default=300.0,
                        help="seconds the cuda tests may take before they count as failed (default: %(default)s)")
    args = parser.parse_args(argv)
    if not devices.cuda_available():
        print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing was checked")
        return 2
    from benchmarks import gpu

    device = torch.device("cuda")
    tf32 = devices.allow_tf32(device)
    machine = {"device": devices.device_name(device), "torch": torch.__version__, "cuda": devices.cuda_version()}
    print(f"gpu-check on {machine['device']}, torch {machine['torch']} (CUDA {machine['cuda']}); {tf32}", flush=True)
    tests = run_cuda_tests(args.tests_timeout)
    rows = [tests_row(tests), *gpu.rows(device, log=lambda line: print(line, flush=True))]
    print(gpu.format_table(rows))
    atomic.write_json(Path(args.json), {**machine, "date": time.strftime("%Y-%m-%d"), "tests": tests, "rows": rows})
    print(f"written to {args.json}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
