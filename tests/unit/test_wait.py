"""agent.core.wait: the one deadline loop."""

from __future__ import annotations

import asyncio

import pytest

from agent.core.wait import WaitTimeout, async_wait_until, wait_until
from fakeclock import FakeClock


def test_returns_the_first_truthy_value() -> None:
    clock = FakeClock(0.0)
    values = iter([0, None, "", 7, 8])
    got = wait_until(lambda: next(values), 10, clock=clock, sleep=clock.advance)
    assert got == 7
    assert clock() == pytest.approx(3 * 0.05)


def test_times_out_with_what_and_last_value() -> None:
    clock = FakeClock(0.0)
    with pytest.raises(WaitTimeout) as err:
        wait_until(lambda: [], 1.0, interval=0.3, what="bindings", clock=clock, sleep=clock.advance)
    assert "bindings not within 1s" in str(err.value)
    assert err.value.last == []
    assert isinstance(err.value, TimeoutError)


def test_checks_once_more_at_the_deadline() -> None:
    clock = FakeClock(0.0)
    # True only once the whole timeout has passed: the last try must see it.
    got = wait_until(lambda: clock() >= 1.0, 1.0, interval=0.4, clock=clock, sleep=clock.advance)
    assert got is True


def test_async_accepts_coroutine_predicates() -> None:
    calls = []

    async def ready() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert asyncio.run(async_wait_until(ready, 5, interval=0)) is True
    assert len(calls) == 3


def test_async_times_out() -> None:
    with pytest.raises(WaitTimeout):
        asyncio.run(async_wait_until(lambda: False, 0.05, interval=0.01, what="never"))
