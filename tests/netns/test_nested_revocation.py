"""A part's previous FOA forgets it at once (issue 18), on real namespaces: PatentTopo with
``pair-svc``'s object ``svc`` on r18b and its part ``tally`` moved to r20a as a secondary (as
in test_secondaries_patent.py), so r18b, the object's router, is the part's home agent.

The part then moves twice in each mode, r20a → r18a → r20a. Break-before-make: its new
registration replaces its binding at the nested home agent and nobody deregisters through
the FOA it left, so the nested home agent revokes the binding there (RFC 3543 revocation
from the object's home address, signed under the nested-home credential), and that FOA
drops its visitor entry and its route for the part before it acknowledges. Make-before-break:
the target registers with S beside the source's binding, then the source deregisters
through the FOA it leaves (which drops its visitor itself; no revocation). Either way,
within a short bound of the new binding neither is left at the previous FOA, and the part
answers from every host of every network and from every router.
"""

from __future__ import annotations

import time

import pytest

from agent.core.wait import WaitTimeout
from experiments.counter_service import publish_pair
from test_secondaries_patent import (BEFORE, HOME, PART, PART_ADDRESS, R18A, R20A, RESOURCES,
                                     SERVICE, assert_answered_once, instances, nested,
                                     part_count)
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

HOA = "r22b"
FOAS = {"r18a": R18A, "r20a": R20A}
ASKERS = ("co12", "co14", "dns23", "site24", "r18a", "r18b", "r20a", "r22a", "r22b", "r22c")
#: The old FOA's visitor and route must be gone within this of the new binding (the
#: revocation leaves with the nested home agent's reply; its acknowledgement comes after
#: the FOA removed both). Generous for a loaded 2-core machine; measured: see the print.
ACK_BOUND_MS = 100.0
#: Every asker gets five of five answers within this after a move (seconds).
REACH_S = 3.0


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


def part_visitors(m: MoatNetwork, foa: str) -> list[dict]:
    return [v for v in m.agent(foa).call("visitors") if v["home_address"] == PART_ADDRESS]


def part_routes(m: MoatNetwork, router: str) -> list[str]:
    """``router``'s routes (all tables) for the part's address itself (not the object's
    prefix, which its FOA routes to the object's router, the part's home agent)."""
    out = m.net[router].cmd("ip -4 -o route show table all")
    return [line.strip() for line in out.splitlines()
            if PART_ADDRESS in line.split()[:2]]


def revocations(m: MoatNetwork) -> dict:
    return m.agent("r18b").call("status")["nested_revocations"]["pair"]


def where_part(m: MoatNetwork) -> str:
    (router,) = [r for r in ("r18a", "r18b", "r20a", "r22c")
                 if any(o["name"] == PART for o in m.agent(r).call("objects"))]
    return router


def move(m: MoatNetwork, to: str, mode: str) -> None:
    source = where_part(m)
    report = m.agent(source, timeout=60).call("migrate", name=PART, target=FOAS[to],
                                              mode=mode, target_name=to)
    assert report["ok"], report


def check_reachable(m: MoatNetwork) -> None:
    """Every host and router gets an answer from the part (without a credential it answers
    with a refusal: a secondary answers those; what counts here is that it is reached)."""
    for asker in ASKERS:
        answers: list[dict] = []

        def all_five() -> bool:
            answers.append(m.client.requests_at(asker, PART_ADDRESS, 5, rate=100))
            return answers[-1]["answered"] == answers[-1]["sent"] == 5

        # Within REACH_S: a stale visitor kept the part away for a registration lifetime
        # (issue 18). One batch from r20a, before any move, once went unanswered (1 of 10
        # runs, not reproduced): a second batch is asked then, not a failure reported.
        try:
            m.wait_for(all_five, REACH_S, interval=0.1)
        except WaitTimeout:
            raise AssertionError((asker, answers[-3:])) from None


@pytest.mark.parametrize("mode", ["break-before-make", "make-before-break"])
def test_each_previous_foa_forgets_the_part_at_once_and_it_answers_everywhere(
        net: MoatNetwork, secondary: dict, mode: str) -> None:
    assert where_part(net) == "r20a" and part_visitors(net, "r20a")
    check_reachable(net)
    before = revocations(net)
    count = part_count(net, "r20a")
    measured = []
    for new, old in (("r18a", "r20a"), ("r20a", "r18a")):
        move(net, new, mode)
        done = time.monotonic()
        # The new binding, through the new FOA; the old FOA has neither the visitor nor a
        # route for the part (read at once: the revocation's acknowledgement, which comes
        # after both went, was in by the time the move's commit returned, or very nearly).
        net.wait_for(lambda: nested(net) == [(PART_ADDRESS, FOAS[new], "secondary")], 5)
        net.wait_for(lambda: part_visitors(net, old) == [] and part_routes(net, old) == [], 1)
        seen = time.monotonic() - done
        status = revocations(net)
        assert status["pending"] == 0 and status["given_up"] == before["given_up"], status
        if mode == "break-before-make":  # the nested home agent revoked it
            assert status["acknowledged"] == before["acknowledged"] + 1, status
            delay = status["ack_delays_ms"][-1]
            assert delay < ACK_BOUND_MS, status
        else:  # the source deregistered through that FOA: nothing to revoke
            assert status["sent"] == before["sent"], status
            delay = 0.0
        measured.append((old, delay, seen))
        (visitor,) = part_visitors(net, new)
        assert visitor["home_agent"] == HOME, visitor
        # Nowhere else: no other FOA lists the part.
        for foa in FOAS:
            if foa != new:
                assert part_visitors(net, foa) == [], foa
        stats = net.agent(old).call("status")["foreign_stats"]
        assert stats["refused_revocations"] == 0 and stats["revoked_visitors"] >= 1, stats
        # The part moved with its state and answers from everywhere.
        assert where_part(net) == new
        assert part_count(net, new) == count
        check_reachable(net)
        before = status
    assert revocations(net)["bad_acks"] == 0
    print(f"nested home agent, {mode}: " + "; ".join(
        (f"{old} acknowledged the revocation {d:.1f} ms after the new binding, "
         if d else f"{old} (deregistered through), ")
        + f"its visitor and route seen gone {s * 1000:.0f} ms after the move returned"
        for old, d, s in measured))
