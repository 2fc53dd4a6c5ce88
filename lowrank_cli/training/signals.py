"""SIGINT / SIGTERM during training: finish the step, save, exit with the command that resumes."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any


class StopRequest:
    """SIGINT / SIGTERM during training set a flag that the loop checks after each step.

    Ctrl-C in a terminal reaches every process of the group, and torchrun forwards it to its workers once more,
    so a signal within `grace` seconds of the first is the same request. A Ctrl-C after that raises
    KeyboardInterrupt at once (the last saved state is then what is left)."""

    def __init__(self, grace: float = 3.0) -> None:
        self.signal: str | None = None
        self.grace = grace
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal, self._first = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._first > self.grace:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
