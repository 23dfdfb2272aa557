"""`python bench.py head`: the loss head alone (lm_head + cross-entropy, forward + backward), the
full path against the chunked implementations over chunk sizes.
Figures: docs/benchmarks.md#training-python-benchpy-train-2026-11-26-zen-5 (its `bench.py head` table)."""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import cpu_name, time_of

HELP = "the loss head alone: full vs chunked over chunk sizes"


def add_arguments(parser) -> None:
    """The section's options; each default is run()'s."""
    parser.add_argument("--reps", type=int, default=5, help="timed runs per cell (default: 5)")


def run(reps: int = 5) -> None:
    """The loss head alone (forward + backward of lm_head + cross-entropy) at small.py's and GPT-2
    124M's shapes: the full path against both chunked implementations over chunk sizes. The
    fastest chunk sizes here are the rule in loss_head.cpu_chunk_rows."""
    import torch.nn.functional as F

    from loss_head import linear_cross_entropy

    print(f"loss head, forward + backward, ms (median of {reps}), {torch.get_num_threads()} threads on {cpu_name()}")
    impls = ["own"] + (["torch"] if hasattr(F, "linear_cross_entropy") else [])
    for rows, C in ((1024, 128), (4096, 768)):
        torch.manual_seed(0)
        h = torch.randn(rows, C, requires_grad=True)
        w = (torch.randn(50257, C) * 0.02).requires_grad_()
        y = torch.randint(0, 50257, (rows,))
        for dtype in (torch.float32, torch.bfloat16):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

            def full():
                with autocast:
                    loss = F.cross_entropy(F.linear(h, w).float(), y)
                loss.backward()

            def chunked(impl, chunk_rows):
                with autocast:
                    loss = linear_cross_entropy(h, w, y, impl=impl, chunk_rows=chunk_rows)
                loss.backward()

            cells = {"full": full}
            for impl in impls:
                for chunk_rows in (128, 256, 512, 1024):
                    cells[f"{impl} {chunk_rows}"] = lambda impl=impl, c=chunk_rows: chunked(impl, c)
            times = {}
            for name, fn in cells.items():
                fn()
                times[name] = statistics.median(time_of(fn) for _ in range(reps))
            line = "  ".join(f"{name} {1000 * t:.0f}" for name, t in times.items())
            best = min((t, n) for n, t in times.items() if n != "full")
            print(f"  {rows} x {C}, {str(dtype)[6:]:>8}: {line}  | best chunked {best[1]} = "
                  f"{times['full'] / best[0]:.2f}x the full path")
