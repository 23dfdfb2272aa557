"""The GPT-2 BPE tokenizer, loaded through tiktoken, with an error that says how to fix it offline.

tiktoken's "r50k_base" has exactly GPT-2's ranks and <|endoftext|> (50256) and is a single
file, so it is what we load. tiktoken looks for that file in TIKTOKEN_CACHE_DIR, downloading
it on first use. If TIKTOKEN_CACHE_DIR is unset and this project has a `.cache/tiktoken`
folder (the Makefile fills it from ../shared/tiktoken_cache when that exists), that folder is
used, so a machine without internet works after `make`.

`hf_tokenizer_files` turns the same ranks into the files transformers' AutoTokenizer reads
(vocab.json, merges.txt, tokenizer.json...), which every checkpoint carries (hf_extras.py).
"""

from __future__ import annotations

import codecs
import json
import os
from functools import lru_cache
from pathlib import Path

import tiktoken

from errors import TokenizerError

ENCODING_NAME = "r50k_base"  # byte-identical ranks to tiktoken's "gpt2"
EOT_TOKEN = 50256  # <|endoftext|>
VOCAB_SIZE = 50257
PROJECT_CACHE = Path(__file__).resolve().parent / ".cache" / "tiktoken"


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding. Raises TokenizerError with set-up instructions if it cannot be loaded."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and PROJECT_CACHE.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(PROJECT_CACHE)
    try:
        enc = tiktoken.get_encoding(ENCODING_NAME)
    except Exception as err:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "(unset: tiktoken's temp-dir cache)")
        raise TokenizerError(
            f"could not load the GPT-2 tokenizer (tiktoken '{ENCODING_NAME}'): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            f"TIKTOKEN_CACHE_DIR is {cache}. Either connect to the internet once so tiktoken can "
            f"download it, or point TIKTOKEN_CACHE_DIR at a folder holding the cached file "
            f"(e.g. export TIKTOKEN_CACHE_DIR=/path/to/shared/tiktoken_cache), or copy that file "
            f"into {PROJECT_CACHE}."
        ) from err
    if enc.n_vocab != VOCAB_SIZE or enc.eot_token != EOT_TOKEN:
        raise TokenizerError(
            f"tiktoken '{ENCODING_NAME}' has n_vocab={enc.n_vocab}, eot={enc.eot_token}; "
            f"GPT-2 needs {VOCAB_SIZE} and {EOT_TOKEN}"
        )
    return enc


# ------------------------------------------------ the same tokenizer as Hugging Face files

EOT_TEXT = "<|endoftext|>"


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


class TextStream:
    """Token ids in, text out, for a byte-level BPE whose tokens can split a UTF-8 character.

    Each token's bytes go through an incremental UTF-8 decoder that holds back an incomplete
    character until its last byte arrives, so the pieces joined equal enc.decode(all ids)
    (both replace undecodable bytes with U+FFFD).
    """

    def __init__(self, enc):
        self.enc = enc
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        return self.decoder.decode(b"".join(self.enc.decode_single_token_bytes(i) for i in ids))

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self.decoder.decode(b"", final=True)
