"""Crash-safe migration on the patent topology (issue 13, item 4), short: a move of the
counter from r18b (net 12) to r20a (net 14) whose source or target agent is killed (SIGKILL,
at the role's own fault point, so at exactly that step), or whose transfer answer and cancel
are lost. The routers' supervisors bring a killed agent back. Each ends with exactly one
router running the counter, registered, answering, with the latest count."""

from __future__ import annotations

from typing import Any

import pytest

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

SOURCE, TARGET = "r18b", "r20a"
#: The target's deadline for each next step of a move (short: the test waits it out).
DEADLINE = 3.0


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo(), advertise_interval=0.5) as m:
        yield m


@pytest.fixture
def counter(net: MoatNetwork) -> Any:
    """The counter at r18b with a count of its own (each test starts from a fresh one)."""
    for router in (SOURCE, TARGET):
        if any(o["name"] == "counter" for o in net.agent(router).call("objects")):
            net.agent(router).call("object_stop", name="counter", deregister=True)
    net.place_object("counter", SOURCE)
    net.wait_for(lambda: [b for b in net.agent("r22b").call("bindings")
                          if b["care_of_address"].startswith("10.12.")], timeout=15)
    answered = net.requests("co14", "counter", 10)["answered"]
    assert answered >= 5 and count(net, SOURCE) == answered
    return answered


def count(net: MoatNetwork, router: str) -> int:
    return net.agent(router).call("object_stats", name="counter")["state"]["count"]


def _running(net: MoatNetwork, router: str) -> bool:
    try:
        count(net, router)
    except Exception:  # noqa: BLE001 - "object counter is not running" (yet)
        return False
    return True


def hosting(net: MoatNetwork) -> list[str]:
    """The routers whose agent runs the counter (an agent being restarted counts as none)."""
    where = []
    for router in (SOURCE, TARGET):
        try:
            objects = net.agent(router).call("objects")
        except Exception:  # noqa: BLE001 - a killed agent, not back yet
            continue
        if any(o["name"] == "counter" for o in objects):
            where.append(router)
    return where


def settle(net: MoatNetwork, router: str, before: int) -> None:
    """Exactly one instance: ``router``'s, registered at the HOA (r22b) through its network,
    with the latest count; every request answered then counts exactly once."""
    net.wait_for(lambda: hosting(net) == [router], timeout=DEADLINE + 20)
    prefix = "10.12." if router == SOURCE else "10.14."
    net.wait_for(lambda: [b for b in net.agent("r22b").call("bindings")
                          if b["care_of_address"].startswith(prefix)]
                 and len(net.agent("r22b").call("bindings")) == 1, timeout=20)
    net.wait_for(lambda: _running(net, router), timeout=20)  # listed while it starts
    assert count(net, router) == before, "the latest state, nothing lost, nothing twice"
    answered = net.requests("co14", "counter", 20)["answered"]
    assert answered > 0 and count(net, router) == before + answered


def move(net: MoatNetwork, mode: str = "make-before-break") -> dict | None:
    """The move from r18b; None when its agent died during it."""
    target = str(net.topo.addresses(TARGET)[0].ip)
    try:
        return net.agent(SOURCE, timeout=60).call("migrate", name="counter", target=target,
                                                  mode=mode, target_name=TARGET, deadline=DEADLINE)
    except Exception:  # noqa: BLE001 - the control connection died with the agent
        return None


def restarted(net: MoatNetwork, router: str, pid: int) -> None:
    net.wait_for(lambda: _pid(net, router) not in (None, pid), timeout=15)


def _pid(net: MoatNetwork, router: str) -> int | None:
    try:
        return net.agent(router).call("status")["pid"]
    except Exception:  # noqa: BLE001 - not back yet
        return None


@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_the_source_killed_after_it_stopped_the_object(net: MoatNetwork, counter: int, mode: str) -> None:
    """Its final checkpoint was on disk: the target drops its instance at its deadline and
    the restarted source serves again from that checkpoint."""
    pid = _pid(net, SOURCE)
    net.agent(SOURCE).call("inject_fault", point="source_after_stop")
    assert move(net, mode) is None
    restarted(net, SOURCE, pid)
    settle(net, SOURCE, counter)


def test_the_target_killed_after_it_restored_the_state(net: MoatNetwork, counter: int) -> None:
    pid = _pid(net, TARGET)
    net.agent(TARGET).call("inject_fault", point="target_after_restore")
    report = move(net)
    assert report is not None and not report["ok"], report
    restarted(net, TARGET, pid)
    settle(net, SOURCE, counter)


def test_a_cut_transfer_and_a_lost_cancel(net: MoatNetwork, counter: int) -> None:
    """The target restored, its answer and the cancel are lost: it holds its instance
    (registered beside the source's, answering nothing) until its deadline, then drops it."""
    net.agent(TARGET).call("inject_fault", point="transfer_cut")
    net.agent(TARGET).call("inject_fault", point="cancel_lost")
    report = move(net)
    assert report is not None and not report["ok"] and "transfer_cut" in report["error"], report
    # Before the target's deadline, both hold the object, one answers: counts stay exact.
    # (The source's instance answers once registered again: its registration without S
    # replaces the held target's binding at the HOA.)
    net.wait_for(lambda: _running(net, SOURCE) and [
        b for b in net.agent("r22b").call("bindings") if b["care_of_address"].startswith("10.12.")],
        timeout=20)
    # co14's gateway is the target, whose held instance takes its requests and answers none
    # (until its deadline); co12's reach the source. Never both: the count is exact.
    held = net.requests("co14", "counter", 10, client="co14-window")["answered"]
    answered = net.requests("co12", "counter", 10)["answered"]
    assert answered > 0 and count(net, SOURCE) == counter + held + answered
    settle(net, SOURCE, counter + held + answered)


def test_the_source_killed_after_it_asked_the_commit(net: MoatNetwork, counter: int) -> None:
    pid = _pid(net, SOURCE)
    net.agent(SOURCE).call("inject_fault", point="source_after_commit")
    assert move(net) is None
    restarted(net, SOURCE, pid)
    settle(net, TARGET, counter)
    assert net.agent(SOURCE).call("status")["departures"] == []  # the move is decided
