"""A job's progress on stderr, and the signals that stop it.

A terminal gets a live bar (tqdm). Anything else (a log file, a pipe) gets one plain line every ``interval`` seconds
and a last one at the end, never carriage-return-joined redraws. ``quiet`` prints nothing. A job with nothing to
do prints no bar.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
DEFAULT_LOG_INTERVAL = 30.0


def say(msg: str) -> None:
    print(f"tokenmill: {msg}", file=sys.stderr, flush=True)


class Progress:
    def __init__(self, total: int, done: int, desc: str, unit: str, quiet: bool,
                 interval: float | None = None, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.done, self.desc, self.unit = total, done, desc, unit
        self.quiet = quiet or total == 0
        self.interval = DEFAULT_LOG_INTERVAL if interval is None else interval
        self.tty = self.stream.isatty()
        self._last = time.monotonic()
        self._postfix = ""
        self.bar = None
        if not self.quiet and self.tty:
            self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, n: int, postfix: Callable[[], str]) -> None:
        """``n`` more rows done; ``postfix()`` (rates, ETA) is only called when something is shown."""
        self.done += n
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(postfix(), refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line(postfix())

    def _line(self, postfix: str) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(f"tokenmill: {self.done}/{self.total} {self.unit}s ({pct:.1f}%), {postfix}",
              file=self.stream, flush=True)

    def close(self, postfix: Callable[[], str] | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif not self.quiet and not self.tty and postfix is not None:
            self._line(postfix())


class StopFlag:
    """What a job loop checks between steps: ``received`` is the signal number that asked it to stop, or None.
    Library callers (a Ray worker, a test) set ``received`` themselves; the CLI uses ``SignalCatcher``."""

    def __init__(self) -> None:
        self.received: int | None = None

    def set(self, signum: int = signal.SIGTERM) -> None:
        self.received = signum


class SignalCatcher(StopFlag):
    """A StopFlag that SIGINT / SIGTERM set instead of raising, so the job loop stops between steps. The CLI
    installs it around a job, in the main thread only (elsewhere it is inert: a library caller owns its signals)."""

    def __init__(self) -> None:
        super().__init__()
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in EXIT_SIGNAL:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
