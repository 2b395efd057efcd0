"""agent.mobility.ratelog: the first line of a kind at once, then one per interval with the
number left out (issue 12: a flood before authentication must not flood the log)."""

from __future__ import annotations

import logging

import pytest

from agent.mobility.ratelog import RateLimitedLog
from fakeclock import FakeClock


def test_one_line_per_kind_per_interval_with_the_number_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    logger = logging.getLogger("test.ratelog")
    limited = RateLimitedLog(logger, interval=10.0, clock=clock)
    with caplog.at_level("INFO", logger="test.ratelog"):
        written = [limited("refused", logging.INFO, "refused %s", n) for n in range(1000)]
        assert limited("malformed", logging.INFO, "malformed") is True  # its own kind
        clock.advance(10.0)
        assert limited("refused", logging.INFO, "refused %s", "late") is True
    assert written.count(True) == 1 and written[0] is True
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0", "malformed", "refused late (and 999 more like it in 10 s)"]
    assert limited.counts == {"refused": 1001, "malformed": 1}
