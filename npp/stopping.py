"""How a training process stops on SIGINT/SIGTERM: inside the loop at the next checkpoint, outside it at once.

Inside the loop a signal is only remembered: the trainer finishes the step in flight, learns in its next
all-reduce whether any rank saw one, and checkpoints that step on every rank before it returns.
"""

from __future__ import annotations

import os
import signal
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Within `with`, SIGINT and SIGTERM set `signum` instead of ending the process; the handlers in force
    before are restored on leaving. `signum` stays set afterwards: the process exits with 128 + it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum


def end_lone_process_on_sigterm() -> None:
    """Outside the training loop, SIGTERM ends a lone process through its `finally` blocks and exit hooks: the
    partial export is removed and the run's lock given back. Not with several ranks: a rank waiting in a
    collective would never see the exception."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        signal.signal(signal.SIGTERM, _end_on_signal)


def _end_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
