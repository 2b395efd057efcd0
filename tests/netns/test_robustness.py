"""Malformed packets at every agent (issue 3, line 13): never a dead agent, never a changed
binding. Mutations come from a real host on the network, as real packets. Objects start the
default way (forked by the agent's fork server); the malformed packets never reach an object's
start path, so the exec'd way is not run again here (test_sandbox.py and
test_object_survives_agent.py run both)."""

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


NAN_SPEC = "agent.objects.misbehaving:NaNCounter"


def test_a_nan_state_fails_a_migration_cleanly_and_the_object_serves_on(net: MoatNetwork) -> None:
    """Issue 12: an object whose state holds a NaN cannot be checkpointed. Each mode of move
    is refused before anything stops (the checkpoint is taken and checked first); the object
    keeps serving at its source with its state, and the target runs nothing."""
    where = net.where("counter")
    if where is not None:
        net.agent(where).call("object_stop", name="counter", deregister=True)
    net.place_object("counter", "r18b", spec=NAN_SPEC)

    def count() -> int:
        return net.agent("r18b").call("object_stats", name="counter")["state"]["count"]

    first = net.requests("co14", "counter", 10)["answered"]
    assert first >= 3 and count() == first  # from here on its state holds a NaN
    for mode in ("make-before-break", "break-before-make"):
        report = net.migrate("counter", "r20a", mode)
        assert not report["ok"] and "not strict JSON" in report["error"], report
        assert not report["killed"]
        assert not any("stopped" in step for step, _at in report["steps"]), report["steps"]
        assert net.where("counter") == "r18b"
        assert net.agent("r20a").call("objects") == []
    assert count() == first, "the state stayed with the object"
    again = net.requests("co14", "counter", 10)["answered"]
    assert again > 0 and count() == first + again
    assert net.agent("r18b").call("status")["killed_objects"] == []
    net.agent("r18b").call("object_stop", name="counter", deregister=True)


def test_a_checkpoint_too_large_to_move_is_refused_and_the_object_serves_on(net: MoatNetwork) -> None:
    """Issue 12: a checkpoint over what a move can carry is refused with CheckpointTooLarge
    before anything stops; the object serves on at its source with its state."""
    where = net.where("counter")
    if where is not None:
        net.agent(where).call("object_stop", name="counter", deregister=True)
    net.place_object("counter", "r18b", spec="agent.objects.misbehaving:Hoarder")

    def count() -> int:
        return net.agent("r18b").call("object_stats", name="counter")["state"]["count"]

    first = net.requests("co14", "counter", 10, rate=20)["answered"]
    assert first >= 8 and count() == first  # over 800 KB of state
    report = net.migrate("counter", "r20a", "make-before-break")
    assert not report["ok"] and report["error_type"] == "CheckpointTooLarge", report
    assert "a move can carry" in report["error"] and not report["killed"]
    assert net.where("counter") == "r18b" and net.agent("r20a").call("objects") == []
    again = net.requests("co14", "counter", 5, rate=20)["answered"]
    assert again > 0 and count() == first + again
    net.agent("r18b").call("object_stop", name="counter", deregister=True)
