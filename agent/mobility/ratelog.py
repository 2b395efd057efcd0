"""Rate-limited logging for what arrives before authentication.

A refused or malformed packet costs the sender one packet; a log line per packet would let
anyone on the network fill the router's disk and slow its agent. :class:`RateLimitedLog`
writes the first line of each kind at once and then at most one line per ``interval``
seconds, saying how many like it were left out.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

#: Kinds remembered at most; kinds are fixed strings in the code, this only guards mistakes.
MAX_KINDS = 64


class RateLimitedLog:
    """At most one line per kind per ``interval`` seconds, with a count of the ones left out."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        #: Every event offered, logged or not, per kind.
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, level: int, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log ``msg % args`` under ``kind`` unless one was logged within ``interval``;
        True when a line was written."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        if kind not in self._last and len(self._last) >= MAX_KINDS:
            self._last.clear()
            self._suppressed.clear()
        left_out = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        if left_out:
            self.logger.log(level, msg + " (and %d more like it in %.0f s)", *args, left_out,
                            self.interval, **kwargs)
        else:
            self.logger.log(level, msg, *args, **kwargs)
        return True
