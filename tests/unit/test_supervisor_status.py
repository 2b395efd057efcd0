"""What `moat show status` makes of an agent that does not answer (issue 13, item 6): its
state from the supervisor's status file, and the other routers' rows as before. A run
directory in tmp_path; one agent answers on a real socket, the other routers' do not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_control import FakeControl

from agent.core.errors import ControlError
from agent.core.wait import wait_until
from agent.supervisor import status_path, write_status
from experiments.cli import collect
from topologies.client import RunClient
from topologies.run import Run


@pytest.fixture
def client(tmp_path: Path):
    run = Run("test-run", root=tmp_path)
    run.dir.mkdir(parents=True)
    run.state.agents = {r: str(run.dir / f"{r}.sock") for r in ("r1", "r2", "r3", "r4")}
    agent = FakeControl(run.dir / "r1.sock")
    agent.start()
    yield RunClient(run)
    agent.sock.close()


def _sup(client: RunClient, router: str, **doc) -> None:
    write_status(status_path(client.run.dir, router), {"supervisor_pid": os.getpid(), "restarts": 0, **doc})


def test_each_router_gets_its_state(client: RunClient) -> None:
    _sup(client, "r1", state="running", restarts=2, last_exit={"text": "killed by SIGKILL", "at": 1.0})
    _sup(client, "r2", state="restarting", restarts=1, last_exit={"text": "killed by SIGKILL", "at": 1.0})
    _sup(client, "r3", state="restarting", crash_loop=True, restarts=7,
         last_exit={"text": "exit status 2", "at": 1.0})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _sup(client, "r4", state="running", supervisor_pid=int(dead))  # its supervisor is gone
    states = {r: client.agent_state(r, timeout=0.5) for r in client.routers()}
    assert {r: s["state"] for r, s in states.items()} == {
        "r1": "up", "r2": "restarting", "r3": "crash-loop", "r4": "down"}
    assert states["r3"]["restarts"] == 7 and states["r3"]["last_exit"] == "exit status 2"


def test_a_stopped_supervisor_restarts_nothing(client: RunClient) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        wait_until(lambda: Path(f"/proc/{sleeper.pid}/stat").read_text().rpartition(")")[2].split()[0] == "T",
                   5, what="the stand-in supervisor stopped")
        _sup(client, "r2", state="restarting", supervisor_pid=sleeper.pid)
        assert client.agent_state("r2", timeout=0.5)["state"] == "down"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_show_status_lists_every_router_and_the_other_tables_skip_the_dead(
        client: RunClient, capsys: pytest.CaptureFixture[str]) -> None:
    _sup(client, "r1", state="running", restarts=1, last_exit={"text": "killed by SIGKILL", "at": 1.0})
    _sup(client, "r2", state="restarting", restarts=3, last_exit={"text": "killed by SIGSEGV", "at": 1.0})
    rows = {r["router"]: r for r in collect(client, "status", client.routers())}
    assert set(rows) == {"r1", "r2", "r3", "r4"}
    assert rows["r1"]["state"] == "up" and rows["r1"]["pid"] == 4242 and rows["r1"]["restarts"] == 1
    assert rows["r2"]["state"] == "restarting" and rows["r2"]["last_exit"] == "killed by SIGSEGV"
    assert rows["r3"]["state"] == "down" and rows["r4"]["state"] == "down"  # no supervisor file
    # A table of the others' rows: the dead agents are named on stderr, not a failure.
    with pytest.raises(ControlError, match="unknown command"):
        collect(client, "bindings", ["r1"])  # an agent that answers and refuses still fails
    assert collect(client, "bindings", ["r2", "r3"]) == []
    err = capsys.readouterr().err
    assert "r2: agent restarting (restarts 3, last exit: killed by SIGSEGV)" in err and "r3: agent down" in err
