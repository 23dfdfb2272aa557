"""The one family of errors a user can fix, so every command catches them in one place.

Each command's `main` catches `UserError`, prints `error: <message>` on one line and exits 2;
anything else is a bug and keeps its traceback. A diverged run raises `DivergenceError`, which
is not a `UserError`: it exits 1, so scripts can tell "fix your input" from "the run blew up".
"""

from __future__ import annotations

import sys
from pathlib import Path
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


class OptionError(UserError):
    """An option of a command that runs a model (sample.py, eval.py, serve.py): the prompt, the
    device, the dtype."""


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


def read_user_text(path: str | Path, what: str, error: type[UserError]) -> str:
    """The UTF-8 text of a file the user named; `what` says which (e.g. "prompt file"). Raises
    `error` naming it and the path when the file does not exist, is not UTF-8 or cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from None
