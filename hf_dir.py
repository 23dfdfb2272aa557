"""GPT-2 as a Hugging Face model directory: the files transformers' GPT2LMHeadModel and
AutoTokenizer read and write, and what the rest of the ecosystem (pipeline, lm-evaluation-harness,
vLLM, an upload to the hub) expects beside them.

    config.json                   config_from_hf / config_to_hf (GPTConfig <-> GPT2Config's fields)
    model.safetensors             read_weights (also the legacy pytorch_model.bin, never unpickling
                                  code), load_hf_state_dict / to_hf_state_dict (names, Conv1D transposes)
    vocab.json, merges.txt,       hf_tokenizer_files: GPT-2's tokenizer built from tiktoken's ranks,
    tokenizer.json,               when the model's vocabulary holds GPT-2's 50,257 tokens
    tokenizer_config.json,
    special_tokens_map.json
    generation_config.json        bos/eos <|endoftext|> (50256)
    README.md                     model_card: hub metadata, training facts, config

resolve_dir says where a name points (a local directory or a hub name); load_pretrained and
save_pretrained read and write a whole directory. save_pretrained writes every file above, so
every checkpoint train.py saves has them (inside the checkpoint's temporary directory, so they are
published, listed in meta.json and verified with it). Nothing in this project reads the tokenizer,
generation config or card back: sample.py, eval.py and --init_from load config.json and the
weights only, so directories without those files load too.

`GPT.from_pretrained` and `GPT.save_pretrained` call into this module; it never imports model.py
(model.py imports it inside those two methods), so it works on any module with GPT's parameter
names and a `config` with GPTConfig's fields. torch is imported inside the functions that need
it, so prepare_data.py can use `is_local_path` without loading torch.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable

import atomic
from tokenizer import EOT_TEXT, EOT_TOKEN, VOCAB_SIZE, gpt2_tokenizer

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first
# from_pretrained may change how the model runs, never its shape (that comes from config.json).
OVERRIDABLE = ("dropout", "gradient_checkpointing", "attention", "loss_impl")
# The four matmul weights that GPT-2's checkpoints store as Conv1D, i.e. (in, out), transposed
# relative to nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some Hugging Face checkpoints carry (the causal mask); they hold no learned weights.
IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CARD_FILE = "README.md"


def is_local_path(name: str) -> bool:
    """Whether `name` can only mean a path on this machine: hub ids are "name" or "owner/name",
    so anything starting with ".", "/" or "~", with two or more "/", or with the platform's
    own separator is a path, whether or not it exists."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_dir(path: str | Path) -> Path:
    """The local directory holding config.json for `path`: a local directory as it is, or a hub
    name such as "gpt2" or "openai-community/gpt2" downloaded (config and weights only) when the
    hub is reachable. Raises FileNotFoundError naming the path; offline, the message says to pass
    a local directory."""
    directory = Path(path)
    if directory.is_dir():
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a Hugging Face GPT-2 directory?")
        return directory
    if directory.exists():
        raise FileNotFoundError(f"{directory} is a file; pass the directory that holds {CONFIG_FILE}")
    name = str(path)
    if is_local_path(name):
        raise FileNotFoundError(f"no such directory: {name}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=[CONFIG_FILE, *WEIGHT_FILES]))
    except Exception as err:  # offline, unknown name, no huggingface_hub: all mean "not available"
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(err).__name__}). Offline, pass a local directory holding {CONFIG_FILE} and "
            f"model.safetensors (e.g. one written by save_pretrained)."
        ) from err


class SafetensorsWeights(Mapping):
    """A model.safetensors file as a read-only mapping of names to tensors, each read from the file
    when it is asked for: loading copies one tensor at a time into the model, so it never holds a
    second copy of the whole model (gpt2-xl: 6 GB less at its peak). Raises ValueError naming the
    file when its header or a tensor cannot be read."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self._file = self._read(lambda: safe_open(str(path), framework="pt"))
        self._names = list(self._file.keys())

    def _read(self, read: Callable):
        from safetensors import SafetensorError

        try:
            return read()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read weights from {self.path}: {err}") from err

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(lambda: self._file.get_tensor(name))

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_weights(directory: Path) -> Mapping[str, torch.Tensor]:
    """The weights stored in directory's model.safetensors (SafetensorsWeights: read as they are
    asked for), else its pytorch_model.bin (read whole, with weights_only=True). Raises ValueError
    naming an unreadable file, FileNotFoundError when neither exists."""
    import torch

    safetensors_file = directory / WEIGHT_FILES[0]
    if safetensors_file.is_file():
        return SafetensorsWeights(safetensors_file)
    bin_file = directory / WEIGHT_FILES[1]
    if bin_file.is_file():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged pickle raises anything from EOFError to UnpicklingError
            raise ValueError(f"cannot read weights from {bin_file}: {err}") from err
    raise FileNotFoundError(f"{directory} holds neither {' nor '.join(WEIGHT_FILES)}")


# ------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, **overrides) -> dict:
    """GPTConfig's keyword arguments for a Hugging Face GPT-2 config.json (a dict, so this module
    needs no import of model.py: `GPTConfig(**config_from_hf(hf))`). overrides: any of
    OVERRIDABLE. Raises ValueError naming a setting this model lacks or a field not in OVERRIDABLE."""
    if set(overrides) - set(OVERRIDABLE):
        raise ValueError(f"from_pretrained can only override {sorted(OVERRIDABLE)}, "
                         f"got {sorted(set(overrides) - set(OVERRIDABLE))}")
    n_embd = hf["n_embd"]
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
    }
    for name, (value, ok) in unsupported.items():
        if value not in ok:
            raise ValueError(f"{CONFIG_FILE} field {name}={value!r} is not supported (expected one of {ok})")
    return dict(
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        dropout=hf.get("resid_pdrop", 0.0),
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    ) | overrides


def config_to_hf(config) -> dict:
    """A config.json that transformers reads as GPT2LMHeadModel of the same shape as `config`
    (a GPTConfig)."""
    has_eot = config.vocab_size > EOT_TOKEN  # a toy vocabulary has no <|endoftext|>
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        # <|endoftext|> starts and ends every document.
        "bos_token_id": EOT_TOKEN if has_eot else None,
        "eos_token_id": EOT_TOKEN if has_eot else None,
        "tie_word_embeddings": config.tie_embeddings,
    }


# ------------------------------------------------------------------------------------------ weights


def load_hf_state_dict(model, hf_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a Hugging Face GPT-2 state dict into `model` (a GPT), checking every key and shape; each
    tensor is taken from hf_state once, when it is copied (SafetensorsWeights reads it only then).
    Raises KeyError naming a missing or unexpected weight, ValueError naming a wrongly shaped one."""
    import torch

    # Checkpoints saved from GPT2LMHeadModel prefix keys with "transformer."; GPT2Model doesn't.
    original_name = {k.removeprefix("transformer."): k for k in hf_state}
    expected = set()
    for key, param in model.state_dict().items():
        hf_key = key.removeprefix("transformer.")
        expected.add(hf_key)
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # may be stored or not; the tied wte is what counts
        if hf_key not in original_name:
            raise KeyError(f"weight {key!r} is missing from the checkpoint")
        tensor = hf_state[original_name[hf_key]]
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        if tensor.shape != param.shape:
            raise ValueError(f"weight {key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
    unexpected = sorted(name for k, name in original_name.items()
                        if k not in expected and not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise KeyError(f"unexpected weight(s) in the checkpoint: {unexpected[:5]}")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """A GPT state dict under GPT2LMHeadModel's names and Conv1D layout (CPU, contiguous); a tied
    lm_head is stored once, as transformer.wte.weight."""
    out = {}
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and tie_embeddings:
            continue
        tensor = tensor.detach()
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        out[key] = tensor.contiguous().cpu()
    return out


# ------------------------------------------------------------------------------------ directories


def load_pretrained(path: str | Path, build: Callable[[dict], object], **overrides):
    """The model stored at `path` (see resolve_dir): build(GPTConfig keyword arguments) makes it,
    then its weights are loaded and checked. Raises as resolve_dir, config_from_hf, read_weights
    and load_hf_state_dict do."""
    directory = resolve_dir(path)
    model = build(config_from_hf(json.loads((directory / CONFIG_FILE).read_text()), **overrides))
    load_hf_state_dict(model, read_weights(directory))
    return model


def save_pretrained(model, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                    training: dict | None = None) -> None:
    """Write config.json and model.safetensors that transformers' GPT2LMHeadModel loads, and the
    files that make the directory complete for the rest of the ecosystem (write_extras: GPT-2's
    tokenizer, generation_config.json, a model card).

    model: a GPT. state_dict: its state dict, or an equivalent one gathered elsewhere (e.g. the full
    weights of a sharded run); defaults to model.state_dict(). training: the trainer's facts for
    the model card (see extra_files). Each file is published with atomic.atomic_path
    (temporary name, fsync, rename), so none is ever half-written.
    Raises ValueError for a model GPT-2's format cannot express (bias=False), FileExistsError for a
    path that is a dangling symlink.
    """
    from safetensors.torch import save_file

    if not model.config.bias:
        raise ValueError("GPT-2's Hugging Face format has biases everywhere; bias=False cannot be exported")
    directory = Path(path)
    if directory.is_symlink() and not directory.exists():
        raise FileExistsError(f"{directory} is a symlink to {os.readlink(directory)}, which does not exist; "
                              f"nothing is written through it: remove the link or save elsewhere")
    directory.mkdir(parents=True, exist_ok=True)
    weights = to_hf_state_dict(model.state_dict() if state_dict is None else state_dict, model.config.tie_embeddings)
    with atomic.atomic_path(directory / WEIGHT_FILES[0]) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    hf_config = config_to_hf(model.config)
    atomic.write_json(directory / CONFIG_FILE, hf_config)
    # Counted from what is written: under FSDP the model's own parameters are only this process's shard.
    write_extras(directory, hf_config, sum(t.numel() for t in weights.values()), training)


# --------------------------------------- GPT-2's tokenizer as Hugging Face files (tiktoken's ranks)


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> character map, under which every token's bytes become a
    printable string (its vocab.json keys): printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, soft hyphen...) take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token`: BPE on its bytes with only the merges ranked before it
    stops at exactly two parts (tiktoken ranks a merge by the rank of the token it makes)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
        assert best[0] < rank, f"token {rank} cannot be built from earlier merges"
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


@lru_cache(maxsize=1)
def _hf_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab.json's mapping and merges.txt's lines (without its header), from tiktoken's ranks."""
    enc = gpt2_tokenizer()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_TOKEN)}
    to_char = _byte_to_char()
    text = lambda token: "".join(to_char[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT_TOKEN
    merges = [" ".join(map(text, _merge_of(token, rank, ranks)))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return vocab, merges


@lru_cache(maxsize=1)
def _hf_tokenizer_texts() -> dict[str, str]:
    """The files of `hf_tokenizer_files` that do not depend on the model (serialised once)."""
    vocab, merges = _hf_vocab_and_merges()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    fast = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT_TOKEN, "content": EOT_TEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None,
        # ByteLevel's regex is GPT-2's pre-tokenizer pattern, the one r50k_base splits with.
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": json.dumps(fast, ensure_ascii=False) + "\n",
    }


def hf_tokenizer_files(model_max_length: int) -> dict[str, str]:
    """GPT-2's tokenizer as the files transformers' AutoTokenizer reads, {file name: text}.

    Built offline from the same ranks `gpt2_tokenizer` loads: vocab.json + merges.txt (the slow
    format), tokenizer.json (the fast one), tokenizer_config.json and special_tokens_map.json
    with <|endoftext|> (50256) as bos, eos and unk. model_max_length: the model's context in
    tokens. Such a tokenizer encodes text exactly as `encode_ordinary` does, except that a
    literal "<|endoftext|>" in the text becomes token 50256 (a special token), where
    `encode_ordinary` spells it out as ordinary text. Raises TokenizerError as gpt2_tokenizer.
    """
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode gives back the text, as tiktoken's does
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(EOT_TOKEN): {"content": EOT_TEXT, "lstrip": False, "normalized": True,
                                                  "rstrip": False, "single_word": False, "special": True}},
    }
    return {
        **_hf_tokenizer_texts(),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


# ------------------------------------------------ the generation config and the model card


def extra_files(hf_config: dict, num_params: int, training: dict | None = None) -> dict[str, str]:
    """{file name: text} of the files this module owns, for a model described by hf_config (its
    config.json), with num_params parameters. training: the trainer's facts for the model card
    (TrainState fields such as step, tokens_seen, loss, val_loss, and `train_config`, the
    effective TrainConfig as a dict); None for a model saved outside a training run."""
    gpt2_vocab = hf_config["vocab_size"] >= VOCAB_SIZE  # GPT-2's, or padded past it
    files = hf_tokenizer_files(hf_config["n_positions"]) if gpt2_vocab else {}
    # No max_length: transformers then caps generation at config.json's n_positions (the context)
    # by itself, where a max_length here would draw a warning on every call with max_new_tokens.
    generation = {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN} if gpt2_vocab else {}
    files[GENERATION_CONFIG_FILE] = json.dumps(generation, indent=2) + "\n"
    files[MODEL_CARD_FILE] = model_card(hf_config, num_params, training, gpt2_vocab)
    return files


def write_extras(directory: str | Path, hf_config: dict, num_params: int, training: dict | None = None) -> list[str]:
    """Write `extra_files` into directory, each published atomically; returns their names.
    Raises DiskFullError naming the file when the disk is full."""
    files = extra_files(hf_config, num_params, training)
    for name, text in files.items():
        atomic.write_text(Path(directory) / name, text)
    return sorted(files)


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"


def model_card(hf_config: dict, num_params: int, training: dict | None, gpt2_vocab: bool) -> str:
    """README.md with the hub's metadata header (library, tags; the license is left for the user to
    choose), what the model is, how it was trained, and how to use it."""
    shape = (f"{hf_config['n_layer']} layers, {hf_config['n_head']} heads, {hf_config['n_embd']}-wide, "
             f"a {hf_config['n_positions']:,}-token context and a {hf_config['vocab_size']:,}-token vocabulary; "
             f"{num_params / 1e6:.2f}M parameters")
    lines = [
        "---",
        "library_name: transformers",
        "# license: choose one before publishing (https://huggingface.co/docs/hub/repositories-licenses)",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt2",  # no text-generation here: pipeline_tag above already gives it
        "- gpt2-accelerate",
        "---",
        "",
        "# GPT-2 trained with gpt2-accelerate",
        "",
        f"A GPT-2 ({shape}), in the layout of transformers' `GPT2LMHeadModel`.",
        "",
    ]
    if training is not None:
        train_config = training.get("train_config", {})
        rows = [("training data", f"`{train_config.get('data_dir', '-')}`")]
        if train_config.get("init_from") not in (None, "", "scratch"):
            rows.append(("initialised from", f"`{train_config['init_from']}`"))
        rows += [
            ("optimizer steps", _number(training.get("step"))),
            ("tokens seen", _number(training.get("tokens_seen"))),
            ("train loss (last step)", _number(training.get("loss"))),
            ("val loss (last eval)", _number(training.get("val_loss"))),
            ("processes", _number(training.get("num_processes"))),
        ]
        lines += ["## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    lines += ["## Use", ""]
    if gpt2_vocab:
        lines += [
            "```python",
            "from transformers import pipeline",
            "",
            'generator = pipeline("text-generation", model="path/to/this/directory")',
            'print(generator("ROMEO:", max_new_tokens=50, do_sample=True)[0]["generated_text"])',
            "```",
            "",
            "The tokenizer is GPT-2's byte-level BPE (`<|endoftext|>` = 50256 as bos, eos and unk).",
            "It encodes text as tiktoken's `r50k_base` `encode_ordinary` does, except that a literal",
            "`<|endoftext|>` in the text becomes the special token 50256, where `encode_ordinary`",
            "spells it out as ordinary text.",
            "",
        ]
    else:
        lines += [
            f"Its {hf_config['vocab_size']:,}-token vocabulary is not GPT-2's, so no tokenizer is included:",
            "feed it the token ids it was trained on (`GPT2LMHeadModel.from_pretrained` loads it).",
            "",
        ]
    config = training.get("train_config") if training is not None else hf_config
    lines += ["## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)
