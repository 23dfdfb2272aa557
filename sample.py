"""Generate text from a trained checkpoint or a Hugging Face GPT-2 directory.

    python sample.py --checkpoint out/small --prompt "ROMEO:" --num_samples 3 --max_new_tokens 200
    python sample.py --checkpoint path/to/gpt2 --prompt_file prompt.txt --temperature 0.8 \\
        --top_p 0.95 --seed 7 --stream

--checkpoint is a training out_dir (its latest checkpoint), one checkpoint directory
(out_dir/ckpt/step_XXXXXXX) or a Hugging Face GPT-2 directory; checkpoints.load_for_inference
resolves and loads it (a damaged newest checkpoint is skipped with a warning), so the model's shape is
whatever the weights say.

stdout holds only the samples, each followed by a separator line; everything else (what was
loaded, warnings, tokens/s) goes to stderr. The samples decode together as one batch on
engine.Engine (one prefill of the prompt, copied to every sample); sample i draws with a seed
derived from --seed and i, so the same seed prints the same text, streamed or not, and each
sample's text does not depend on how many others run beside it. With --stream the first
sample is printed as it is generated and each later one as soon as the one before is done.
A problem with the input (checkpoint, prompt, device, dtype) prints one `error: ...` line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time


import checkpoints
from engine import Engine
from sampling import SamplingError, SamplingParams
from errors import OptionError, exit_status, read_user_text
from model import GPT
from tokenizer import EOT_TOKEN, TextStream, gpt2_tokenizer

SEPARATOR = "-" * 40
MAX_BATCH = 16  # samples decoded together at most (each holds a block_size KV cache)


# ------------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (argv without the program name; None: sys.argv[1:]).

    Out-of-range numbers exit with status 2 through argparse, naming the option.
    """
    p = argparse.ArgumentParser(description="Generate text from a GPT-2 checkpoint.")
    checkpoints.add_model_args(p, decoding=True)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text to continue (default: <|endoftext|> alone)")
    prompt.add_argument("--prompt_file", default=None, help="a UTF-8 file whose text to continue")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=1.0, help="0 picks the most likely token (greedy)")
    p.add_argument("--top_k", type=int, default=None,
                   help="sample only among the k most likely tokens (k at or past the vocabulary: all)")
    p.add_argument("--top_p", type=float, default=None,
                   help="sample only among the most likely tokens holding this much probability (nucleus)")
    p.add_argument("--seed", type=int, default=None,
                   help="same seed, same text: a 64-bit integer, signed or unsigned (default: a random seed, reported)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--stop_at_eot", action="store_true",
                   help="end a sample at <|endoftext|> (not printed) instead of printing it and going on")
    args = p.parse_args(argv)

    if args.num_samples < 1:
        p.error(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        p.error(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    # The sampling settings are checked where they are defined; the options carry their names.
    # (--max_new_tokens 0 prints the prompts alone: the engine never sees it.)
    try:
        args.params = SamplingParams(max_tokens=max(args.max_new_tokens, 1), temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                     stop_token_ids=(EOT_TOKEN,) if args.stop_at_eot else ())
    except SamplingError as err:
        p.error(f"--{err}")
    return args


# ---------------------------------------------------------------- model, prompt


def read_prompt(prompt: str | None, prompt_file: str | None, enc) -> tuple[list[int], bool]:
    """Token ids of the prompt, and whether to print it in front of each sample.

    No prompt at all starts from <|endoftext|> (a document boundary), which is not printed.
    Text is encoded with encode_ordinary, so "<|endoftext|>" typed in a prompt is plain text.
    Raises OptionError for an empty prompt or an unreadable prompt file.
    """
    if prompt_file is not None:
        text = read_user_text(prompt_file, "prompt file", OptionError)
        if not text:
            raise OptionError(f"prompt file {prompt_file} is empty; leave out --prompt_file to start from <|endoftext|>")
    elif prompt is not None:
        text = prompt
        if not text:
            raise OptionError("--prompt is empty; leave it out to start from <|endoftext|>")
    else:
        return [EOT_TOKEN], False
    return enc.encode_ordinary(text), True


def fit_prompt(ids: list[int], model: GPT) -> list[int]:
    """Check the prompt against the model: crop it to the last block_size tokens (with a warning
    on stderr); raise OptionError if it holds an id the model's vocabulary lacks."""
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    if len(ids) > block_size:
        print(f"warning: the prompt is {len(ids)} tokens, longer than the model's context "
              f"(block_size={block_size}); keeping its last {block_size} tokens", file=sys.stderr)
        ids = ids[-block_size:]
    too_big = [i for i in ids if i >= vocab_size]
    if too_big:
        raise OptionError(f"prompt token id {too_big[0]} is outside the model's vocabulary (vocab_size={vocab_size})")
    return ids


# ------------------------------------------------------------------- generation


def run(args: argparse.Namespace) -> None:
    """Load, encode, generate args.num_samples samples to stdout; report speed on stderr."""
    enc = gpt2_tokenizer()
    prompt_ids, show_prompt = read_prompt(args.prompt, args.prompt_file, enc)
    loaded = checkpoints.load_for_inference(args, "decode")
    print(loaded.describe(), file=sys.stderr)
    model, cfg = loaded.model, loaded.model.config
    prompt_ids = fit_prompt(prompt_ids, model)
    seed = args.seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
        print(f"seed: {seed} (pass --seed to repeat)", file=sys.stderr)

    def out(text: str) -> None:
        sys.stdout.write(text)
        if args.stream:
            sys.stdout.flush()

    prompt_text = enc.decode(prompt_ids) if show_prompt else ""
    if args.max_new_tokens == 0:
        for _ in range(args.num_samples):
            out(f"{prompt_text}\n{SEPARATOR}\n")
        return
    # Sample i's text waits in pending[i] until every sample before it has been printed.
    streams = [TextStream(enc) for _ in range(args.num_samples)]
    pending: list[list[str]] = [[prompt_text] for _ in range(args.num_samples)]
    done = [False] * args.num_samples
    current = 0  # the sample being printed

    def flush() -> None:
        nonlocal current
        while current < args.num_samples:
            if args.stream or done[current]:
                out("".join(pending[current]))
                pending[current].clear()
            if not done[current]:
                return
            out(f"\n{SEPARATOR}\n")
            current += 1

    max_batch = min(args.num_samples, MAX_BATCH)
    decoding, weights = loaded.for_decoding(max_batch)
    engine = Engine(decoding, max_batch=max_batch, context_shift=True,
                    vocab_limit=enc.n_vocab if cfg.vocab_size > enc.n_vocab else None)
    print(f"decoding with {weights} weights", file=sys.stderr)
    params = dataclasses.replace(args.params, seed=seed)
    n_tokens, start = 0, time.perf_counter()
    for (_, i), _, event in engine.stream([prompt_ids], params, n=args.num_samples):
        if event.token is not None:
            n_tokens += 1
            pending[i].append(streams[i].feed([event.token]))
        else:
            pending[i].append(streams[i].finish())
            done[i] = True
        if i == current:
            flush()
    seconds = time.perf_counter() - start
    rate = n_tokens / seconds if seconds > 0 else float("nan")
    print(f"{n_tokens} tokens in {seconds:.2f} s: {rate:.1f} tokens/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 for a problem with the input)."""
    args = parse_args(argv)
    try:
        return exit_status(lambda: run(args))
    except BrokenPipeError:  # the reader went away (sample.py | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush of stdout cannot fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
