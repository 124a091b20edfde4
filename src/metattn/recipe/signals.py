"""Ctrl-C (and SIGTERM, what schedulers and ``timeout`` send): finish the current step,
checkpoint, then stop; a second signal stops at once."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any


class StopRequest:
    """Inside ``with StopRequest() as stop``, SIGINT and SIGTERM set ``stop.requested``
    instead of ending the process (a second one raises KeyboardInterrupt). The handlers are
    installed from the main thread only, and restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc: object) -> bool:
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False
