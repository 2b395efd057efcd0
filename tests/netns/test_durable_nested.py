"""The nested home agent's bindings are durable (issue 13, item 2) on real namespaces:
PatentTopo with ``pair-svc``'s object ``svc`` on r18b and its part ``tally`` moved to r20a as
a secondary (as in test_secondaries_patent.py), so r18b is the part's home agent.

``kill -9`` of r18b's agent: its supervisor restarts it, the restarted agent resumes the
nested home from its journal (the same GRE key, the remaining lifetime, the ``mnh`` tunnel
rebuilt), and the home network's requests for the part reach it again through HOA → r18b →
r20a without the part registering again. (The restarted agent takes the object's VM over
after its roles started, agent/vm/recovery.py; the nested home does not wait for it: it is
back before UDP 434 of the object's address answers anything.)
"""

from __future__ import annotations

import time

import pytest

from agent.core.wait import wait_until
from experiments.counter_service import publish_pair
from test_durable_bindings import kill_agent
from test_secondaries_patent import (BEFORE, HOME, PART, PART_ADDRESS, R20A, RESOURCES, SERVICE,
                                     assert_answered_once, instances, nested, part_count)
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

HOA = "r22b"


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo(), objects=["svc", "svc2"]) as m:
        publish_pair(m, SERVICE)
        yield m


@pytest.fixture(scope="module")
def secondary(net: MoatNetwork) -> dict:
    """The primary on r18b; dns23 leases the part (served at home), then co14's lease moves
    it to r20a as a secondary whose home agent is r18b."""
    answer = net.provision("r18b", vm="pair", kind="service", service=SERVICE,
                           mobile={"counter": "svc"}, leased=True, resources=RESOURCES)
    assert answer["ok"], answer
    net.wait_for(lambda: instances(net), 15)
    net.wait_for(lambda: net.agent(HOA).call("bindings"), 15)
    g1 = net.client.lease_request("dns23", PART, 60, 0.6, 300)
    hop = g1["hops"][0]
    assert_answered_once(net.client.leased_requests(hop["lease_id"], BEFORE, 50), ["r18b"],
                         first=1)
    g2 = net.client.lease_request("co14", PART, 60, 0.6, 300)
    assert g2["hops"][0]["instance"].startswith("r20a/"), g2
    net.wait_for(lambda: nested(net) == [(PART_ADDRESS, R20A, "secondary")], 10)
    return {"lease": hop["lease_id"]}


def accepted(m: MoatNetwork) -> list[dict]:
    """The part's accepted registrations on r20a (its registration client's attempts)."""
    [obj] = [o for o in m.agent("r20a").call("objects") if o["name"] == PART]
    return [a for a in obj["attempts"] if a["code"] == 0]


def test_a_secondarys_binding_survives_a_kill_of_its_home_agents_router(
        net: MoatNetwork, secondary: dict) -> None:
    (before,) = net.agent("r18b").call("nested")["pair"]
    attempts = accepted(net)
    assert attempts, "the part registered with r18b"
    count = part_count(net, "r20a")
    read_before = time.monotonic()
    killed = kill_agent(net, "r18b")
    back = time.monotonic()
    (after,) = wait_until(lambda: net.agent("r18b").call("nested").get("pair"), 5,
                          interval=0.02, what="r18b's nested home resumed")
    read_after = time.monotonic()
    # The same binding, from the journal: same care-of address and GRE key (r20a's FOA
    # still matches it), its lifetime running down, not a fresh one.
    for field in ("home_address", "care_of_address", "gre_key", "identification", "part"):
        assert after[field] == before[field], field
    assert after["remaining"] <= before["remaining"] - (back - read_before) + 0.1
    assert after["remaining"] >= before["remaining"] - (read_after - read_before) - 0.1
    assert "dev mnh" in net.net["r18b"].cmd(f"ip route get {PART_ADDRESS}")
    # The home network's requests for the part reach it again: HOA → r18b → r20a.
    sent = net.client.leased_requests(secondary["lease"], 10, 50)
    served = time.monotonic() - back
    assert_answered_once(sent, ["r20a"], first=count + 1)
    # ... without the part registering again.
    assert accepted(net) == attempts
    files = net.net["r18b"].cmd(f"ls -l {net.run.dir}/r18b.nested-svc.journal")
    assert files.startswith("-rw-------"), files
    print(f"r18b: back {back - killed:.2f} s after kill -9; the part's binding restored with "
          f"{after['remaining']:.1f} s left; 10/10 requests for it answered by r20a within "
          f"{served:.2f} s after; home agent address {HOME}")
