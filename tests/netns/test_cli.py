"""The `moat` command: up/show/object/down, the Mininet CLI, and clean after kill -9
(issue 3, lines 10 and 11). Runs the installed console script as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.wait import wait_until
from topologies.naming import is_tag
from topologies.run import Run, pid_alive, processes_of_run

MOAT = [sys.executable, "-m", "experiments.cli"]


def moat(*args: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MOAT, *args], capture_output=True, text=True, timeout=timeout, input=stdin)


def bridges_exist(run_id: str) -> list[str]:
    """The run's bridges (named for the run: topologies.naming) that exist."""
    names = BRIDGES.get(run_id) or Run.load(run_id).state.bridges
    BRIDGES[run_id] = names  # kept: the run directory goes with `moat clean`
    assert len(names) == 3
    return [n for n in names if Path(f"/sys/class/net/{n}").exists()]


BRIDGES: dict[str, list[str]] = {}


def run_scoped_interfaces() -> set[str]:
    """Every interface named for a run (``<tag>-s16``, ``<tag>-s16-1``) on the machine."""
    return {n for n in os.listdir("/sys/class/net") if n.split("-")[0] and is_tag(n.split("-")[0])}


@pytest.fixture
def up():
    proc = moat("up")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    bridges_exist(run_id)  # learn its bridges' names
    yield run_id
    moat("down", "--run", run_id)
    moat("clean", "--run", run_id)


def test_up_show_object_down(up: str) -> None:
    status = json.loads(moat("show", "status", "--json").stdout)
    assert {s["router"] for s in status} == {"r18a", "r18b", "r20a", "r22a", "r22b", "r22c"}
    assert next(s for s in status if s["router"] == "r22b")["roles"] == "home"
    assert json.loads(moat("show", "bindings", "r22b", "--json").stdout) == []

    started = moat("object", "start", "counter", "r18b")
    assert started.returncode == 0, started.stderr
    rows = wait_until(lambda: json.loads(moat("show", "bindings", "r22b", "--json").stdout), 15,
                      interval=0.0, what="a binding at r22b")
    assert rows[0]["care_of_name"] == "counter.r18a"
    table = moat("show", "bindings").stdout
    assert "10.16.0.100" in table and "counter.r18a" in table and "care_of_address" in table
    visitors = json.loads(moat("show", "visitors", "r18a", "--json").stdout)
    assert visitors[0]["local_address"] == "10.12.0.2"
    agents = json.loads(moat("show", "agents", "r18b", "--json").stdout)
    assert {a["address"] for a in agents} >= {"10.12.0.1", "10.12.0.2"}
    log = json.loads(moat("show", "log", "r22b", "--json").stdout)
    assert any("ACCEPTED" in line for line in log["r22b"])

    owner = Run.load(up).state.owner_pid
    down = moat("down", "--run", up)
    assert down.returncode == 0, down.stderr
    assert not pid_alive(owner)
    assert bridges_exist(up) == []
    assert processes_of_run(up) == []


def test_a_name_the_run_does_not_have_is_refused_with_the_names_it_has(up: str) -> None:
    """`moat migrate counter r99x` says r99x is not a router of the run and lists the
    routers, instead of failing on a missing file (issue 9, item 7)."""
    routers = "r18a, r18b, r20a, r22a, r22b, r22c"
    bad = moat("migrate", "counter", "r99x")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == f"moat: r99x is not a router of run {up} (routers: {routers})\n"
    nosuch = moat("object", "start", "nosuch", "r18b")
    assert nosuch.returncode == 1 and f"nosuch is not an object of run {up} (objects: counter)" in nosuch.stderr
    assert moat("show", "log", "r99x").stderr.startswith("moat: r99x is not a router")
    novm = moat("vm", "remove", "r22a", "vm9")
    assert novm.returncode == 1 and novm.stderr == "moat: vm9 is not a VM of router r22a (VMs: none)\n"


def test_show_without_a_network_says_so() -> None:
    proc = moat("show", "bindings", "--run", "no-such-run")
    assert proc.returncode == 1 and "no run no-such-run" in proc.stderr


def test_clean_after_kill_9_removes_everything_and_is_idempotent(up: str) -> None:
    run = Run.load(up)
    pids = processes_of_run(up)
    assert run.state.owner_pid in pids and len(pids) > 6  # holder, node shells, agents
    # ... and the remote site's sshd, found by the run directory in its command line (it
    # rewrites its environment area, so MOAT_RUN_ID is not visible there).
    assert any(b"sshd" in Path(f"/proc/{p}/cmdline").read_bytes() for p in pids if Path(f"/proc/{p}").exists())
    assert any(b"dnsmasq" in Path(f"/proc/{p}/cmdline").read_bytes() for p in pids if Path(f"/proc/{p}").exists())
    # A running object is sandboxed: clean finds it by its cgroup. (Its environment is its
    # own; but forked by the agent's fork server, the default, /proc still shows the
    # server's environment area, with the run id, so it is also found by that.)
    assert moat("object", "start", "counter", "r18b", "--run-code").returncode == 0
    obj_pid = json.loads(moat("show", "objects", "r18b", "--json").stdout)[0]["pid"]
    assert obj_pid and Path(f"/proc/{obj_pid}").exists()
    os.kill(run.state.owner_pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(run.state.owner_pid), 5, what="the holder killed")
    assert bridges_exist(up), "SIGKILL leaves the run's bridges behind"
    assert processes_of_run(up), "... and its node shells and agents"

    first = moat("clean")
    assert first.returncode == 0, first.stderr
    assert up in first.stdout
    assert processes_of_run(up) == []
    assert not Path(f"/proc/{obj_pid}").exists(), "the object outlived its run"
    assert bridges_exist(up) == []
    assert not run.dir.exists()
    second = moat("clean")
    assert second.returncode == 0 and up not in second.stdout


def test_mininet_cli_with_moat_commands() -> None:
    before = run_scoped_interfaces()  # this module runs alone (tests/conftest.py)
    script = ("move counter r18b\nsh sleep 2\nbindings\nvisitors r18a\nr18b ping -c1 -W2 10.16.0.2\n"
              "resolve co14 counter.home.moat\nmigrate counter r20a\nvm\nmigrate counter\nexit\n")
    proc = moat("cli", stdin=script, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "counter now runs on r18b" in proc.stdout
    assert "counter.home.moat: 10.16.0.100 (rcode 0)" in proc.stdout
    # `move` started only the client: there is no running object to migrate.
    assert "*** object 'counter' does not run and register here" in proc.stdout
    assert "usage: migrate OBJECT ROUTER" in proc.stdout
    assert "counter.r18a" in proc.stdout  # bindings and visitors tables
    assert "1 received" in proc.stdout + proc.stderr  # a Mininet command still works (its
    # output goes through Mininet's own logger)
    assert run_scoped_interfaces() <= before


def test_repo_provision_show_vm_and_errors(up: str, tmp_path: Path) -> None:
    run = Run.load(up)
    src = tmp_path / "src" / "counter"
    src.mkdir(parents=True)
    (src / "counter_object.py").write_text((Path(__file__).resolve().parents[2] / "agent" / "objects" / "counter.py").read_text())
    (src / "object.json").write_text(json.dumps({"entry": "counter_object:Counter",
                                                 "resources": {"cpu": 0.2, "memory_mb": 96, "pids": 16}}))
    key = run.dir / "provider" / "provider.key"
    assert moat("repo", "package", str(src.parent), "--service", "counter-svc", "--version", "1.0",
                "--provider", "acme", "--key", str(key), "--out", str(tmp_path / "out")).returncode == 0
    assert moat("repo", "publish", str(tmp_path / "out"), str(run.dir / "site24" / "repo")).returncode == 0
    ok = moat("provision", "r22a", "--vm", "vm1", "--service", "counter-svc", "--kind", "interface",
              "--interface", "r22a-eth0", "--address", "10.16.0.201")
    assert ok.returncode == 0 and "initialised" in ok.stdout, ok.stdout + ok.stderr
    refused = moat("provision", "r18b", "--vm", "vm2", "--service", "no-such-service")
    assert refused.returncode == 1 and "ServiceNotFound" in refused.stdout
    vms = json.loads(moat("show", "vm", "--json").stdout)
    assert [(v["router"], v["name"], v["object"]) for v in vms] == [("r22a", "vm1", "counter")]
    errors = json.loads(moat("show", "errors", "--json").stdout)
    assert [(e["router"], e["vm"], e["step"]) for e in errors] == [("r18b", "vm2", "fetch")]
    # The same service as a mobile object of the run: it registers, shows up as a VM's
    # object, and moves with `moat migrate`.
    mobile = moat("provision", "r18b", "--vm", "vm3", "--service", "counter-svc", "--mobile",
                  "counter=counter")
    assert mobile.returncode == 0, mobile.stdout + mobile.stderr
    rows = wait_until(lambda: json.loads(moat("show", "bindings", "r22b", "--json").stdout), 15,
                      interval=0.0, what="the mobile VM object's binding at r22b")
    assert rows[0]["home_address"] == "10.16.0.100"
    objects = json.loads(moat("show", "objects", "r18b", "--json").stdout)
    assert objects[0]["vm"] == "vm3/counter" and objects[0]["pid"] and objects[0]["memory_mb_used"] > 0
    moved = moat("migrate", "counter", "r20a")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert json.loads(moat("show", "objects", "r20a", "--json").stdout)[0]["vm"] == "vm3/counter"
    assert [v["router"] for v in json.loads(moat("show", "vm", "--json").stdout) if v["name"] == "vm3"] == ["r20a"]
    bad = moat("provision", "r18b", "--vm", "vm4", "--service", "counter-svc", "--mobile", "counter")
    assert bad.returncode != 0 and "OBJECT=NAME" in bad.stderr
