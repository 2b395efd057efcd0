"""A full or read-only run directory (issue 13, item 7): the agent says so once, in words,
and keeps serving. Log handlers whose writes fail with ENOSPC/EROFS, a role whose file
writes fail, a control socket the directory refuses."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
from pathlib import Path
from typing import Any

import pytest

import agent.core.daemon as daemon_mod
from agent.core import runfiles
from agent.core.config import AgentConfig, Interface
from agent.core.control import ControlClient
from agent.core.daemon import AgentDaemon, RepeatedFailures
from agent.core.errors import AgentError
from agent.core.loghandlers import GuardedFileHandler, GuardedStreamHandler
from agent.core.peer import PeerServer
from agent.core.role import Role
from agent.core.runfiles import RunDirError, write_private
from agent.core.wait import async_wait_until
from tests.unit.fakeclock import FakeClock


class _FullStream(io.StringIO):
    """A stream on a full disk: every write fails with ENOSPC."""

    def write(self, s: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(f"test.fullrundir.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_a_log_file_on_a_full_disk_is_reported_once_then_rate_limited_and_recovers(tmp_path: Path) -> None:
    clock = FakeClock(100.0)
    notices: list[str] = []
    path = tmp_path / "r1.log"
    handler = GuardedFileHandler(path, clock=clock, report=notices.append)
    logger = _logger(handler, "file")
    logger.info("before")
    full = True
    real_open = handler._open
    handler._open = lambda: _FullStream() if full else real_open()  # type: ignore[method-assign]
    handler.stream.close()
    handler.stream = None  # the disk fills up: the next open gets a stream that cannot write
    for i in range(100):
        logger.info("record %d", i)  # never raises into the caller
    assert len(notices) == 1 and "the run directory is full" in notices[0], notices
    assert handler.dropped == 100 and handler.failures == 1, "one try, then no syscall storm"
    clock.advance(6.0)  # retried after RETRY_AFTER: still full, no second notice within a minute
    logger.info("still full")
    assert handler.failures == 2 and len(notices) == 1
    clock.advance(61.0)
    logger.info("a minute later")
    assert len(notices) == 2 and "102 so far" in notices[1], notices
    full = False
    clock.advance(6.0)
    logger.info("space again")
    assert "writing again; 102 log records were lost" in notices[-1]
    text = path.read_text()
    assert "before" in text and "space again" in text and "record 5" not in text
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_log_file_in_a_read_only_directory_does_not_raise_into_the_caller(tmp_path: Path) -> None:
    notices: list[str] = []
    handler = GuardedFileHandler(tmp_path / "r1.log", clock=FakeClock(0.0), report=notices.append)

    def read_only() -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    handler._open = read_only  # type: ignore[method-assign]
    logger = _logger(handler, "rofile")
    for _ in range(10):
        logger.error("a binding expired")
    assert len(notices) == 1 and "the run directory is read-only" in notices[0]


def test_stderr_on_a_full_disk_prints_no_traceback_per_record(capfd: pytest.CaptureFixture[str]) -> None:
    notices: list[str] = []
    handler = GuardedStreamHandler(_FullStream(), clock=FakeClock(0.0), report=notices.append)
    logger = _logger(handler, "stream")
    for _ in range(50):
        logger.warning("refused")
    assert len(notices) == 1 and "full" in notices[0]
    assert "Logging error" not in capfd.readouterr().err  # logging's own per-record traceback


def test_write_private_raises_a_typed_error_and_leaves_nothing_behind(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write_private(tmp_path / "journal", "old")
    assert (tmp_path / "journal").stat().st_mode & 0o777 == 0o600

    def enospc(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfiles, "_write_all", enospc)
    with pytest.raises(RunDirError, match="the run directory is full") as err:
        write_private(tmp_path / "journal", "new")
    assert isinstance(err.value, AgentError) and err.value.errno == errno.ENOSPC
    assert (tmp_path / "journal").read_text() == "old", "the old file is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["journal"], "no temporary file left"
    monkeypatch.undo()
    with pytest.raises(RunDirError, match="the run directory is gone"):
        write_private(tmp_path / "nodir" / "journal", "x")


def test_a_failure_that_repeats_is_logged_once_a_minute_with_its_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    failures = RepeatedFailures(logging.getLogger("test.repeat"), every=60.0, clock=clock)
    exc = RunDirError("/run/r1.journal", OSError(errno.EROFS, "Read-only file system"))
    with caplog.at_level(logging.ERROR, logger="test.repeat"):
        logged = [failures.log("housekeeping of journal", exc, "failed") for _ in range(240)]
        clock.advance(60.0)
        logged.append(failures.log("housekeeping of journal", exc, "failed"))
    assert logged.count(True) == 2
    assert "read-only" in caplog.records[0].getMessage() and caplog.records[0].exc_info is None
    assert "239 more times" in caplog.records[1].getMessage()


class _Journal(Role):
    """A role that writes a file of the run directory every housekeeping tick."""

    name = "journal"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.tries = 0

    def housekeeping(self) -> None:
        self.tries += 1
        write_private(Path(self.agent.config.run_dir) / "r1.journal", f"tick {self.tries}")


class _LoopbackPeers(PeerServer):
    def __init__(self, handler: Any, **kw: Any) -> None:
        super().__init__(handler, port=0, host="127.0.0.1", **kw)


def _config(run_dir: Path) -> AgentConfig:
    return AgentConfig(name="r1", run_dir=str(run_dir), roles=[],
                       interfaces=[Interface(name="lo", address="127.0.0.1", prefix=8)])


def test_the_agent_answers_while_its_role_cannot_write_the_run_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(daemon_mod, "PeerServer", _LoopbackPeers)

    def enospc(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfiles, "_write_all", enospc)
    daemon = AgentDaemon(_config(tmp_path), roles=[_Journal])
    journal = daemon.require(_Journal)
    client = ControlClient(tmp_path / "r1.sock", timeout=2)

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        await async_wait_until(lambda: journal.tries >= 8, 10, what="eight failed writes")
        assert await asyncio.to_thread(client.call, "ping") == "pong"
        assert (await asyncio.to_thread(client.call, "status"))["name"] == "r1"
        daemon.stop()
        await task

    with caplog.at_level(logging.ERROR, logger="agent.core.daemon"):
        asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if "housekeeping of journal" in r.getMessage()]
    assert len(errors) == 1 and "the run directory is full" in errors[0], errors


def test_a_control_socket_the_run_directory_refuses_is_retried_while_the_agent_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(daemon_mod, "PeerServer", _LoopbackPeers)
    monkeypatch.setattr(daemon_mod, "CONTROL_RETRY", 0.05)
    from agent.core.control import ControlServer

    real_start = ControlServer.start
    refusals = {"left": 3}

    async def read_only_for_a_while(self: ControlServer) -> None:
        if refusals["left"]:
            refusals["left"] -= 1
            raise OSError(errno.EROFS, "Read-only file system")
        await real_start(self)

    monkeypatch.setattr(ControlServer, "start", read_only_for_a_while)

    class Ticks(Role):
        name = "ticks"
        n = 0

        def housekeeping(self) -> None:
            Ticks.n += 1

    daemon = AgentDaemon(_config(tmp_path), roles=[Ticks])
    client = ControlClient(tmp_path / "r1.sock", timeout=2)

    async def scenario() -> None:
        task = asyncio.create_task(daemon.run())
        await async_wait_until(lambda: Ticks.n >= 2, 10, what="the agent serving without its socket")
        await async_wait_until(lambda: (tmp_path / "r1.sock").exists(), 10, what="the socket made at last")
        assert await asyncio.to_thread(client.call, "ping") == "pong"
        daemon.stop()
        await task

    with caplog.at_level(logging.WARNING, logger="agent.core.daemon"):
        asyncio.run(scenario())
    text = [r.getMessage() for r in caplog.records]
    assert sum("read-only" in t for t in text) == 1, text
    assert any("is up again" in t for t in text)
