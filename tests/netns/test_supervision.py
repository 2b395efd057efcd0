"""Every agent runs under a supervisor inside its router node (issue 13, items 1 and 6):
``kill -9`` of an agent brings it back, a crash loop is reported, ``moat show status`` lists a
dead agent as such and the others as before, and stopping the network leaves nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from agent.core.errors import ControlError
from agent.core.wait import wait_until
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from topologies.run import pid_alive, processes_of_run

log = logging.getLogger(__name__)

ROUTERS = {"r18a", "r18b", "r20a", "r22a", "r22b", "r22c"}


@pytest.fixture(scope="module")
def run():
    with MoatNetwork(PatentTopo()) as m:
        yield m


def moat(run: MoatNetwork, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args, "--run", run.run.run_id],
                          capture_output=True, text=True, timeout=60)


def agent_pid(run: MoatNetwork, router: str) -> int | None:
    try:
        return run.client.call(router, "status", timeout=1)["pid"]
    except ControlError:
        return None


def test_a_killed_agent_answers_again_within_about_a_second(run: MoatNetwork) -> None:
    node = run.net["r22b"]
    supervisor = node.daemon_pid
    took = []
    for attempt in range(3):
        pid = agent_pid(run, "r22b")
        assert pid is not None and pid != supervisor
        assert int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1]) == supervisor
        assert os.getpgid(pid) == supervisor, "the agent is in the node's daemon group"
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        new = wait_until(lambda: (p := agent_pid(run, "r22b")) not in (None, pid) and p, 20, interval=0.01,
                         what="r22b's agent answering again")
        took.append(time.monotonic() - start)
        assert new != pid and node.daemon_pid == supervisor
        doc = wait_until(lambda: (d := run.client.supervision("r22b"))["state"] == "running" and d, 5,
                         what="the supervisor seeing it answer")
        assert doc["restarts"] == attempt + 1 and doc["last_exit"]["signal"] == "SIGKILL"
        assert doc["last_back_in_s"] is not None
    log.info("r22b's agent answered again %s s after kill -9 (backoff 0.2, 0.4, 0.8 s)",
             [round(t, 3) for t in took])
    print(f"agent back after kill -9: {[round(t, 3) for t in took]} s")
    assert run.client.agent_state("r22b")["state"] == "up"


def test_show_status_lists_a_dead_agent_and_the_others_still_show(run: MoatNetwork) -> None:
    """r20a's supervisor paused (SIGSTOP), its agent killed: `moat show status` lists r20a as
    down with its restarts and last exit, every other router as up; `moat show bindings`
    still shows the others' rows; resumed, the supervisor brings r20a back."""
    supervisor = run.net["r20a"].daemon_pid
    pid = agent_pid(run, "r20a")
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid) or open(f"/proc/{pid}/stat").read().split()[2] == "Z", 5,
                   what="r20a's agent dead")
        shown = moat(run, "show", "status", "--json")
        assert shown.returncode == 0, shown.stderr
        rows = {r["router"]: r for r in json.loads(shown.stdout)}
        assert set(rows) == ROUTERS
        assert rows["r20a"]["state"] == "down"
        assert all(rows[r]["state"].startswith("up") and rows[r]["pid"] for r in ROUTERS - {"r20a"})
        table = moat(run, "show", "status")
        assert table.returncode == 0 and "down" in table.stdout and "r22b" in table.stdout
        bindings = moat(run, "show", "bindings")
        assert bindings.returncode == 0 and "r20a: agent down" in bindings.stderr
    finally:
        os.kill(supervisor, signal.SIGCONT)
    wait_until(lambda: agent_pid(run, "r20a"), 20, what="r20a's agent back once its supervisor runs")


def test_a_crash_loop_is_reported_and_ends_when_the_cause_is_gone(run: MoatNetwork) -> None:
    """r18a's configuration taken away and its agent killed: every restart fails, the
    supervisor reports a crash loop (status file, `moat show status`) and keeps trying; with
    the configuration back the agent answers again."""
    config = run.run.dir / "r18a.json"
    aside = run.run.dir / "r18a.json.aside"
    shutil.move(config, aside)
    try:
        os.kill(agent_pid(run, "r18a"), signal.SIGKILL)
        wait_until(lambda: (run.client.supervision("r18a") or {}).get("crash_loop"), 60,
                   what="r18a's crash loop reported")
        rows = {r["router"]: r for r in json.loads(moat(run, "show", "status", "--json").stdout)}
        assert rows["r18a"]["state"] == "crash-loop" and rows["r18a"]["restarts"] >= 5, rows["r18a"]
        assert "exit status 2" in rows["r18a"]["last_exit"]
        assert "CRASH LOOP" in (run.run.dir / "r18a.out").read_text()
    finally:
        shutil.move(aside, config)
    wait_until(lambda: agent_pid(run, "r18a"), 30, what="r18a's agent back with its configuration")
    assert run.client.agent_state("r18a")["state"] == "up"


def test_stopping_the_network_stops_supervisors_and_agents(run: MoatNetwork) -> None:
    supervisors = [run.net[r].daemon_pid for r in ROUTERS]
    agents = [agent_pid(run, r) for r in ROUTERS]
    assert all(supervisors) and all(agents)
    run.stop()
    assert not any(pid_alive(p) for p in supervisors + agents)
    assert processes_of_run(run.run.run_id) == []
    assert not any((run.run.dir / f"{r}.sock").exists() for r in ROUTERS) or not run.run.dir.exists()
