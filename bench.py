"""Benchmarks, one module per section in benchmarks/; they print the figures in docs/benchmarks.md.

    python bench.py data     # prepare_data.py throughput against single-threaded tiktoken, and its peak memory
    python bench.py train    # training tokens/s and MFU, this GPT vs transformers' GPT2LMHeadModel; peak memory
    python bench.py head     # the loss head alone: full vs chunked, over chunk sizes
    python bench.py sample   # batch-1 decode tokens/s, ours vs transformers' generate, fp32 and bf16 weights
    python bench.py serve    # serve.py under 1/4/16 concurrent streaming clients; batched decode vs transformers
    python bench.py eval     # HellaSwag examples/s (needs `make hellaswag`)
    python bench.py optimizer  # one optimizer step, AdamW vs Muon + AdamW, at small.py's shape and GPT-2 124M
    python bench.py gpu      # GPU only: 124M training tokens/s and MFU, decoding vs transformers (make gpu-check)
    python bench.py lora     # full fine-tune vs LoRA rank 8 at 124M and gpt2-medium (needs data/shakespeare)
    python bench.py          # every section
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import data, eval, gpu, head, lora, optimizer, sample, serve, train

# Section name -> its module (HELP, add_arguments(parser), run(**options)), in the order
# `python bench.py` runs them.
SECTIONS = {"data": data, "train": train, "head": head, "sample": sample, "serve": serve, "eval": eval,
            "optimizer": optimizer, "lora": lora, "gpu": gpu}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per section, with that section's options."""
    parser = argparse.ArgumentParser(description="Benchmarks; with no section, every section runs with its defaults.")
    sections = parser.add_subparsers(dest="section", metavar="SECTION")
    for name, module in SECTIONS.items():
        module.add_arguments(sections.add_parser(name, help=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.section is None:
        for module in SECTIONS.values():
            module.run()
    else:
        options = {k: v for k, v in vars(args).items() if k != "section"}
        SECTIONS[args.section].run(**options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
