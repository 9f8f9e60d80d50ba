"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) during training: finish the current step, save it, stop.

The handler only records the signal; the loop reads it at the step boundary through the step's own all-reduce,
so every rank of a torchrun job stops after the same step even when only one was signalled. A second SIGINT
stops at once (KeyboardInterrupt), for a user who does not want to wait for the save.
"""

from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """The run stopped on a signal after saving a resumable checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved {checkpoint}")


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set `signum` instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
