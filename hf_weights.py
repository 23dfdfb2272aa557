"""GPT-2 weights in the Hugging Face layout (the directory transformers' GPT2LMHeadModel reads and
writes): config.json <-> GPTConfig, the weight names and the Conv1D transposes, reading and
writing model.safetensors, and where a name points (a local directory or a hub name).

    config.json          config_from_hf / config_to_hf
    model.safetensors    read_weights (also the legacy pytorch_model.bin, never unpickling code),
                         load_hf_state_dict / to_hf_state_dict, save_pretrained
    the other files      hf_extras.py (tokenizer, generation_config.json, model card)

`GPT.from_pretrained` and `GPT.save_pretrained` call into this module; it never imports model.py
(model.py imports it inside those two methods), so it works on any module with GPT's parameter
names and a `config` with GPTConfig's fields. torch is imported inside the functions that need
it, so prepare_data.py can use `is_local_path` without loading torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import atomic
import hf_extras
from tokenizer import EOT_TOKEN

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


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in directory's model.safetensors, else its pytorch_model.bin (read
    with weights_only=True). Raises ValueError naming an unreadable file, FileNotFoundError when
    neither exists."""
    import torch

    safetensors_file = directory / WEIGHT_FILES[0]
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_file))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read weights from {safetensors_file}: {err}") from err
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


def load_hf_state_dict(model, hf_state: dict[str, torch.Tensor]) -> None:
    """Copy a Hugging Face GPT-2 state dict into `model` (a GPT), checking every key and shape.
    Raises KeyError naming a missing or unexpected weight, ValueError naming a wrongly shaped one."""
    import torch

    # Checkpoints saved from GPT2LMHeadModel prefix keys with "transformer."; GPT2Model doesn't.
    hf = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    original_name = {k.removeprefix("transformer."): k for k in hf_state}
    expected = set()
    for key, param in model.state_dict().items():
        hf_key = key.removeprefix("transformer.")
        expected.add(hf_key)
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # may be stored or not; the tied wte is what counts
        if hf_key not in hf:
            raise KeyError(f"weight {key!r} is missing from the checkpoint")
        tensor = hf[hf_key]
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        if tensor.shape != param.shape:
            raise ValueError(f"weight {key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                             f"the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
    unexpected = sorted(original_name[k] for k in hf if k not in expected and not k.endswith(IGNORED_SUFFIXES))
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
    files that make the directory complete for the rest of the ecosystem (hf_extras.py: GPT-2's
    tokenizer, generation_config.json, a model card).

    model: a GPT. state_dict: its state dict, or an equivalent one gathered elsewhere (e.g. the full
    weights of a sharded run); defaults to model.state_dict(). training: the trainer's facts for
    the model card (see hf_extras.extra_files). Each file is published with atomic.atomic_path
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
    hf_extras.write_extras(directory, hf_config, sum(t.numel() for t in weights.values()), training)
