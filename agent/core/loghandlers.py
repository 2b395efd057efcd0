"""Log handlers that survive a full or read-only run directory.

The agent logs to ``<run>/<router>.log`` and to stderr, which is the node's daemon log
``<run>/<router>.out``: both live in the run directory. Python's handlers, when a write
fails, print a traceback to stderr for every record (with the disk full, that is a write
that fails again) and :class:`logging.FileHandler` lets an ``open`` that fails escape into
the code that logged. These handlers instead:

* never raise into the caller (a log line must not stop a binding from being served);
* say once, in words, what is wrong (``the run directory is full``), on the other channel
  (raw ``write(2)`` to stderr, itself allowed to fail), then at most every
  ``report_every`` seconds with the count of records dropped;
* stop trying for ``retry_after`` seconds after a failure (no syscall storm), then try
  again, and say when writing works again and how many records were lost.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from agent.core.runfiles import REASONS

#: Seconds between two tries of a handler whose writes fail.
RETRY_AFTER = 5.0
#: Seconds between two notices of one handler's failing writes.
REPORT_EVERY = 60.0


def _raw_stderr(text: str) -> None:
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass


class GuardedMixin:
    """``emit`` that drops records, rate-limited and counted, while the stream fails."""

    retry_after: float = RETRY_AFTER
    report_every: float = REPORT_EVERY

    def _guard_init(self, what: str, clock: Callable[[], float] | None,
                    report: Callable[[str], None] | None) -> None:
        self.what = what
        self.clock = clock or time.monotonic
        self.report = report or _raw_stderr
        self.failing = False
        self.dropped = 0
        self.failures = 0
        self._retry_at = 0.0
        self._reported_at: float | None = None
        self._error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        now = self.clock()
        if self.failing and now < self._retry_at:
            self.dropped += 1
            return
        self._error = None
        try:
            super().emit(record)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - FileHandler's open escapes its own guard
            self._error = exc
        if self._error is None:
            if self.failing:
                self.failing = False
                self.report(f"{self.what}: writing again; {self.dropped} log records were lost\n")
                self.dropped = 0
            return
        self._failed(now)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """Called by ``StreamHandler.emit`` inside its ``except``: remember, never print."""
        self._error = sys.exc_info()[1] or RuntimeError("log write failed")

    def _failed(self, now: float) -> None:
        exc = self._error
        self.failures += 1
        self.dropped += 1
        first = not self.failing
        self.failing = True
        self._retry_at = now + self.retry_after
        self._drop_stream()
        if first or self._reported_at is None or now - self._reported_at >= self.report_every:
            self._reported_at = now
            errno_ = getattr(exc, "errno", None)
            reason = REASONS.get(errno_ or 0, "cannot write")
            self.report(f"{self.what}: {reason} ({exc}); log records are dropped, "
                        f"{self.dropped} so far; the agent keeps serving\n")

    def _drop_stream(self) -> None:
        """Forget bytes a failed flush left buffered (reopened on the next try)."""


class GuardedFileHandler(GuardedMixin, logging.FileHandler):
    """A log file (0600 from creation, never through a symbolic link) that a full or
    read-only run directory cannot turn into a crash or a flood."""

    def __init__(self, path: os.PathLike[str] | str, *, clock: Callable[[], float] | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        logging.FileHandler.__init__(self, path, mode="a", encoding="utf-8", delay=True)
        self._guard_init(f"agent log {path}", clock, report)

    def _open(self) -> Any:
        fd = os.open(self.baseFilename,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def _drop_stream(self) -> None:
        stream, self.stream = self.stream, None  # type: ignore[assignment]
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # its buffer goes with it


class GuardedStreamHandler(GuardedMixin, logging.StreamHandler):
    """stderr (the node's daemon log) with the same guard; the notice goes to the other
    channel, the agent's log, when given."""

    def __init__(self, stream: Any = None, *, clock: Callable[[], float] | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        logging.StreamHandler.__init__(self, stream if stream is not None else sys.stderr)
        self._guard_init("agent stderr", clock, report)


__all__ = ["GuardedFileHandler", "GuardedStreamHandler", "RETRY_AFTER", "REPORT_EVERY"]
