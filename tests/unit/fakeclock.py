"""A clock the agents' role logic reads instead of time.time / time.monotonic."""

from __future__ import annotations


class FakeClock:
    """Returns ``now``; tests move it with :meth:`advance`."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
