"""The agent's supervisor (issue 13): the backoff and crash-loop rule with a fake clock, and
the real supervisor process restarting, reporting and stopping a child (no root needed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fake_control import FakeControl

from agent.core.wait import wait_until
from agent.supervisor import Backoff, RestartPolicy, clear_stale_socket, describe_exit, ping, read_status
from tests.unit.fakeclock import FakeClock


def test_backoff_doubles_to_the_maximum_and_a_stable_minute_resets_it() -> None:
    clock = FakeClock(1000.0)
    b = Backoff(RestartPolicy(initial=0.2, maximum=5.0, stable_after=60.0), clock)
    delays = []
    for _ in range(8):
        b.started()
        clock.advance(0.1)
        delays.append(b.exited())
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert b.restarts == 8
    b.started()
    clock.advance(59.0)
    assert not b.tick() and b.delay == 5.0  # not yet stable
    clock.advance(1.0)
    assert b.tick()  # stable: forgotten now, while it runs
    assert b.delay == 0.2 and not b.crash_loop
    assert b.exited() == 0.2
    assert b.restarts == 9  # the count of restarts is never reset


def test_five_exits_within_thirty_seconds_are_a_crash_loop_and_spread_ones_are_not() -> None:
    clock = FakeClock(0.0)
    b = Backoff(RestartPolicy(loop_exits=5, loop_window=30.0), clock)
    for _ in range(4):
        b.started()
        clock.advance(7.6)  # 4 exits 7.6 s apart: the 5th lands 30.4 s after the 1st
        b.exited()
    assert not b.crash_loop
    b.started()
    clock.advance(7.6)
    b.exited()
    assert not b.crash_loop, "the first exit left the window"
    b.started()
    clock.advance(1.0)
    b.exited()
    assert b.crash_loop
    # It stays a crash loop while the agent keeps dying, however slowly it is restarted ...
    for _ in range(3):
        b.started()
        clock.advance(6.0)
        b.exited()
        assert b.crash_loop
    # ... and is over after a stable minute.
    b.started()
    clock.advance(61.0)
    assert b.tick() and not b.crash_loop


def test_a_policy_that_cannot_work_is_refused() -> None:
    for bad in ({"initial": 0}, {"initial": 6.0, "maximum": 5.0}, {"loop_exits": 0}):
        with pytest.raises(ValueError):
            RestartPolicy(**bad)


def test_exit_descriptions() -> None:
    assert describe_exit(-9)["signal"] == "SIGKILL"
    assert describe_exit(2) == {"returncode": 2, "signal": None, "text": "exit status 2"}


def test_stale_sockets_are_removed_and_live_or_foreign_ones_kept(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a killed agent leaves
    assert clear_stale_socket(str(stale)) == "removed" and not stale.exists()
    assert clear_stale_socket(str(stale)) == "absent"
    live = tmp_path / "live.sock"
    server = FakeControl(live)
    server.start()
    assert clear_stale_socket(str(live)) == "live" and live.exists()
    assert ping(str(live))
    server.sock.close()
    plain = tmp_path / "plain.sock"
    plain.write_text("not a socket")
    assert clear_stale_socket(str(plain)) == "foreign" and plain.read_text() == "not a socket"
    assert not ping(str(plain))


def _supervise(tmp_path: Path, child: str, *options: str) -> tuple[subprocess.Popen, Path]:
    status = tmp_path / "r.supervisor.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.supervisor", "--status", str(status), *options,
         "--", sys.executable, "-c", child],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "r.out", "wb"),
        start_new_session=True)  # it signals its own process group when stopped
    return proc, status


def _status(path: Path) -> dict:
    return read_status(path) or {}


def test_a_killed_child_is_restarted_and_a_stop_ends_both(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    child = f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(1000)"
    proc, status = _supervise(tmp_path, child, "--initial", "0.05")
    try:
        first = wait_until(lambda: _status(status).get("agent_pid"), 10, what="the child started")
        assert os.getpgid(first) == proc.pid, "the child stays in the node's daemon group"
        mode = stat.S_IMODE(os.stat(status).st_mode)
        assert mode == 0o600, oct(mode)
        wait_until(lambda: pids.exists() and pids.read_text().split() == [str(first)], 10,
                   what="the child running its code")
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: (p := _status(status).get("agent_pid")) not in (None, first) and p,
                            10, what="a new child")
        doc = _status(status)
        assert doc["restarts"] == 1 and doc["last_exit"]["signal"] == "SIGKILL"
        assert doc["state"] == "running" and not doc["crash_loop"]
        wait_until(lambda: pids.read_text().split() == [str(first), str(second)], 10,
                   what="the new child running its code")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        wait_until(lambda: not os.path.exists(f"/proc/{second}"), 5, what="the child gone with its supervisor")
        assert _status(status)["state"] == "stopped"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_crash_loop_is_reported_and_restarts_go_on(tmp_path: Path) -> None:
    proc, status = _supervise(tmp_path, "import sys; sys.exit(3)", "--initial", "0.01", "--max", "0.05",
                              "--loop-exits", "5", "--loop-window", "30")
    try:
        doc = wait_until(lambda: (d := _status(status)).get("crash_loop") and d, 20, what="a crash loop")
        assert doc["state"] == "restarting" and doc["last_exit"]["returncode"] == 3
        assert doc["restarts"] >= 5
        wait_until(lambda: _status(status).get("restarts", 0) >= doc["restarts"] + 3, 20,
                   what="restarts going on in the crash loop")
        assert proc.poll() is None
        assert "CRASH LOOP" in (tmp_path / "r.out").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_a_child_that_never_answered_is_not_restarted(tmp_path: Path) -> None:
    """With --socket, an agent that exits before it ever answered ``ping`` is a start that
    cannot work: the supervisor exits with its status (whoever starts the network sees it)."""
    proc, status = _supervise(tmp_path, "import sys; sys.exit(2)", "--socket", str(tmp_path / "none.sock"))
    assert proc.wait(10) == 2
    doc = _status(status)
    assert doc["state"] == "failed" and doc["restarts"] == 0


def test_an_exit_0_is_a_requested_stop(tmp_path: Path) -> None:
    proc, status = _supervise(tmp_path, "pass")
    assert proc.wait(10) == 0
    assert _status(status)["state"] == "stopped"


def test_a_status_file_that_cannot_be_written_does_not_stop_supervision(tmp_path: Path) -> None:
    """The status file's directory is gone (as good as read-only): reported once, the child
    still restarted."""
    pids = tmp_path / "pids"
    child = f"import os; open({str(pids)!r}, 'a').write('x'); os.kill(os.getpid(), 9)"
    status = tmp_path / "gone" / "r.supervisor.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.supervisor", "--status", str(status), "--initial", "0.01",
         "--max", "0.02", "--", sys.executable, "-c", child],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "r.out", "wb"),
        start_new_session=True)
    try:
        wait_until(lambda: pids.exists() and len(pids.read_text()) >= 5, 20, what="restarts")
        text = (tmp_path / "r.out").read_text()
        assert text.count("cannot write status file") == 1, text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_status_json_is_what_the_cli_reads(tmp_path: Path) -> None:
    from agent.supervisor import status_path, write_status

    path = status_path(tmp_path, "r22b")
    write_status(path, {"state": "running"})
    assert path.name == "r22b.supervisor.json" and json.loads(path.read_text()) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["r22b.supervisor.json"]  # no temporary left
