"""`python bench.py eval`: HellaSwag examples/s at small.py's shape and GPT-2 124M (needs `make hellaswag`).
Figures: docs/benchmarks.md#evaluation-python-benchpy-eval-2026-11-26-zen-5."""

from __future__ import annotations

import time

import torch

from benchmarks.common import GPT2_124M, ROOT, cpu_name, print_auto_precision, small_shape

HELP = "HellaSwag examples/s at small.py's shape and GPT-2 124M"


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--examples", type=int, default=200, help="examples scored at small.py's shape (default: 200)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (default: 16)")


def run(examples: int = 200, batch_size: int = 16) -> None:
    """HellaSwag examples/s (4 choices each, batched) at small.py's shape and GPT-2 124M, with the
    real validation examples when `make hellaswag` has fetched them, fp32 and (where native) bf16."""
    import scoring
    from devices import autocast
    from model import GPT, GPTConfig
    from precision import native_bf16
    from tokenizer import gpt2_tokenizer

    data = ROOT / "data" / "hellaswag"
    if not data.is_dir():
        print(f"eval benchmark: skipped, {data} is missing: run `make hellaswag` first")
        return
    enc = gpt2_tokenizer()
    chosen = scoring.load_hellaswag(data, enc, examples)
    tokens = sum(len(e.query) + len(c) for e in chosen for c in e.choices)
    print(f"eval benchmark: {len(chosen)} HellaSwag validation examples ({tokens / len(chosen) / 4:.0f} tokens per "
          f"sequence on average), batches of {batch_size} sequences, {torch.get_num_threads()} threads on {cpu_name()}")
    print_auto_precision("batched", {"small.py": small_shape(), "GPT-2 124M": GPT2_124M})
    print("\n| shape | dtype | examples/s | acc_norm (random weights: chance is 0.25) |")
    print("|---|---|---|---|")
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(torch.device("cpu")) else [])
    for name, shape, n in (("small.py", small_shape(), len(chosen)), ("GPT-2 124M", GPT2_124M, min(len(chosen), 50))):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape)).eval()
        for dtype in dtypes:
            context = autocast(torch.device("cpu"), dtype)
            scoring.score_choices(model, chosen[:4], batch_size, torch.device("cpu"), context)  # warm-up
            start = time.perf_counter()
            scores = scoring.score_choices(model, chosen[:n], batch_size, torch.device("cpu"), context)
            rate = n / (time.perf_counter() - start)
            _, _, correct_norm = scoring.hellaswag_counts(scores, chosen[:n])
            print(f"| {name} ({n} examples) | {str(dtype)[6:]} | {rate:.1f} | {correct_norm / n:.3f} |", flush=True)
