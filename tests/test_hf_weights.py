"""hf_weights.py: parity with transformers' GPT2LMHeadModel both ways (a tiny random model, no
download), the config mapping, where a name points, and every error a user's files can cause,
each naming the key, field or file. CPU, float32."""

import os

# Nothing here may reach the hub; set before transformers/huggingface_hub read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import hf_weights
from model import GPT, GPTConfig
from test_model import TINY, perturb_, random_ids, tiny


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
    assert GPTConfig(**hf_weights.config_from_hf(hf_weights.config_to_hf(config))) == config
    hf = GPT2Config(**hf_weights.config_to_hf(config))  # transformers reads the same shape from it
    assert ((hf.n_layer, hf.n_head, hf.n_embd, hf.n_positions, hf.vocab_size)
            == (config.n_layer, config.n_head, config.n_embd, config.block_size, config.vocab_size))


@pytest.mark.parametrize("field, value", [("activation_function", "relu"), ("n_inner", 100),
                                          ("layer_norm_epsilon", 1e-6), ("scale_attn_by_inverse_layer_idx", True)])
def test_config_from_hf_refuses_what_the_model_lacks(field, value):
    hf = {**hf_weights.config_to_hf(GPTConfig(**TINY)), field: value}
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        hf_weights.config_from_hf(hf)


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
    assert hf_weights.is_local_path(name) is local


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
