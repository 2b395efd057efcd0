"""Reachable from everywhere after every move (issue 18): the object goes round net 12
(r18b, FOA r18a) → net 14 (r20a, its own FOA) → home (r22c) → net 12, in both migration
modes. After each step the FOA it left has forgotten it (its HOA's revocation, or its own
deregistration through that FOA), no router keeps a route to its old place, and every host
of every network and every router gets its requests answered."""

from __future__ import annotations

import secrets

import pytest

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

HOA, FOAS = "r22b", ("r18a", "r20a")
#: Where the object goes, and the FOA it is then a visitor of (None: at home).
CYCLE = [("r20a", "r20a"), ("r22c", None), ("r18b", "r18a")]
ASKERS = ("co12", "co14", "dns23", "site24", "r18a", "r18b", "r20a", "r22a", "r22b", "r22c")


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo(), advertise_interval=0.5) as m:
        m.place_object("counter", "r18b")
        m.wait_for(lambda: visitors_of(m, "r18a"), timeout=15)
        yield m


def home_address(m: MoatNetwork) -> str:
    return m.objects["counter"].home_address


def visitors_of(m: MoatNetwork, foa: str) -> list[dict]:
    return [v for v in m.agent(foa).call("visitors") if v["home_address"] == home_address(m)]


def addresses(m: MoatNetwork, router: str) -> set[str]:
    return {str(a.ip) for a in m.topo.addresses(router)}


def routes_to_object(m: MoatNetwork, router: str) -> list[str]:
    """Every route of ``router`` (all tables) for the object's home address."""
    out = m.net[router].cmd("ip -4 -o route show table all")
    return [line.strip() for line in out.splitlines()
            if line.split()[:2] in (["local", home_address(m)], [home_address(m)])
            or line.startswith(home_address(m) + " ")]


def check_place(m: MoatNetwork, host: str, foa: str | None) -> None:
    """The FOAs and the routes know the object at ``host`` (via ``foa``), and nowhere else."""
    for other in FOAS:
        vs = visitors_of(m, other)
        if other != foa:
            assert vs == [], f"{other} still lists the object as its visitor: {vs}"
        else:
            assert [v["local_address"] in addresses(m, host) for v in vs] == [True], vs
    for router in m.topo.router_names():
        for line in routes_to_object(m, router):
            if router == host:
                continue  # where it runs, the address is its own
            if router == HOA and foa is not None and " dev moat0 " in line + " ":
                continue  # away: the HOA tunnels it (its GRE device)
            via = line.split(" via ")[1].split()[0] if " via " in line else None
            assert router == foa and via is not None and via in addresses(m, host), \
                f"{router} routes the object's home address to its old place: {line!r}"
    if foa is not None and foa != host:
        assert routes_to_object(m, foa), f"{foa} has no route to the object at {host}"


def check_reachable(m: MoatNetwork) -> None:
    for asker in ASKERS:
        answer = m.requests(asker, "counter", 5, rate=100)
        assert answer["answered"] == answer["sent"] == 5, (asker, answer)


@pytest.mark.parametrize("mode", ["break-before-make", "make-before-break"])
def test_move_cycle_leaves_no_stale_visitor_or_route(net: MoatNetwork, mode: str) -> None:
    assert net.where("counter") == "r18b"
    check_place(net, "r18b", "r18a")
    check_reachable(net)
    for host, foa in CYCLE:
        report = net.migrate("counter", host, mode)
        assert report["ok"], report
        # Within a few milliseconds of the new binding: the migration is over here, and the
        # revocation (or the source's deregistration) came before its commit.
        check_place(net, host, foa)
        check_reachable(net)
    revocations = net.agent(HOA).call("status")["revocations"]
    assert revocations["pending"] == 0 and revocations["given_up"] == 0, revocations
    if mode == "break-before-make":  # every move replaced or removed a binding at the HOA
        assert revocations["acknowledged"] >= 2, revocations
        assert max(revocations["ack_delays_ms"]) < 100, revocations
    for foa in FOAS:
        stats = net.agent(foa).call("status")["foreign_stats"]
        assert stats["refused_revocations"] == 0, (foa, stats)


def test_revocation_from_a_host_that_is_not_the_hoa_is_refused(net: MoatNetwork) -> None:
    """A revocation co12 sends in the HOA's name (it holds no Foreign-Home key) removes
    nothing: the visitor stays and the object still answers from net 12."""
    from packets import ExtType, append_auth
    from packets.ident import new_identification
    from packets.mobileip import RegistrationRevocation

    assert net.where("counter") == "r18b"
    before = [v["identification"] for v in visitors_of(net, "r18a")]
    hoa = str(net.topo.addresses(HOA)[0].ip)
    forged = append_auth(RegistrationRevocation(home_address(net), hoa, "10.12.0.1", 2**31,
                                                new_identification()).encode(),
                         ExtType.FOREIGN_HOME_AUTH, 2000, secrets.token_bytes(32))
    net.net["co12"].cmd(
        "python3 -c \"import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
        f"s.sendto(bytes.fromhex('{forged.hex()}'), ('10.12.0.1', 434))\"")
    net.wait_for(lambda: net.agent("r18a").call("status")["foreign_stats"]
                 ["refused_revocations"] >= 1, timeout=5)
    assert [v["identification"] for v in visitors_of(net, "r18a")] == before and before
    check_reachable(net)
