"""gpu_check.py and benchmarks/gpu.py where there is no GPU: the refusal (one line, exit 2), the
exit status and JSON from given results, and the pure parts (peak lookup, MFU, the table, the
pytest report)."""

from __future__ import annotations

import json
import subprocess

import pytest

import devices
import gpu_check
from benchmarks import gpu
from conftest import ROOT


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_lookup_by_card_name(name, tflops):
    assert gpu.peak_bf16_flops(name) == (None if tflops is None else tflops * 1e12)


def test_mfu_and_table():
    assert gpu.mfu(100_000, 6e8, 1e15) == pytest.approx(0.06)
    table = gpu.format_table([
        {"row": "train", "tokens_per_s": 123456.7, "mfu": 0.4123, "peak_memory_gib": 9.876, "status": "ok"},
        {"row": "decode", "tokens_per_s": 42.25, "transformers_tokens_per_s": 21.0, "vs_transformers": 2.0,
         "status": "failed", "note": "x"},
    ]).splitlines()
    assert table[0].startswith("| benchmark | tokens/s | MFU | peak memory GiB |") and len(table) == 4
    assert table[2] == "| train | 123,457 | 41.2% | 9.88 |  |  | ok |  |"
    assert table[3] == "| decode | 42.2 |  |  | 21.0 | 2.00x | failed | x |"


REPORT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_cuda" name="test_a[cuda]" time="1.0"/>
<testcase classname="tests.test_cuda" name="test_b[cuda]" time="1.0"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_train" name="test_c[cuda]" time="1.0"><error message="setup">y</error></testcase>
<testcase classname="tests.test_cuda" name="test_d[cuda]" time="0.0"><skipped message="no"/></testcase>
</testsuite></testsuites>"""


def test_parse_junit_counts_and_names_failures():
    counts = gpu_check.parse_junit(REPORT)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                      "failures": ["tests/test_cuda.py::test_b[cuda]", "tests/test_train.py::test_c[cuda]"]}
    row = gpu_check.tests_row({**counts, "seconds": 3.0, "timed_out": False, "ok": False})
    assert row["status"] == "failed" and "test_b[cuda]" in row["note"] and "1 passed, 1 failed" in row["note"]


def test_without_cuda_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


@pytest.mark.parametrize("failed_row", [False, True])
def test_exit_status_and_json_from_the_results(monkeypatch, tmp_path, capsys, failed_row):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(devices, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(devices, "allow_tf32", lambda device: "TF32 matmuls on")
    tests = {**gpu_check.parse_junit(REPORT), "failed": 0, "errors": 0, "failures": [], "seconds": 1.0,
             "timed_out": False, "ok": True}
    monkeypatch.setattr(gpu_check, "run_cuda_tests", lambda timeout_s: tests)
    rows = [{"row": "train", "tokens_per_s": 1e5, "status": "failed" if failed_row else "ok"}]
    monkeypatch.setattr(gpu, "rows", lambda device, log: rows)
    assert gpu_check.main(["--json", str(tmp_path / "out.json")]) == (1 if failed_row else 0)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["device"] == "NVIDIA H100 80GB HBM3" and [r["row"] for r in saved["rows"]] == ["pytest -m cuda tests/", "train"]
    assert "| train | 100,000 |" in capsys.readouterr().out


@pytest.mark.skipif(devices.cuda_available(), reason="checks the refusal on a machine without CUDA")
def test_make_gpu_check_refuses_without_cuda():
    """`make gpu-check` here: the one line, and make's own failure for exit status 2 (the
    installed marker is taken as up to date, so make never reinstalls the environment)."""
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "-o", ".cache/tiktoken", "gpu-check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout.strip() == ("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False); "
                                   "nothing was checked")
