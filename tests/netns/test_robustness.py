"""Malformed packets at every agent (issue 3, line 13): never a dead agent, never a changed
binding. Mutations come from a real host on the network, as real packets."""

from __future__ import annotations

import pytest

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

MUTATIONS = 1000


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo(), advertise_interval=0.5) as m:
        yield m


def stable(rows: list[dict]) -> list[tuple]:
    return sorted((b["home_address"], b["care_of_address"], b["care_of_name"], b["gre_key"],
                   b["identification"]) for b in rows)


def test_mutated_messages_to_every_agent(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b", lifetime=300)
    before = stable(net.wait_for(lambda: net.agent("r22b").call("bindings"), timeout=15))
    pids = {r: net.agent(r).call("status")["pid"] for r in net.topo.router_names()}
    targets = {r: str(net.topo.addresses(r)[0].ip) for r in net.topo.router_names()}
    for router, address in targets.items():
        sent = net.probe("co12", "fuzz", address, "--count", str(MUTATIONS), "--seed", str(len(router) + ord(router[-1])), timeout=120)
        assert sent == {"udp": MUTATIONS, "icmp": MUTATIONS}
    for router in net.topo.router_names():
        status = net.agent(router).call("status")
        assert status["pid"] == pids[router], f"agent on {router} restarted"
        assert status["malformed"] > 0, f"no mutation reached the parser of {router}"
    assert stable(net.agent("r22b").call("bindings")) == before
    # The agents still do their job: a fresh registration goes through.
    assert net.agent("r18b").call("register", name="counter")["code"] == 0


def test_mutated_control_messages_to_every_agent(net: MoatNetwork) -> None:
    """TCP 4340 (MIGRATE, STATE_TRANSFER, PROVISION) from a host: mutated, cut and doubled
    messages get an answer or a closed connection; no agent dies, nothing starts."""
    pids = {r: net.agent(r).call("status")["pid"] for r in net.topo.router_names()}
    hosted = {r: [o["name"] for o in net.agent(r).call("objects")] for r in net.topo.router_names()}
    for router in net.topo.router_names():
        address = str(net.topo.addresses(router)[0].ip)
        tally = net.probe("co12", "ctlfuzz", address, "--count", "150", "--seed", str(ord(router[-1])),
                          timeout=300)
        assert tally["sent"] == 150 and tally["timeout"] == 0, tally
        assert tally["answered"] > 0, tally  # the parser was reached, and answered refusals
    for router in net.topo.router_names():
        assert net.agent(router).call("status")["pid"] == pids[router], f"agent on {router} restarted"
        assert [o["name"] for o in net.agent(router).call("objects")] == hosted[router]
        assert net.agent(router).call("vm") == []
    assert net.agent("r18b").call("register", name="counter")["code"] == 0
