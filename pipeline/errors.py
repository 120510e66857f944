"""User-facing errors and the wrapper that turns them into one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value, bad file). Printed as `error: <msg>`."""


def cli_entry(func: F) -> F:
    """Wrap a console-script `main`: UserError → `error: …` on stderr, exit 2, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            code = func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper  # type: ignore[return-value]
