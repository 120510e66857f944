"""Stop a long run cleanly on SIGINT (Ctrl-C, a notebook's stop button) or SIGTERM (a job
scheduler, `kill`): the first signal is only recorded, so the trainer can finish its step, save
and exit; a second one aborts at once.

    with GracefulStop() as stop:
        for step in ...:
            ...
            if stop.requested:
                save(); sys.exit(stop.exit_code())   # 130 for SIGINT, 143 for SIGTERM
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """A run stopped early because a `GracefulStop` recorded signal `signum`; the message says what
    was saved. Console scripts print the message and exit with `exit_code` (128 + signum)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager that records the first SIGINT/SIGTERM in `requested` and aborts on the second
    (KeyboardInterrupt for SIGINT, SystemExit(128 + signum) for SIGTERM).

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    context changes nothing and `requested` stays None. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def exit_code(self) -> int:
        """The shell's code for death by the recorded signal: 128 + its number (0 when none came)."""
        return 0 if self.requested is None else 128 + self.requested

    def signal_name(self) -> str:
        """'SIGINT' or 'SIGTERM' (empty when no signal came)."""
        return "" if self.requested is None else signal.Signals(self.requested).name
