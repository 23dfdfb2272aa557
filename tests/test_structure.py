"""The layout promises of the README, checked on the source itself: model.py holds only the model
(it imports torch and the loss head, never file helpers or the tokenizer), the modules import each
other without cycles, no function grows past a readable page and no file past a few (the benchmark
sections in benchmarks/ included), and no benchmark section imports the bench.py entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
BENCHMARKS = sorted(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py"))
MAX_FUNCTION_LINES = 70
DEFAULT_FILE_LINES = 700
MAX_FILE_LINES = {"train": 600}  # per module, where it differs from the default
MAX_CLASS_LINES = 160
MAX_GPT_LINES = 160


def source(module: str) -> Path:
    """The file of a top-level module ("train") or a package module ("benchmarks.data")."""
    return ROOT / f"{module.replace('.', '/')}.py"


def own_imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its source (top level or inside functions)."""
    tree = ast.parse(source(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_importing_model_pulls_in_no_file_or_tokenizer_module():
    code = ("import sys, model; own = {m for m in sys.modules if m in %r}; print(sorted(own))" % (MODULES,))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["loss_head", "model"]


def test_project_modules_import_each_other_without_cycles():
    graph = {m: own_imports(m) - {m} for m in MODULES}
    visiting, done = [], set()

    def visit(m):
        assert m not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(m):] + [m])}"
        if m in done:
            return
        visiting.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        visiting.pop()
        done.add(m)

    for m in MODULES:
        visit(m)


def _functions(module: str):
    tree = ast.parse(source(module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node


def test_no_function_is_longer_than_a_page():
    long = [f"{source(m).relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for m in MODULES + BENCHMARKS for n in _functions(m)
            if not isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_file_or_class_grows_past_its_cap():
    """The caps of the third structure pass (docs/internals.md, "Layout"): 700 lines a file (the
    benchmark sections included), 600 for train.py, whose loop must stay on its first screens;
    160 lines a class."""
    assert BENCHMARKS, "benchmarks/ holds the bench.py sections"
    long = [f"{source(m).relative_to(ROOT)} ({n} lines)" for m in MODULES + BENCHMARKS
            if (n := len(source(m).read_text().splitlines())) > MAX_FILE_LINES.get(m, DEFAULT_FILE_LINES)]
    assert not long, f"files over their cap ({MAX_FILE_LINES}, else {DEFAULT_FILE_LINES} lines): {long}"
    big = [f"{source(m).relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
           for m in MODULES + BENCHMARKS for n in _functions(m)
           if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > MAX_CLASS_LINES]
    assert not big, f"classes over {MAX_CLASS_LINES} lines: {big}"


def test_the_loop_opens_train_py():
    """A reader opening train.py finds the loop first: fit and train_step are its first functions."""
    tree = ast.parse(source("train").read_text())
    first = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))][:3]
    assert first[0] == "fit" and "train_step" in first, first


def test_benchmark_sections_never_import_the_entry_point():
    importing = [m for m in BENCHMARKS if "bench" in own_imports(m)]
    assert not importing, f"benchmark sections importing bench.py: {importing}"


def test_gpt_class_stays_small():
    gpt = next(n for n in _functions("model") if isinstance(n, ast.ClassDef) and n.name == "GPT")
    assert gpt.end_lineno - gpt.lineno + 1 < MAX_GPT_LINES
