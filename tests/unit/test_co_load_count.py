"""The CO load tool sends exactly the number of requests it is asked for (`--count`): a test
that counts on N requests (the object's count after them) must get N, even on a machine that
oversleeps the pauses between them (a clock-bound loop then sent fewer: one of
test_secondaries_patent's counts came out one short under the parallel netns suite)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from nodetools import co_load


def _sink() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_count_sends_exactly_that_many_whatever_the_duration() -> None:
    sink = _sink()
    try:
        port = sink.getsockname()[1]
        load = asyncio.run(co_load.run("127.0.0.1", port, 1000.0, 0.0005, "c", "incr", count=7))
    finally:
        sink.close()
    assert sorted(load.sent) == list(range(1, 8))


def test_a_count_out_of_bounds_is_refused(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        co_load.main(["--dst", "127.0.0.1", "--count", "0", "--out", str(tmp_path / "o")])
    assert "count must be" in capsys.readouterr().err
