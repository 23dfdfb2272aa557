"""The GPT-2 BPE tokenizer, loaded through tiktoken, with an error that says how to fix it offline.

tiktoken's "r50k_base" has exactly GPT-2's ranks and <|endoftext|> (50256) and is a single
file, so it is what we load. tiktoken looks for that file in TIKTOKEN_CACHE_DIR, downloading
it on first use. If TIKTOKEN_CACHE_DIR is unset and this project has a `.cache/tiktoken`
folder (the Makefile fills it from ../shared/tiktoken_cache when that exists), that folder is
used, so a machine without internet works after `make`.

hf_dir.py turns the same ranks into the files transformers' AutoTokenizer reads (vocab.json,
merges.txt, tokenizer.json...), which every checkpoint carries.
"""

from __future__ import annotations

import codecs
import os
from functools import lru_cache
from pathlib import Path

import tiktoken

from errors import TokenizerError

ENCODING_NAME = "r50k_base"  # byte-identical ranks to tiktoken's "gpt2"
EOT_TOKEN = 50256  # <|endoftext|>
EOT_TEXT = "<|endoftext|>"
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
