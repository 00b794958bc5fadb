"""Stopping training cleanly at a signal: Ctrl-C (SIGINT) or SIGTERM (`kill`, a job
scheduler's notice).

While `fit` runs, the first such signal only sets a flag: the loop finishes its step, saves a
checkpoint and stops with TrainingInterrupted, whose exit code is the shell's for the signal
(128 + its number: 130, 143); in the last step the run just finishes, as it was about to.
A second signal stops at once (KeyboardInterrupt): whatever was being written is a
temporary that never replaces a complete file. Across processes the flag rides on the
loss's all-reduce, so every process stops after the same step.

The handlers are installed only in the main thread (Python delivers signals there), and the
ones they replaced are put back when training ends. A signal that was ignored (SIG_IGN: a
SIGINT under `nohup` or `cmd &` in a shell without job control) stays ignored: whoever
started the process asked for that.
"""

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """A context manager: while inside, the first SIGINT or SIGTERM is recorded in
    `signal` (its number; None: none came) instead of stopping the program."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def votes(self) -> list[float]:
        """This process's [SIGINT, SIGTERM] votes (0 or 1 each), to be summed across
        processes; `exit_code` reads the sums."""
        return [float(self.signal == s) for s in SIGNALS]

    @staticmethod
    def exit_code(votes: list[float]) -> int:
        """The shell's exit code for the signals `votes` count: 143 if any process got a
        SIGTERM (the one a scheduler sends), else 130."""
        return 128 + (signal.SIGTERM if votes[1] > 0 else signal.SIGINT)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # the second one: the user means it
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
