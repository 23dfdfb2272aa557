"""devices.py: where train.py looks for its data, TF32, the CUDA-only decisions and measurements
asked on a CPU, and that no other module asks CUDA anything."""

import pytest
import torch

import devices
import train
from errors import ShardError

from conftest import tiny_args


def test_missing_data_directory_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(ShardError, match=r"data directory not found: .*shakespeare; make it with python "
                                         r"prepare_data.py --dataset shakespeare --out .*shakespeare"):
        train.main(tiny_args(tmp_path / "data" / "shakespeare", tmp_path / "run", "--max_steps=1"))


# ------------------------------------------------------------------- CUDA, asked in devices.py only


def test_tf32_is_turned_on_for_cuda_only_and_exact_fp32_restores_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    with devices.exact_fp32():
        assert devices.allow_tf32(cpu) is None
        assert torch.backends.cuda.matmul.allow_tf32 is False
        before = torch.backends.cuda.matmul.allow_tf32
        assert devices.allow_tf32(cuda) == "TF32 matmuls on"
        assert torch.backends.cuda.matmul.allow_tf32 is True
        with devices.exact_fp32():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
        torch.backends.cuda.matmul.allow_tf32 = before


def test_cuda_only_decisions_and_measurements_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.chunked_argmax(cpu) and not devices.chunked_argmax(cuda)
    assert devices.fp32_kv_cache(cpu) and not devices.fp32_kv_cache(cuda)
    assert devices.pin_batches(cuda) and not devices.pin_batches(cpu)
    devices.synchronize(cpu)
    devices.reset_peak_memory(cpu)
    devices.release_cached_memory(cpu)
    assert devices.peak_memory_bytes(cpu) is None
    assert devices.device_name(cpu) == "cpu"
    assert devices.cuda_available() is False or devices.cuda_version()


def test_no_module_asks_cuda_outside_devices():
    """The one device rule: `.cuda()`, `torch.cuda`, `torch.backends.cuda`, `torch.version.cuda`
    (any attribute named cuda but the `pytest.mark.cuda` marker) appear in devices.py only (and in
    this file's checks of it); strings may name CUDA."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [p for p in [*root.glob("*.py"), *root.glob("benchmarks/*.py"), *root.glob("tests/*.py")]
               if p.name not in ("devices.py", "test_devices.py")]
    found = [f"{p.relative_to(root)}:{node.lineno}" for p in sources for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Attribute) and node.attr == "cuda" and ast.unparse(node.value) != "pytest.mark"]
    assert not found, found
