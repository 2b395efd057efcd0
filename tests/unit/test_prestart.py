"""The hosting role's prestart (agent.hosting.prestart, issue 14 item 2): whether it runs (the
switch, else the run's number of routers), what it does in which order on its thread (the fork
server, then the slots), and that a cancelled one makes no pool after the role's stop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from agent.core.config import AgentConfig, Interface, PeerRouter
from agent.core.errors import AgentError
from agent.hosting import prestart
from agent.hosting.prestart import MAX_ROUTERS, Prestart, PrestartError, begin, wanted


def test_the_switch_decides_else_the_number_of_routers(monkeypatch) -> None:
    monkeypatch.delenv(prestart.ENV_PRESTART, raising=False)
    assert wanted(None) and wanted(0) and wanted(3) and wanted(MAX_ROUTERS)
    assert not wanted(MAX_ROUTERS + 1) and not wanted(102)
    assert wanted(102, "1") and not wanted(3, "0")
    monkeypatch.setenv(prestart.ENV_PRESTART, "1")
    assert wanted(102)
    monkeypatch.setenv(prestart.ENV_PRESTART, "0")
    assert not wanted(None)
    with pytest.raises(PrestartError):
        wanted(3, "on")


class FakePool:
    def __init__(self, log: list) -> None:
        self.log = log

    def fill(self) -> int:
        self.log.append("fill")
        return 2


def run(tmp_path: Path, forking: bool, *, gate: threading.Event | None = None,
        server_fails: bool = False, delay: float = 0.0) -> tuple[Prestart, list]:
    log: list[Any] = []

    def start_server() -> None:
        if gate is not None:
            gate.wait(10)
        if server_fails:
            raise AgentError("the fork server did not start")
        log.append("server")

    def pool_for(objects_dir: Path, manager: Any) -> FakePool:
        log.append(("pool", objects_dir.is_dir(), oct(objects_dir.stat().st_mode & 0o777), manager))
        return FakePool(log)

    p = Prestart(tmp_path / "objects", "manager", forking=forking, start_server=start_server,
                 pool_for=pool_for, delay=delay)
    p.start()
    return p, log


def test_it_starts_the_fork_server_then_fills_the_slots(tmp_path: Path) -> None:
    p, log = run(tmp_path, forking=True)
    assert p.done.wait(10) and p.error is None
    assert log == ["server", ("pool", True, "0o755", "manager"), "fill"]


def test_with_objects_started_by_exec_only_the_slots(tmp_path: Path) -> None:
    p, log = run(tmp_path, forking=False)
    assert p.done.wait(10)
    assert log == [("pool", True, "0o755", "manager"), "fill"]


def test_a_failure_is_kept_and_logged_not_raised(tmp_path: Path) -> None:
    p, log = run(tmp_path, forking=True, server_fails=True)
    assert p.done.wait(10)
    assert p.error == "the fork server did not start" and log == []


def test_cancelled_it_makes_no_pool(tmp_path: Path) -> None:
    """The role's stop cancels it while the fork server still starts: no pool is made after
    (the stop's close_all would not see it)."""
    gate = threading.Event()
    p, log = run(tmp_path, forking=True, gate=gate)
    threading.Timer(0.2, gate.set).start()
    p.cancel()
    assert p.done.is_set() and log == ["server"]


def test_cancelled_during_its_delay_it_does_nothing(tmp_path: Path) -> None:
    p, log = run(tmp_path, forking=True, delay=30.0)
    p.cancel()
    assert p.done.is_set() and log == [] and not (tmp_path / "objects").exists()


def config(peers: int) -> AgentConfig:
    return AgentConfig(name="r1", run_dir="/nonexistent", roles=["hosting"],
                       interfaces=[Interface("r1-eth0", "10.0.0.1", 24)],
                       peers={f"r{i}": PeerRouter([f"10.0.{i}.1"], b"k" * 32)
                              for i in range(peers)})


def test_begin_follows_the_switch_and_the_runs_routers(monkeypatch) -> None:
    started: list[Any] = []
    monkeypatch.setattr(Prestart, "start", lambda self: started.append(self))
    monkeypatch.delenv(prestart.ENV_PRESTART, raising=False)
    assert begin(config(MAX_ROUTERS + 1), None) is None
    p = begin(config(3), "manager")
    assert p is not None and started == [p]
    assert p.objects_dir == Path("/nonexistent/objects") and p.manager == "manager"
    monkeypatch.setenv(prestart.ENV_PRESTART, "0")
    assert begin(config(3), None) is None
    monkeypatch.setenv(prestart.ENV_PRESTART, "maybe")
    assert begin(config(3), None) is None  # a bad switch: logged, not prestarted
    monkeypatch.delenv(prestart.ENV_PRESTART)
    assert begin(object(), None) is None  # not an agent's configuration (a test double)
