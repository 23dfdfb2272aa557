"""The files besides config.json and the weights that make a model directory usable by the rest
of the Hugging Face ecosystem as it is (transformers' AutoTokenizer and pipeline,
lm-evaluation-harness, vLLM, an upload to the hub):

    vocab.json, merges.txt, tokenizer.json,    GPT-2's tokenizer (tokenizer.hf_tokenizer_files), when
    tokenizer_config.json,                     the model's vocabulary holds GPT-2's 50,257 tokens
    special_tokens_map.json
    generation_config.json                     bos/eos <|endoftext|> (50256)
    README.md                                  the model card: hub metadata, training facts, config

hf_weights.save_pretrained (behind GPT.save_pretrained) writes them beside the weights, so every
checkpoint train.py saves has them too (inside the checkpoint's temporary directory, so they are
published, listed in meta.json and verified with it). Nothing in this project reads them back: sample.py, eval.py and
--init_from load config.json and the weights only, so directories without these files load too.
"""

from __future__ import annotations

import json
from pathlib import Path

import atomic
from tokenizer import EOT_TOKEN, VOCAB_SIZE, hf_tokenizer_files

GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CARD_FILE = "README.md"


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
