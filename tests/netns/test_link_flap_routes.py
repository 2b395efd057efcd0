"""A backbone link that goes down and comes back gets its routes back (issue 13, item 8's
link row): the kernel flushes the static routes through r22a-r18a when the link goes down
(Mininet's configLinkStatus: both interfaces admin-down); the static-routes role of each end's
agent installs them again when the link is up, and traffic crosses the link again. A route
nobody configured, through the same link, is not put back."""

from __future__ import annotations

import logging
import subprocess
import time

import pytest

from agent.core.wait import wait_until
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

log = logging.getLogger(__name__)

A, B = "r22a", "r18a"
#: r18b: a router on net 12, behind r18a as r22a sees it.
BEHIND_B = "10.12.0.2"
#: A route an operator adds on r22a through the link: not the topology's, so not the agent's.
FOREIGN_ROUTE = "10.99.0.0/24"


@pytest.fixture(scope="module")
def run():
    with MoatNetwork(PatentTopo()) as m:
        yield m


def through_link(run: MoatNetwork, router: str, peer: str) -> list[tuple[str, str]]:
    """``router``'s topology routes whose next hop is ``peer``'s end of their link."""
    peer_addresses = {str(a.ip) for a in run.topo.addresses(peer)}
    return [(r.prefix, r.via) for r in run.topo.routes(router) if r.via in peer_addresses]


def missing(run: MoatNetwork, router: str, routes: list[tuple[str, str]]) -> list[str]:
    node = run.net[router]
    return [prefix for prefix, via in routes if f"via {via}" not in node.cmd(f"ip route show {prefix}")]


def crosses(run: MoatNetwork) -> bool:
    """One ping from r22a's LAN address to r18b: out through r22a's route to net 12, back
    through r18a's route to net 16, both across the link."""
    out = run.net[A].cmd(f"ping -c 1 -W 1 -I 10.16.0.1 {BEHIND_B}")
    return " 0% packet loss" in out


def test_routes_come_back_with_the_link_and_traffic_crosses_it(run: MoatNetwork) -> None:
    routes = {A: through_link(run, A, B), B: through_link(run, B, A)}
    assert routes[A] == [("10.12.0.0/24", "10.255.0.2")], routes  # the patent topology's plan
    assert len(routes[B]) == 3, routes
    assert not missing(run, A, routes[A]) and not missing(run, B, routes[B])
    wait_until(lambda: crosses(run), 10, what="traffic across r22a-r18a before the fault")
    before = {r: run.client.call(r, "status")["static_routes"]["reinstalled"] for r in (A, B)}
    assert run.net[A].cmd(f"ip route add {FOREIGN_ROUTE} via 10.255.0.2").strip() == ""

    run.net.configLinkStatus(A, B, "down")
    try:
        # The kernel took them: the fault is real, and the agents see it (their next look).
        assert missing(run, A, routes[A]) == ["10.12.0.0/24"]
        assert len(missing(run, B, routes[B])) == 3
        assert not crosses(run)
        for router in (A, B):
            wait_until(lambda: all(r["missing_s"] is not None
                                   for r in run.client.call(router, "static_routes")
                                   if (r["prefix"], r["via"]) in routes[router]),
                       5, what=f"{router}'s agent seeing its routes gone")
    finally:
        run.net.configLinkStatus(A, B, "up")
    up = time.monotonic()

    wait_until(lambda: not missing(run, A, routes[A]) and not missing(run, B, routes[B]), 10,
               interval=0.01, what="the link's routes installed again")
    back_s = time.monotonic() - up
    wait_until(lambda: crosses(run), 10, what="traffic across r22a-r18a after the link came back")
    crossed_s = time.monotonic() - up
    log.info("routes back %.3f s after the link came up, a ping crossed after %.3f s", back_s, crossed_s)
    print(f"routes back after link up: {back_s:.3f} s; ping across: {crossed_s:.3f} s")

    # Put back by the agents (not by anyone else), each route once, and the operator's
    # route through the same link is not theirs to put back.
    after = {r: run.client.call(r, "status")["static_routes"] for r in (A, B)}
    assert after[A]["reinstalled"] - before[A] == 1 and after[A]["missing"] == ""
    assert after[B]["reinstalled"] - before[B] == 3 and after[B]["missing"] == ""
    assert run.net[A].cmd(f"ip route show {FOREIGN_ROUTE}").strip() == ""
    logged = run.client.call(A, "log", lines=200)
    assert any("static routes installed again" in line and "10.12.0.0/24" in line for line in logged)
    # The other routes of r22a (through r20a) were never touched.
    assert "via 10.255.0.6" in run.net[A].cmd("ip route show 10.14.0.0/24")


def test_a_route_deleted_by_hand_comes_back_within_the_periodic_look(run: MoatNetwork) -> None:
    """No link event at all: the periodic look (every second) is the fallback."""
    node = run.net[B]
    assert node.cmd("ip route del 10.16.0.0/21").strip() == ""
    start = time.monotonic()
    wait_until(lambda: "via 10.255.0.1" in node.cmd("ip route show 10.16.0.0/21"), 5,
               interval=0.02, what="r18a's route to net 16 back")
    took = time.monotonic() - start
    print(f"a deleted route back after {took:.3f} s")
    assert took < 3.0, took


def test_moat_show_status_still_reads(run: MoatNetwork) -> None:
    """The role's status is part of every agent's status and the CLI still renders it."""
    import sys

    out = subprocess.run([sys.executable, "-m", "experiments.cli", "show", "status", "--run",
                          run.run.run_id], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert A in out.stdout
