"""Every checkpoint is a complete Hugging Face model directory: GPT-2's tokenizer (equal to
tiktoken's), generation_config.json and a model card, published and verified with the weights.

One short training run on real GPT-2 tokens (configs/tiny.py, 4 steps) serves every test here."""

import json
import shutil

import pytest
from accelerate.state import AcceleratorState

import checkpoints
import hf_extras
import sample
import train
from conftest import TINY, assert_one_line_error, latest, run_command
from engine import Engine
from sampling import SamplingParams
from model import GPT, GPTConfig
from documents import read_shakespeare, shakespeare_play_files
from tokenizer import EOT_TEXT, EOT_TOKEN, gpt2_tokenizer

TOKENIZER_FILES = ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
EXTRAS = sorted([*TOKENIZER_FILES, "generation_config.json", "README.md"])

# Text GPT-2's pre-tokenizer splits in every way it can: accents, CJK, emoji, combining marks,
# runs of spaces, tabs, newlines and CRLF, no-break and zero-width spaces, long digit runs,
# contractions and punctuation runs.
AWKWARD = [
    "héllo wörld, naïve café; 日本語のテキスト 🤖🚀 e\u0301 Ωμέγα Привет",
    "  two leading spaces", "trailing spaces   ", "\n\n\nthree newlines\r\n\r\ncrlf\t\ttabs \t \n mixed",
    "no\u00a0break\u2009thin\u200bzero width\u3000ideographic",
    "1234567890123456789 3.14159 1,000,000 0x1F 2024-01-01 12:00", "    ", "",
    "I'm you're we've they'll he'd it's DON'T !!!??? ... --- ===",
]
LINES = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
    "MERCUTIO: A plague o' both your houses! They have made worms' meat of me.",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory: configs/tiny.py for 4 steps on GPT-2 tokens, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("hf_run")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"{line} ({i})" for i in range(12) for line in LINES) + "\n", encoding="utf-8")
    from prepare_data import main as prepare

    assert prepare(["--input", str(corpus), "--out", str(root / "data"), "--val_fraction", "0.1"]) == 0
    train.main([TINY, f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}", "--max_steps=4",
                "--warmup_steps=1", "--block_size=32", "--micro_batch_size=2", "--grad_accum_steps=1",
                "--eval_interval=2", "--eval_steps=1", "--log_interval=1", "--ckpt_interval=2"])
    AcceleratorState._reset_state(reset_partial_state=True)
    return root / "out"


def test_checkpoint_holds_listed_tokenizer_generation_config_and_card(run):
    ckpt = latest(run)
    meta = checkpoints.verify(ckpt, need_state=True)
    for name in EXTRAS:
        assert (ckpt / name).is_file(), name
        assert name in meta["files"], name  # verified like the weights (see the damaged-file test)

    generation = json.loads((ckpt / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == EOT_TOKEN
    tokenizer_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 32
    assert all(tokenizer_config[k] == EOT_TEXT for k in ("bos_token", "eos_token", "unk_token"))

    card = (ckpt / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "library_name: transformers\n" in header and "pipeline_tag: text-generation\n" in header
    tags = [line for line in header.splitlines() if line.startswith("- ")]
    assert len(tags) == len(set(tags)) and "- text-generation" not in tags, header  # the pipeline tag once
    assert "\nlicense:" not in header  # left for the user to choose
    train_config = json.loads((ckpt / "train_config.json").read_text())
    assert f"| training data | `{train_config['data_dir']}` |" in card
    assert f"| optimizer steps | {meta['step']} |" in card
    assert f"| tokens seen | {meta['tokens_seen']:,} |" in card
    assert f"| train loss (last step) | {meta['loss']:.4f} |" in card
    assert f"| val loss (last eval) | {meta['val_loss']:.4f} |" in card
    assert json.loads(card.split("```json\n")[1].split("```")[0]) == train_config


def test_autotokenizer_encodes_as_tiktoken(run, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt = latest(run)
    enc = gpt2_tokenizer()
    plays, _ = shakespeare_play_files()
    texts = [*read_shakespeare(plays[:2]), *AWKWARD]

    slow_only = tmp_path  # what a tokenizer is built from where tokenizer.json is not read
    for name in TOKENIZER_FILES:
        if name != "tokenizer.json":
            shutil.copy(ckpt / name, slow_only / name)
    auto = AutoTokenizer.from_pretrained(ckpt)
    fast = Tokenizer.from_file(str(ckpt / "tokenizer.json"))  # as the Rust library alone reads it (TGI)
    from_vocab_and_merges = AutoTokenizer.from_pretrained(slow_only)
    assert (auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (EOT_TOKEN,) * 3
    for text in texts:
        expected = enc.encode_ordinary(text)
        assert auto(text)["input_ids"] == expected, text[:80]
        assert auto.decode(expected) == text, text[:80]
        assert fast.encode(text).ids == expected, text[:80]
        assert from_vocab_and_merges(text)["input_ids"] == expected, text[:80]
    assert sum(map(len, texts)) > 200_000

    # The one difference (documented): a literal <|endoftext|> is the special token here.
    assert auto("a<|endoftext|>b")["input_ids"] == [enc.encode_ordinary("a")[0], EOT_TOKEN, enc.encode_ordinary("b")[0]]
    assert EOT_TOKEN not in enc.encode_ordinary("a<|endoftext|>b")


def test_pipeline_generates_what_our_model_generates(run):
    from transformers import pipeline

    ckpt = latest(run)
    generator = pipeline("text-generation", model=str(ckpt), device="cpu")
    hf_text = generator("ROMEO: But soft", max_new_tokens=8, do_sample=False)[0]["generated_text"]

    enc = gpt2_tokenizer()
    prompt = enc.encode_ordinary("ROMEO: But soft")
    ours = GPT.from_pretrained(ckpt).eval()
    new = Engine(ours, max_batch=1).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert hf_text == enc.decode(prompt + new)


def test_damaged_tokenizer_file_falls_back_to_the_older_checkpoint(run, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    newest, older = checkpoints.list_checkpoints(copy)[::-1]
    tokenizer_json = newest / "tokenizer.json"
    tokenizer_json.write_bytes(tokenizer_json.read_bytes()[:1000])  # a truncated copy

    with pytest.raises(checkpoints.CheckpointError, match="tokenizer.json"):
        checkpoints.verify(newest, need_state=False)
    directory = checkpoints.load_for_inference(sample.parse_args(["--checkpoint", str(copy), "--device", "cpu",
                                                                  "--dtype", "float32"]), "decode").directory
    assert directory == older
    assert f"skipping damaged checkpoint {newest}" in capsys.readouterr().err


def test_checkpoint_without_the_extras_still_loads_and_resumes(run, tmp_path):
    """A checkpoint saved before these files existed: sampled, evaluated and resumed as before,
    and the resumed run's checkpoints have them."""
    copy = tmp_path / "out"
    shutil.copytree(run, copy)
    newest = latest(copy)
    meta = json.loads((newest / "meta.json").read_text())
    for name in EXTRAS:
        (newest / name).unlink()
        del meta["files"][name]
        meta["sha256"].pop(name)  # as a checkpoint saved before these files existed lists them
    (newest / "meta.json").write_text(json.dumps(meta))

    directory = checkpoints.load_for_inference(sample.parse_args(["--checkpoint", str(copy), "--device", "cpu",
                                                                  "--dtype", "float32"]), "decode").directory
    assert directory == newest
    data_dir = json.loads((newest / "train_config.json").read_text())["data_dir"]
    train.main([TINY, f"--data_dir={data_dir}", f"--out_dir={copy}", "--init_from=resume", "--max_steps=6",
                "--warmup_steps=1", "--block_size=32", "--micro_batch_size=2", "--grad_accum_steps=1",
                "--eval_interval=2", "--eval_steps=1", "--log_interval=1", "--ckpt_interval=2"])
    resumed = latest(copy)
    assert resumed.name == "step_0000006"
    assert all((resumed / name).is_file() for name in EXTRAS)


def test_toy_vocabulary_gets_no_tokenizer(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=100))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                          "model.safetensors"]
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {}
    card = (tmp_path / "README.md").read_text()
    assert "not GPT-2's, so no tokenizer is included" in card
    assert f"{model.num_params() / 1e6:.2f}M parameters" in card
    assert hf_extras.MODEL_CARD_FILE == "README.md"


def test_training_without_the_tokenizer_file_stops_before_it_starts(run, tmp_path):
    """Checkpoints need GPT-2's tokenizer, so offline without its file train.py says so at once
    (one line naming TIKTOKEN_CACHE_DIR) instead of failing at its first save."""
    (tmp_path / "empty_cache").mkdir()
    proc = run_command("train.py", TINY, f"--data_dir={run.parent / 'data'}", f"--out_dir={tmp_path / 'out'}",
                       "--block_size=32", env_extra={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"),
                                                     "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "could not load the GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR")
    assert not checkpoints.list_checkpoints(tmp_path / "out") and "loss" not in proc.stdout + proc.stderr, proc.stdout
