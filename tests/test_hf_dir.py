"""hf_dir.py: GPT-2 as a Hugging Face model directory.

Weights and config: parity with transformers' GPT2LMHeadModel both ways (a tiny random model, no
download), the config mapping, where a name points, and every error a user's files can cause,
each naming the key, field or file. CPU, float32.

The rest of the directory: every checkpoint is a complete Hugging Face model directory: GPT-2's
tokenizer (equal to tiktoken's), generation_config.json and a model card, published and verified
with the weights. One short training run on real GPT-2 tokens (configs/tiny.py, 4 steps) serves
every test of those files."""

import json
import os
import shutil

# Nothing here may reach the hub; set before transformers/huggingface_hub read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import checkpoints
import hf_dir
import sample
import train
from conftest import TINY as TINY_CONFIG, assert_one_line_error, latest, run_command
from documents import read_shakespeare, shakespeare_play_files
from engine import Engine
from model import GPT, GPTConfig
from sampling import SamplingParams
from test_model import TINY, perturb_, random_ids, tiny
from tokenizer import EOT_TEXT, EOT_TOKEN, gpt2_tokenizer


def tiny_hf(tied: bool, seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=TINY["vocab_size"],
        n_positions=TINY["block_size"],
        n_embd=TINY["n_embd"],
        n_layer=TINY["n_layer"],
        n_head=TINY["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(config)
    perturb_(hf, seed + 1)
    return hf.eval()


# ------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_to_ours_logits_match(tmp_path, tied, weights_file):
    hf = tiny_hf(tied)
    if weights_file == "model.safetensors":
        hf.save_pretrained(tmp_path)
    else:  # the legacy pickle layout, as older transformers wrote it
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".json"] == [weights_file]

    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.tie_embeddings is tied
    idx = random_ids(2, TINY["block_size"])
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_ours_to_hf_logits_match(tmp_path, tied):
    ours = tiny(tie_embeddings=tied)
    perturb_(ours, 1)
    ours.save_pretrained(tmp_path)

    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf.config.tie_word_embeddings is tied
    same = hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert same is tied
    idx = random_ids(2, TINY["block_size"])
    with torch.no_grad():
        logits, _ = ours(idx)
        expected = hf(idx).logits
    torch.testing.assert_close(expected, logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ config mapping


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_config_round_trips_through_config_json(tied):
    config = GPTConfig(**TINY, dropout=0.1, tie_embeddings=tied)
    assert GPTConfig(**hf_dir.config_from_hf(hf_dir.config_to_hf(config))) == config
    hf = GPT2Config(**hf_dir.config_to_hf(config))  # transformers reads the same shape from it
    assert ((hf.n_layer, hf.n_head, hf.n_embd, hf.n_positions, hf.vocab_size)
            == (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size))


@pytest.mark.parametrize("field, value", [("activation_function", "relu"), ("n_inner", 100),
                                          ("layer_norm_epsilon", 1e-6), ("scale_attn_by_inverse_layer_idx", True)])
def test_config_from_hf_refuses_what_the_model_lacks(field, value):
    hf = {**hf_dir.config_to_hf(GPTConfig(**TINY)), field: value}
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        hf_dir.config_from_hf(hf)


def test_from_pretrained_overrides_how_the_model_runs_not_its_shape(tmp_path):
    saved = tiny()
    saved.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path, attention="manual", dropout=0.25)
    assert (loaded.config.attention, loaded.config.dropout, loaded.config.n_layer) == ("manual", 0.25, TINY["n_layer"])
    with pytest.raises(ValueError, match="n_layer"):
        GPT.from_pretrained(tmp_path, n_layer=4)


def test_save_pretrained_refuses_a_model_without_biases(tmp_path):
    with pytest.raises(ValueError, match="bias=False"):
        tiny(bias=False).save_pretrained(tmp_path / "nobias")
    assert not (tmp_path / "nobias" / "model.safetensors").exists()


# ------------------------------------------------------------------ directories and errors


@pytest.mark.parametrize("name, local", [("gpt2", False), ("openai-community/gpt2", False), ("./gpt2", True),
                                         ("/abs/dir", True), ("~/models/gpt2", True), ("a/b/c", True)])
def test_is_local_path_tells_paths_from_hub_names(name, local):
    assert hf_dir.is_local_path(name) is local


def test_from_pretrained_missing_directory_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_hub_name_offline_says_pass_a_local_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # no ./gpt2 directory to find
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # not a real cache
    with pytest.raises(FileNotFoundError, match="local directory"):
        GPT.from_pretrained("gpt2")


def rewrite_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, error, key",
    [
        (lambda w: w.pop("transformer.h.1.mlp.c_fc.bias"), KeyError, "transformer.h.1.mlp.c_fc.bias"),
        (lambda w: w.update({"transformer.h.0.attn.extra": torch.zeros(2)}), KeyError, "transformer.h.0.attn.extra"),
        (
            lambda w: w.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(32, 64)}),
            ValueError,
            "transformer.h.0.attn.c_attn.weight",
        ),
    ],
    ids=["missing", "unexpected", "wrong_shape"],
)
def test_from_pretrained_names_the_bad_key(tmp_path, edit, error, key):
    tiny().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, edit)
    with pytest.raises(error, match=key.replace(".", r"\.")):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_from_pretrained_corrupt_safetensors(tmp_path, damage):
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path)



# ------------------------------------------------------------ the tokenizer, generation config and model card

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
    train.main([TINY_CONFIG, f"--data_dir={root / 'data'}", f"--out_dir={root / 'out'}", "--max_steps=4",
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
    train.main([TINY_CONFIG, f"--data_dir={data_dir}", f"--out_dir={copy}", "--init_from=resume", "--max_steps=6",
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
    assert hf_dir.MODEL_CARD_FILE == "README.md"


def test_training_without_the_tokenizer_file_stops_before_it_starts(run, tmp_path):
    """Checkpoints need GPT-2's tokenizer, so offline without its file train.py says so at once
    (one line naming TIKTOKEN_CACHE_DIR) instead of failing at its first save."""
    (tmp_path / "empty_cache").mkdir()
    proc = run_command("train.py", TINY_CONFIG, f"--data_dir={run.parent / 'data'}", f"--out_dir={tmp_path / 'out'}",
                       "--block_size=32", env_extra={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"),
                                                     "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "could not load the GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR")
    assert not checkpoints.list_checkpoints(tmp_path / "out") and "loss" not in proc.stdout + proc.stderr, proc.stdout


def test_loading_reads_each_weight_from_the_file_once_when_it_is_copied(tmp_path):
    """read_weights hands load_hf_state_dict a lazy view of model.safetensors: each tensor is read
    when it is copied, once, so loading never holds a second whole copy of the model."""
    model = tiny()
    perturb_(model, seed=1)
    model.save_pretrained(tmp_path)
    weights = hf_dir.read_weights(tmp_path)
    assert isinstance(weights, hf_dir.SafetensorsWeights)
    assert sorted(weights) == sorted(load_file(str(tmp_path / "model.safetensors")))
    reads = []

    class Counted(hf_dir.SafetensorsWeights):
        def __getitem__(self, name):
            reads.append(name)
            return super().__getitem__(name)

    fresh = tiny(seed=2)
    hf_dir.load_hf_state_dict(fresh, Counted(tmp_path / "model.safetensors"))
    assert reads and len(reads) == len(set(reads))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KeyError):
        weights["not.a.weight"]
