"""The user-facing error: a mistake the user can fix. Console scripts print it as one line."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad path, bad value, bad file). Printed as `error: <msg>`."""
