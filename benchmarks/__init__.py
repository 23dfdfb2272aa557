"""The benchmark sections behind docs/benchmarks.md, one module each; bench.py runs them.

Each section module has HELP (its one-line description), add_arguments(parser) (its options)
and run(**options) (the benchmark, every option with its default: `python bench.py` calls it
with none)."""
