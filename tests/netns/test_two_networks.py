"""Two MOAT networks on one machine (issue 15, item 3).

Every name a run creates in the root namespace carries its tag (topologies.naming), so a
second network starts beside a running one, both carry traffic at once, a second start that
fails part-way removes only what it made, and ``moat clean --run ID`` removes one run and
leaves the other running: the first network's routers keep their interfaces and its object
still moves (the issue saw "Network is unreachable" on every migration).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.core.wait import wait_until
from agent.hosting.cgroups.cleanup import find_run_cgroups
from topologies.errors import TopologyError
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from topologies.run import Run, pid_alive, processes_of_run

MOAT = [sys.executable, "-m", "experiments.cli"]


def moat(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*MOAT, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def existing(names: list[str]) -> list[str]:
    return [n for n in names if Path(f"/sys/class/net/{n}").exists()]


def root_names(m: MoatNetwork) -> list[str]:
    return [*m.run.state.bridges, *m.run.state.root_links]


@pytest.fixture(scope="module")
def first():
    """Network A: the counter on r18b, registered with the HOA."""
    with MoatNetwork(PatentTopo(), advertise_interval=0.5) as m:
        m.place_object("counter", "r18b")
        m.wait_for(lambda: m.agent("r22b").call("bindings"), timeout=15)
        yield m


def assert_serves_and_moves(m: MoatNetwork, target: str) -> None:
    """Network ``m`` is whole: every root-namespace name is there, its object answers, moves
    to ``target`` with its state and answers there."""
    names = root_names(m)
    assert names and existing(names) == names
    answer = m.requests("co14", "counter", count=20)
    assert answer["answered"] == answer["sent"] == 20, answer
    report = m.migrate("counter", target, "make-before-break")
    assert report["ok"], report
    assert m.where("counter") == target
    answer = m.requests("co12", "counter", count=20)
    assert answer["answered"] == answer["sent"] == 20, answer


def test_names_are_the_runs_own(first: MoatNetwork) -> None:
    tag = first.run.state.tag
    assert tag and Run.load(first.run.run_id).state.tag == tag
    names = root_names(first)
    members = sum(len(n.routers) + len(n.hosts) for n in first.topo.networks.values())
    assert len(first.run.state.bridges) == 3 and len(names) == 3 + members == 13
    assert all(n.startswith(f"{tag}-") for n in names)
    assert first.bridge("s16") == f"{tag}-s16"
    # Inside a router the names stay the topology's.
    assert "r18a-eth0" in first.net["r18a"].cmd("ip -o link show")


def test_two_networks_pass_traffic_at_once(first: MoatNetwork) -> None:
    with MoatNetwork(PatentTopo(), advertise_interval=0.5) as second:
        assert second.run.state.tag != first.run.state.tag
        assert not set(root_names(first)) & set(root_names(second))
        second.place_object("counter", "r18b")
        second.wait_for(lambda: second.agent("r22b").call("bindings"), timeout=15)
        results: dict[str, dict] = {}

        def load(name: str, m: MoatNetwork) -> None:
            results[name] = m.requests("co14", "counter", count=100, rate=50)

        threads = [threading.Thread(target=load, args=(n, m))
                   for n, m in (("first", first), ("second", second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for name in ("first", "second"):
            assert results[name]["answered"] == results[name]["sent"] == 100, results
        # Each network's object counted its own requests only.
        counts = [m.agent("r18b").call("object_stats", name="counter")["state"]["count"]
                  for m in (first, second)]
        assert counts[1] == 100 and counts[0] >= 100
        second_names = root_names(second)
    assert existing(second_names) == []
    assert_serves_and_moves(first, "r20a")


def test_a_failed_start_removes_only_what_it_created(first: MoatNetwork,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Network B fails after its bridges, nodes and agents exist: what it made goes, A's
    names, processes and cgroups stay, and A still carries traffic and moves its object."""
    a_pids = processes_of_run(first.run.run_id)
    a_cgroups = find_run_cgroups(first.run.run_id)
    assert a_cgroups, "A's object runs in cgroups of its own"
    second = MoatNetwork(PatentTopo(), advertise_interval=0.5)
    made: dict[str, list] = {}

    def fail_once_up(timeout: float) -> None:
        MoatNetwork.wait_agents(second, timeout)
        made["names"] = existing(root_names(second))
        made["pids"] = processes_of_run(second.run.run_id)
        raise TopologyError("injected: the second start fails part-way")

    monkeypatch.setattr(second, "wait_agents", fail_once_up)
    with pytest.raises(TopologyError, match="injected"):
        second.start()
    assert made["names"] == root_names(second) and len(made["pids"]) > 6
    assert existing(root_names(second)) == []
    assert processes_of_run(second.run.run_id) == []
    assert find_run_cgroups(second.run.run_id) == []
    assert all(pid_alive(p) for p in a_pids)
    assert set(a_cgroups) <= set(find_run_cgroups(first.run.run_id))
    where = first.where("counter")
    assert_serves_and_moves(first, "r18b" if where != "r18b" else "r20a")


def test_a_start_whose_names_exist_refuses_and_removes_nothing(first: MoatNetwork) -> None:
    """A clash (here: B is handed A's tag) is refused before anything is built or recorded,
    and B's cleanup leaves A's bridges alone (the issue: it removed s16, s12, s14)."""
    second = MoatNetwork(PatentTopo())
    second.run.reserve_tag = lambda interfaces=None: first.run.state.tag  # type: ignore[method-assign]
    with pytest.raises(TopologyError, match="already exist"):
        second.start()
    assert second.run.state.bridges == [] and second.run.state.root_links == []
    assert existing(root_names(first)) == root_names(first)
    answer = first.requests("co14", "counter", count=20)
    assert answer["answered"] == answer["sent"] == 20, answer


def test_moat_clean_of_one_run_leaves_the_other_running(first: MoatNetwork) -> None:
    up = moat("up")
    assert up.returncode == 0, up.stderr
    other = up.stdout.strip().splitlines()[-1]
    try:
        state = Run.load(other).state
        other_names = [*state.bridges, *state.root_links]
        assert state.tag != first.run.state.tag and existing(other_names) == other_names
        assert processes_of_run(other)
        cleaned = moat("clean", "--run", other)
        assert cleaned.returncode == 0, cleaned.stderr
        assert other in cleaned.stdout and first.run.run_id not in cleaned.stdout
        assert existing(other_names) == [] and processes_of_run(other) == []
        wait_until(lambda: not pid_alive(state.owner_pid), 10, what="the other run's holder gone")
        assert not Run(other).dir.exists()
    finally:
        moat("clean", "--run", other)
    # A is untouched: its agents answer and it carries traffic and moves.
    assert all(first.agent(r).call("ping") for r in first.topo.router_names())
    where = first.where("counter")
    assert_serves_and_moves(first, "r18b" if where != "r18b" else "r20a")
