"""The errors a user must act on, and how the command-line entry points report them.

    raise UserError(f"--out {out} already exists; choose another folder or pass --force")
    raise ConfigError(f"model.latent_dim must be at least 1, got {n}")     # a recipe key or an override

A `UserError` carries one sentence: what is wrong and what to do about it. The CLIs print it as
`error: <sentence>` and exit with code 2, without a traceback (a traceback is for our bugs, not the
user's). `ConfigError` is the kind that is about a recipe key or a command-line override
(pipeline.config raises it while loading and validating); everything else a user can fix (a missing
or damaged file, a full disk, a bad command-line flag, a checkpoint that does not fit) is a plain
`UserError`.

Both are ValueErrors, as ConfigError always was, so code that treats a bad value as a bad value (a
sample reader skipping what it cannot read) keeps doing so.
"""

from __future__ import annotations

import functools
import sys


class UserError(ValueError):
    """A problem the user must fix. The message is one sentence meant for the user."""


class ConfigError(UserError):
    """A user mistake in a recipe or an override (a key, its type or its value)."""


def exit_on_user_error(fn):
    """Decorator for CLI mains: UserError (ConfigError included) -> one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
