"""precision.py: what "auto" precision picks from measured fp32/bf16 rates, the emulated-bf16 skip,
the on-disk cache of rates, and what train.py says and does with the choice."""

import json

import pytest
import torch

import precision
import train
import train_config
from precision import Bf16Speed, Workload

from conftest import VOCAB, tiny_args

CPU = torch.device("cpu")
SMALL = Workload("batched", n_embd=128, n_layer=4, vocab_size=50257)


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch, tmp_path):
    """Each test starts as a new process would: nothing measured yet, its own cache directory."""
    monkeypatch.setattr(precision, "_measured", {})
    monkeypatch.setenv(precision.CACHE_DIR_ENV, str(tmp_path / "cache"))


def fake_matmuls(seconds_per_gflop: dict, noisy_call: int | None = None):
    """A fake clock and a make_call whose calls advance it by their FLOPs times the dtype's
    seconds per GFLOP; call number `noisy_call` (counting every call) takes 50x longer."""
    now, calls = [0.0], []

    def make_call(shape, dtype):
        rows, n_in, n_out = shape

        def call():
            calls.append(dtype)
            slow = 50 if len(calls) == noisy_call else 1
            now[0] += slow * seconds_per_gflop[dtype] * 2 * rows * n_in * n_out / 1e9
        return call

    return make_call, (lambda: now[0]), calls


@pytest.mark.parametrize("bf16_time, picks_bf16", [(0.5, True), (1 / 1.1, False), (1.4, False)])
def test_auto_picks_bf16_only_where_it_measured_clearly_faster(bf16_time, picks_bf16):
    make_call, clock, calls = fake_matmuls({torch.float32: 1.0, torch.bfloat16: bf16_time}, noisy_call=4)
    speed = precision.measure_bf16(SMALL, make_call=make_call, timer=clock)
    assert speed.fp32 == pytest.approx(1e9) and speed.ratio == pytest.approx(1 / bf16_time)  # the slow call ignored
    assert speed.bf16_wins is picks_bf16
    # every shape: a warm-up of each, then the dtypes in turn
    assert calls[:2] == [torch.float32, torch.bfloat16] and calls[2:6] == [torch.float32, torch.bfloat16] * 2


def test_real_timing_runs_in_both_dtypes():
    speed = precision.measure_bf16(Workload("batched", n_embd=64, n_layer=1, vocab_size=256), reps=2)
    assert speed.fp32 > 0 and speed.bf16 > 0 and speed.source == "measured"


def test_emulated_bf16_is_not_timed_and_auto_picks_fp32(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)

    def measure(workload):
        raise AssertionError("timed bf16 on a CPU that emulates it")

    assert precision.bf16_speed(SMALL, CPU, measure=measure) is None
    assert precision.mixed_precision("auto", CPU, SMALL) == (
        "no", "mixed_precision=auto -> no (bf16 is emulated on this cpu: no AVX512-BF16 or AMX)")
    assert precision.resolve_dtype("auto", CPU, SMALL) == torch.float32
    setting, warning = precision.mixed_precision("bf16", CPU, SMALL)
    assert setting == "bf16" and warning.startswith("warning: mixed_precision=bf16 on a cpu without native bf16")


def counting(fp32: float, bf16: float):
    measured = []

    def measure(workload):
        measured.append(workload)
        return Bf16Speed(fp32, bf16)
    return measure, measured


def test_cache_hit_stale_key_and_damaged_file(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    path = tmp_path / "cache" / "precision.json"
    measure, measured = counting(2e9, 1.4e9)

    first = precision.bf16_speed(SMALL, CPU, measure=measure)
    assert len(measured) == 1 and first.source == "measured" and first.ratio == pytest.approx(0.7)
    assert precision.bf16_speed(SMALL, CPU, measure=measure) is first and len(measured) == 1  # once per process
    saved = json.loads(path.read_text())
    assert saved["key"] == precision.machine_key() and saved["key"]["torch"] == torch.__version__

    monkeypatch.setattr(precision, "_measured", {})  # a new process: read from the file, not timed
    again = precision.bf16_speed(SMALL, CPU, measure=measure)
    assert len(measured) == 1 and again.source == str(path) and again.ratio == pytest.approx(0.7)
    assert precision.mixed_precision("auto", CPU, SMALL)[1] == (
        f"mixed_precision=auto -> no (bf16 0.70x fp32 on this cpu, measured earlier: {path})")

    saved["key"]["torch"] = "0.0.1"  # another torch (or CPU): stale, measured again and replaced
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(precision, "_measured", {})
    assert precision.bf16_speed(SMALL, CPU, measure=measure).source == "measured" and len(measured) == 2
    assert json.loads(path.read_text())["key"] == precision.machine_key()

    for damaged in (b"\xff\x00 not json", b'{"key": 1, "rates": []}', json.dumps(
            {"key": precision.machine_key(), "rates": {SMALL.key(): {"fp32": "fast", "bf16": 0}}}).encode()):
        path.write_bytes(damaged)
        monkeypatch.setattr(precision, "_measured", {})
        assert precision.bf16_speed(SMALL, CPU, measure=measure).source == "measured"
    assert len(measured) == 5 and SMALL.key() in json.loads(path.read_text())["rates"]


def test_a_cache_that_cannot_be_written_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    (tmp_path / "a_file").write_text("not a directory")
    measure, measured = counting(1e9, 2e9)
    speed = precision.bf16_speed(SMALL, CPU, measure=measure, cache=tmp_path / "a_file" / "precision.json")
    assert speed.bf16_wins and len(measured) == 1
    monkeypatch.setenv(precision.CACHE_DIR_ENV, "")  # none at all
    assert precision.cache_path() is None
    monkeypatch.delenv(precision.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert precision.cache_path() == tmp_path / "xdg" / "gpt2-accelerate" / "precision.json"


def seed_cache(workload: Workload, fp32: float, bf16: float) -> None:
    """Rates in the cache file as an earlier process would have left them."""
    path = precision.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": precision.machine_key(),
                                "rates": {workload.key(): {"fp32": fp32, "bf16": bf16}}}))


def tiny_workload() -> Workload:
    cfg = train_config.load_config(tiny_args("unused", "unused"))
    return Workload("batched", cfg.model.n_embd, cfg.model.n_layer, VOCAB)


def test_train_start_line_says_what_auto_measured(monkeypatch, tmp_path, data_dir, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    seed_cache(tiny_workload(), fp32=1e9, bf16=0.7e9)
    train.main(tiny_args(data_dir, tmp_path / "run", "--mixed_precision=auto", "--max_steps=1"))
    out = capsys.readouterr().out
    assert "mixed_precision=auto -> no (bf16 0.70x fp32 on this cpu, measured earlier: " in out
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["mixed_precision"] == "no"


def test_explicit_bf16_is_honoured_with_a_warning_when_it_measured_slower(monkeypatch, tmp_path, data_dir, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    seed_cache(tiny_workload(), fp32=1e9, bf16=0.7e9)
    _, progress = train.main(tiny_args(data_dir, tmp_path / "run", "--mixed_precision=bf16", "--max_steps=2"))
    out = capsys.readouterr().out
    assert "warning: mixed_precision=bf16 runs at 0.70x fp32's speed on this cpu" in out
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["mixed_precision"] == "bf16"
    assert progress["step"] == 2
