"""The one family of errors a user can fix, so every command catches them in one place.

Each command's `main` catches `UserError`, prints `error: <message>` on one line and exits 2;
anything else is a bug and keeps its traceback. A diverged run raises `DivergenceError`, which
is not a `UserError`: it exits 1, so scripts can tell "fix your input" from "the run blew up".
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with something the user controls; the message names the thing, the value and
    the rule, on one line."""


class ConfigError(UserError, ValueError):
    """A training config value or command-line option (train.py)."""


class DataError(UserError, ValueError):
    """A corpus or a prepare_data.py option."""


class ShardError(UserError, ValueError):
    """A token shard or a data directory that cannot be trained on (the message names the file)."""


class CheckpointError(UserError):
    """A checkpoint or GPT-2 directory that is missing, damaged or does not fit the run."""


class SampleError(UserError):
    """A sample.py or eval.py option: prompt, device, dtype."""


class ServeError(UserError):
    """A serve.py option or set-up problem: the port, a missing extra."""


class TokenizerError(UserError):
    """GPT-2's tokenizer could not be loaded (offline without its cached file); the message says
    how to fix it."""


class DiskFullError(UserError, OSError):
    """A write failed because the disk (or a quota or file-size limit) is full; the partial file
    was removed."""


class DivergenceError(Exception):
    """Training produced a non-finite loss, gradient or weight; the message names the step and
    the last checkpoint whose weights are all finite."""


def exit_status(command: Callable[[], object]) -> int:
    """Run a command's body: 0 when it returns; a UserError printed as `error: <message>` on
    stderr and 2. Every command's main ends here, so user mistakes never show a traceback."""
    try:
        command()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
