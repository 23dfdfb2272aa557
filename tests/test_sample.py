"""sample.py: the CLI against greedy decoding by plain forward passes, on tiny saved models (CPU, real tokenizer)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import devices
from conftest import save_weights
from model import GPT, GPTConfig
from sample import SEPARATOR, TextStream, main, parse_args
from tokenizer import EOT_TOKEN

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
EOT_TEXT = "<|endoftext|>"


def tiny_model(seed: int, vocab_size: int = 50257) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY, vocab_size=vocab_size))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """An HF dir, and a run out_dir whose latest checkpoint holds a different model."""
    root = tmp_path_factory.mktemp("sample")
    tiny_model(0).save_pretrained(root / "hf")
    out_dir = root / "run"
    save_weights(out_dir, 2, tiny_model(1))  # older: must not be picked
    save_weights(out_dir, 5, tiny_model(2))
    return {"hf": root / "hf", "run": out_dir, "step": out_dir / "ckpt" / "step_0000005"}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """sample.main on argv, on the CPU in float32 unless argv says otherwise (the references are
    CPU fp32 forward passes; "auto" would take a GPU, or bf16 where measured faster)."""
    code = main(["--device", "cpu", "--dtype", "float32", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def samples_of(out: str) -> list[str]:
    """Split stdout into samples: each is printed followed by a newline and the separator line."""
    parts = out.split(f"\n{SEPARATOR}\n")
    assert parts[-1] == "", f"stdout does not end with a separator: {out[-80:]!r}"
    return parts[:-1]


@torch.no_grad()
def greedy_ids(model: GPT, prompt_ids: list[int], max_new_tokens: int, vocab_limit: int | None = None) -> list[int]:
    """The prompt and max_new_tokens greedy tokens, each from a forward pass over the whole text."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([ids[-model.config.block_size:]]))
        ids.append(int(logits[0, -1, :vocab_limit].argmax()))
    return ids


def greedy_text(directory: Path, enc, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> str:
    return enc.decode(greedy_ids(GPT.from_pretrained(directory).eval(), prompt_ids, max_new_tokens, **kwargs))


# ------------------------------------------------------------------ outputs


@pytest.mark.parametrize("which", ["hf", "run", "step"])
def test_greedy_output_is_the_models_greedy_generate(capsys, dirs, enc, which):
    code, out, err = run_cli(capsys, "--checkpoint", dirs[which], "--prompt", "ROMEO:", "--temperature", 0,
                             "--max_new_tokens", 12)
    assert code == 0, err
    source = dirs["hf"] if which == "hf" else dirs["step"]  # a run resolves to its latest step
    assert samples_of(out) == [greedy_text(source, enc, enc.encode_ordinary("ROMEO:"), 12)]
    assert "tokens/s" in err and "tokens/s" not in out


def test_latest_checkpoint_of_a_run_differs_from_the_older_one(capsys, dirs, enc):
    # Guards the test above: if both steps generated the same text it could not tell them apart.
    older = dirs["run"] / "ckpt" / "step_0000002"
    ids = enc.encode_ordinary("ROMEO:")
    assert greedy_text(older, enc, ids, 12) != greedy_text(dirs["step"], enc, ids, 12)


def test_default_prompt_is_endoftext_and_not_printed(capsys, dirs, enc):
    code, out, err = run_cli(capsys, "--checkpoint", dirs["hf"], "--temperature", 0, "--max_new_tokens", 8)
    assert code == 0, err
    with_eot = greedy_text(dirs["hf"], enc, [EOT_TOKEN], 8)
    assert with_eot.startswith(EOT_TEXT)
    assert samples_of(out) == [with_eot[len(EOT_TEXT):]]


def test_same_seed_repeats_and_other_seeds_differ(capsys, dirs):
    def draw(seed):
        code, out, err = run_cli(capsys, "--checkpoint", dirs["hf"], "--prompt", "Hi", "--num_samples", 2,
                                 "--max_new_tokens", 10, "--seed", seed)
        assert code == 0, err
        return samples_of(out)

    first = draw(7)
    assert len(first) == 2 and first[0] != first[1]  # one generator runs on across samples
    assert draw(7) == first
    assert draw(8) != first


def test_streaming_prints_the_same_text(capsys, dirs):
    argv = ["--checkpoint", dirs["hf"], "--prompt", "日本語 🤖", "--num_samples", 3, "--max_new_tokens", 16,
            "--seed", 3, "--temperature", 1.5]
    code, plain, err = run_cli(capsys, *argv)
    assert code == 0, err
    code, streamed, err = run_cli(capsys, *argv, "--stream")
    assert code == 0, err
    assert streamed == plain and len(samples_of(plain)) == 3


def test_text_stream_holds_back_split_characters(enc):
    text = "naïve 日本語 🤖🎉 ok"
    ids = enc.encode_ordinary(text)
    # The test only means something if some token ends inside a character.
    assert any(_invalid_utf8(enc.decode_single_token_bytes(i)) for i in ids)
    stream = TextStream(enc)
    pieces = [stream.feed([i]) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_matches_decode_on_arbitrary_tokens(enc):
    ids = torch.randint(0, enc.n_vocab, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = TextStream(enc)
    assert "".join(stream.feed([i]) for i in ids) + stream.finish() == enc.decode(ids)


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_top_k_1_equals_greedy(capsys, dirs):
    base = ["--checkpoint", dirs["hf"], "--prompt", "Once upon a time", "--max_new_tokens", 12]
    code, greedy, _ = run_cli(capsys, *base, "--temperature", 0)
    assert code == 0
    code, top1, _ = run_cli(capsys, *base, "--top_k", 1, "--temperature", 1.0, "--seed", 5)
    assert code == 0
    code, sampled, _ = run_cli(capsys, *base, "--temperature", 1.0, "--seed", 5)
    assert top1 == greedy
    assert sampled != greedy  # else top-k=1 would pass by accident


def test_top_k_at_or_past_the_vocabulary_means_all(capsys, dirs):
    """A top_k past what the engine's int64 settings hold (2**63) used to end in a traceback."""
    base = ["--checkpoint", dirs["hf"], "--prompt", "Once upon a time", "--max_new_tokens", 12, "--temperature", 1.0,
            "--seed", 5]
    code, unfiltered, err = run_cli(capsys, *base)
    assert code == 0, err
    for k in (50257, 2**63, 2**80):
        code, out, err = run_cli(capsys, *base, "--top_k", k)
        assert (code, out) == (0, unfiltered), err


def test_prompt_longer_than_block_size_is_cropped_with_a_warning(capsys, dirs, enc):
    prompt = " ".join(f"word{i}" for i in range(40))
    ids = enc.encode_ordinary(prompt)
    assert len(ids) > TINY["block_size"]
    code, out, err = run_cli(capsys, "--checkpoint", dirs["hf"], "--prompt", prompt, "--temperature", 0,
                             "--max_new_tokens", 6)
    assert code == 0, err
    assert "warning" in err and f"last {TINY['block_size']} tokens" in err
    assert samples_of(out) == [greedy_text(dirs["hf"], enc, ids[-TINY["block_size"]:], 6)]


def eot_prone_model(p_eot_logit: float = 10.0) -> GPT:
    """A model whose next-token distribution ignores its input and puts ~30% on <|endoftext|>:
    ln_f outputs a constant (weight 0) that points along wte[EOT]; other logits stay near 0."""
    model = tiny_model(3)
    with torch.no_grad():
        direction = torch.zeros(TINY["n_embd"])
        direction[0] = 1.0
        model.transformer.wte.weight[EOT_TOKEN] = direction
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(p_eot_logit * direction)  # logits = wte @ bias (tied)
    return model


def test_stop_at_eot_ends_each_sample_before_endoftext(capsys, tmp_path):
    eot_prone_model().save_pretrained(tmp_path / "eot")
    base = ["--checkpoint", tmp_path / "eot", "--prompt", "Hello", "--max_new_tokens", 30, "--seed", 0,
            "--num_samples", 2]
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    full = samples_of(out)
    assert all(EOT_TEXT in s for s in full)
    assert full[0].split(EOT_TEXT)[0] != "Hello"  # something comes before the first <|endoftext|>

    code, out, err = run_cli(capsys, *base, "--num_samples", 1, "--stop_at_eot")
    assert code == 0, err
    stopped = samples_of(out)
    # Same seed, same draws up to the first <|endoftext|>, where the sample ends unprinted.
    assert stopped == [full[0].split(EOT_TEXT)[0]]
    code, out, err = run_cli(capsys, *base, "--stop_at_eot")
    assert code == 0 and len(samples_of(out)) == 2 and EOT_TEXT not in out


def test_padded_vocab_samples_only_tokenizer_ids(capsys, tmp_path, enc):
    # vocab_size 50304 (padded to a multiple of 64) with the padding rows made the most likely
    # tokens: without restricting sampling to the tokenizer's 50257 ids, decoding would fail.
    model = tiny_model(4, vocab_size=50304)
    with torch.no_grad():
        direction = torch.zeros(TINY["n_embd"])
        direction[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)  # every position's hidden state is `direction`
        model.transformer.wte.weight[enc.n_vocab:] = 10.0 * direction
    model.save_pretrained(tmp_path / "padded")
    ids = enc.encode_ordinary("Hi")
    assert all(t >= enc.n_vocab for t in greedy_ids(model.eval(), ids, 4)[len(ids):])

    base = ["--checkpoint", tmp_path / "padded", "--prompt", "Hi", "--max_new_tokens", 8]
    code, out, err = run_cli(capsys, *base, "--temperature", 0)
    assert code == 0, err
    assert samples_of(out) == [greedy_text(tmp_path / "padded", enc, ids, 8, vocab_limit=enc.n_vocab)]
    code, out, err = run_cli(capsys, *base, "--seed", 1, "--temperature", 1.0)
    assert code == 0, err
    assert samples_of(out)[0].startswith("Hi")


# ------------------------------------------------------------------- errors


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_empty_prompt_file(capsys, dirs, tmp_path):
    empty = tmp_path / "prompt.txt"
    empty.write_text("")
    assert_one_line_error(*run_cli(capsys, "--checkpoint", dirs["hf"], "--prompt_file", empty), str(empty), "empty")


def test_missing_prompt_file(capsys, dirs, tmp_path):
    missing = tmp_path / "nope.txt"
    assert_one_line_error(*run_cli(capsys, "--checkpoint", dirs["hf"], "--prompt_file", missing), str(missing))


def test_prompt_file_is_read(capsys, dirs, enc, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("To be, or not to be\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "--checkpoint", dirs["hf"], "--prompt_file", path, "--temperature", 0,
                             "--max_new_tokens", 5)
    assert code == 0, err
    assert samples_of(out) == [greedy_text(dirs["hf"], enc, enc.encode_ordinary("To be, or not to be\n"), 5)]


@pytest.mark.parametrize("layout", ["empty_dir", "empty_ckpt_dir", "missing"])
def test_directory_without_a_checkpoint(capsys, tmp_path, layout):
    path = tmp_path / "run"
    if layout == "empty_dir":
        path.mkdir()
    elif layout == "empty_ckpt_dir":
        (path / "ckpt" / "step_0000005").mkdir(parents=True)  # no meta.json: an unfinished save
    assert_one_line_error(*run_cli(capsys, "--checkpoint", path), str(path))


def test_corrupt_weight_file(capsys, tmp_path):
    tiny_model(0).save_pretrained(tmp_path / "bad")
    weights = tmp_path / "bad" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated mid-file
    assert_one_line_error(*run_cli(capsys, "--checkpoint", tmp_path / "bad"), "model.safetensors")


def test_prompt_ids_outside_a_small_vocab(capsys, tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig(**TINY, vocab_size=100)).save_pretrained(tmp_path / "toy")
    assert_one_line_error(*run_cli(capsys, "--checkpoint", tmp_path / "toy"), "vocab_size=100")


@pytest.mark.skipif(devices.cuda_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device(capsys, dirs):
    assert_one_line_error(*run_cli(capsys, "--checkpoint", dirs["hf"], "--device", "cuda"), "CUDA")


@pytest.mark.parametrize("bad", [["--top_p", "0"], ["--top_k", "0"], ["--temperature", "-1"],
                                 ["--num_samples", "0"], ["--max_new_tokens", "-1"]])
def test_out_of_range_options_exit_2(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--checkpoint", "x", *bad])
    assert exc.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_command_line_error_has_no_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(empty)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_sample_imports_neither_train_nor_accelerate():
    code = "import sys, sample; print(sorted(m for m in ('train', 'accelerate') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_missing_tokenizer_is_one_line(dirs, tmp_path):
    (tmp_path / "empty_cache").mkdir()
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(dirs["hf"])], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"),
                               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: could not load the GPT-2 tokenizer") and "TIKTOKEN_CACHE_DIR" in proc.stderr


@pytest.mark.parametrize("extreme", [["--top_p", "1e-50"], ["--temperature", "1e-45"]])
def test_extreme_filters_keep_the_most_likely_token(capsys, dirs, extreme):
    """A nucleus smaller than any probability, or a temperature that overflows logits / T, leaves
    only the most likely token: the greedy text, never an error."""
    base = ["--checkpoint", dirs["hf"], "--prompt", "Once upon a time", "--max_new_tokens", 12, "--seed", 3]
    code, greedy, _ = run_cli(capsys, *base, "--temperature", 0)
    code, out, err = run_cli(capsys, *base, *extreme)
    assert code == 0, err
    assert out == greedy


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_a_seed_beyond_64_bits_exits_2(capsys, seed):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--checkpoint", "x", "--seed", str(seed)])
    assert exc.value.code == 2 and "--seed must be an integer in [-2**63, 2**64)" in capsys.readouterr().err


def test_a_negative_seed_is_the_same_as_its_unsigned_twin(capsys, dirs):
    base = ["--checkpoint", dirs["hf"], "--prompt", "Once upon a time", "--max_new_tokens", 8, "--temperature", 1.0]
    code, negative, err = run_cli(capsys, *base, "--seed", -1)
    assert code == 0, err
    assert run_cli(capsys, *base, "--seed", 2**64 - 1)[:2] == (0, negative)


def test_a_closed_pipe_ends_sampling_quietly(dirs):
    """`sample.py | head -c 10`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} sample.py --checkpoint {dirs['hf']} --num_samples 200 "
                          f"--max_new_tokens 20 --seed 1 --stream | head -c 10", shell=True, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "Broken" not in proc.stderr, proc.stderr
    assert len(proc.stdout) == 10
