"""User-facing errors and the one-line error convention shared by every command-line entry point."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from difflib import get_close_matches
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong layout). Reported as one line, exit code 2."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def choice_error(what: str, value: str, choices: Iterable[str]) -> UserError:
    """UserError naming the bad value, the closest valid one and all valid choices."""
    choices = sorted(choices)
    return UserError(f"unknown {what} {value!r}{did_you_mean(value, choices)}; valid: {', '.join(choices)}")


def cli_entry(main: F) -> F:
    """Wrap a command-line `main` so UserError prints one line on stderr and exits with its code, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
