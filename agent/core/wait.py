"""Waiting for a condition with a deadline: the one helper for every "until X or N seconds".

Hand-written ``while time.monotonic() < deadline`` loops drift apart (one sleeps 10 ms, one
100 ms, one forgets the final check, one raises a bare string); these two functions are the
only such loop in MOAT. Both poll ``predicate`` until it returns something truthy, return that
value, and raise :class:`WaitTimeout` (naming what was awaited and the last value seen) when
``timeout`` passes. The predicate is always tried once more at the deadline, so a condition
that became true during the last sleep is not reported as a time-out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar, Union

from agent.core.errors import AgentError

T = TypeVar("T")


class WaitTimeout(AgentError, TimeoutError):
    """A condition did not hold within its time limit."""

    def __init__(self, what: str, timeout: float, last: object = None) -> None:
        self.what = what
        self.timeout = timeout
        self.last = last
        detail = "" if last is None else f" (last: {last!r})"
        super().__init__(f"{what} not within {timeout:g}s{detail}")


def wait_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.05,
               what: str = "condition", clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Poll ``predicate`` every ``interval`` s until it is truthy; return its value."""
    deadline = clock() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - clock()
        if left <= 0:
            raise WaitTimeout(what, timeout, value)
        sleep(min(interval, left))


async def async_wait_until(predicate: Callable[[], Union[T, Awaitable[T]]], timeout: float, *,
                           interval: float = 0.01, what: str = "condition",
                           clock: Callable[[], float] = time.monotonic) -> T:
    """:func:`wait_until` for the event loop; ``predicate`` may be a coroutine function."""
    deadline = clock() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        left = deadline - clock()
        if left <= 0:
            raise WaitTimeout(what, timeout, value)
        await asyncio.sleep(min(interval, left))
