"""The three real command lines in a row on a few KB of text: prepare_data -> train -> sample."""

import subprocess
import sys
from pathlib import Path


from sample import SEPARATOR

ROOT = Path(__file__).resolve().parent.parent

# A few KB of text with some repetition, so four steps of training have something to see.
LINES = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
    "NURSE: Even or odd, of all days in the year, come Lammas-eve at night shall she be fourteen.",
    "MERCUTIO: A plague o' both your houses! They have made worms' meat of me.",
    "FRIAR: These violent delights have violent ends, and in their triumph die.",
]


def run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_prepare_train_sample(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{line} ({i})" for i in range(12) for line in LINES) + "\n", encoding="utf-8")
    assert 4_000 < corpus.stat().st_size < 10_000
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"

    run("prepare_data.py", "--input", str(corpus), "--out", str(data_dir), "--val_fraction", "0.1")
    assert list(data_dir.glob("train_*.bin")) and list(data_dir.glob("val_*.bin"))

    # configs/tiny.py with windows small enough for ~200 validation tokens.
    run("train.py", "configs/tiny.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_steps=4",
        "--warmup_steps=1", "--block_size=32", "--micro_batch_size=2", "--grad_accum_steps=1",
        "--eval_interval=2", "--eval_steps=1", "--log_interval=1", "--ckpt_interval=2")
    assert (out_dir / "ckpt" / "step_0000004" / "model.safetensors").is_file()

    proc = run("sample.py", "--checkpoint", str(out_dir), "--max_new_tokens", "20", "--seed", "1")
    samples = proc.stdout.split(f"\n{SEPARATOR}\n")
    assert len(samples) == 2 and samples[1] == "", proc.stdout
    assert samples[0].strip(), "the sample printed no text"
    assert "step_0000004" in proc.stderr and "tokens/s" in proc.stderr
