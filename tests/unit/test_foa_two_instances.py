"""Two instances of one object behind one FOA (patent 104 and 108 on one network; issue 11):
the FOA's visitor list per care-of address, its data plane handing the instance behind it its
packets as frames by GRE key, the placement rule that allows it, and the broker leasing that
network's COs the instance on the FOA. No root, no network: real HOA and FOA logic, a fake
tunnel and faked netlink."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.broker.broker import Broker
from agent.broker.directory import Instance
from agent.core import netlink
from agent.core.config import Credential, ForeignConfig, HomeConfig, HomeObject
from agent.distribution.capacity import Offer, Room, placeable
from agent.mobility.dataplane import DataPlane
from agent.mobility.foreign import ForeignAgent
from agent.mobility.home import HomeAgent
from packets import (ExtType, NaiExtension, RegistrationReply, RegistrationRequest, ReplyCode,
                     RequestFlags, append_auth)
from packets.ident import new_identification

HOME, HOA, NAI = "10.16.0.100", "10.16.0.2", "svc@home.moat"
LAN, BACKBONE = "10.12.0.1", "10.255.0.2"  # r18a's first and second care-of addresses
BEHIND = "10.12.0.2"  # r18b, which runs the primary
MH = Credential(0x100, b"mobile-home key of svc")
MF = Credential(0x400, b"mobile-foreign key of svc")
FH = Credential(0x800, b"foreign-home key of r18a")
MAC = "02:00:00:00:12:02"


class Network:
    """r18a as FOA (addresses LAN and BACKBONE) and a real HOA."""

    def __init__(self) -> None:
        self.hoa = HomeAgent(HomeConfig(objects=[HomeObject(HOME, NAI, MH)], trusted_foas=[FH]),
                             HOA)
        self.foa = ForeignAgent(ForeignConfig(trusted_objects=[MF], foreign_home=FH), "r18a",
                                {LAN, BACKBONE})
        self._ident: int | None = None

    def register(self, router: str, coa: str, lifetime: int = 60) -> RegistrationReply:
        self._ident = new_identification(last=self._ident)
        rrq = RegistrationRequest(HOME, HOA, coa, self._ident, lifetime,
                                  RequestFlags.G | RequestFlags.S, [NaiExtension(NAI)])
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, MH.spi, MH.key)
        data = append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, MF.spi, MF.key)
        relay = self.foa.handle_request(RegistrationRequest.decode(data), router, 40000)
        assert relay.to_home_agent is not None, relay
        reply = self.hoa.handle(RegistrationRequest.decode(relay.to_home_agent)).reply
        assert self.foa.handle_reply(RegistrationReply.decode(reply), HOA) is not None
        return RegistrationReply.decode(reply)


class FakeTunnel:
    backend = "userspace"

    def __init__(self) -> None:
        self.accepted: set[tuple[str, int]] = set()
        self.deliveries: dict[tuple[str, int], tuple[str, str]] = {}

    def restrict(self, remote: str, key: int, destinations: Any) -> None:
        self.serves = getattr(self, "serves", {})
        self.serves[(remote, key)] = destinations

    def accept(self, remote: str, key: int) -> None:
        self.accepted.add((remote, key))

    def forget(self, remote: str, key: int) -> None:
        self.accepted.discard((remote, key))

    def set_delivery(self, remote: str, key: int, via: Any) -> None:
        if via is None:
            self.deliveries.pop((remote, key), None)
        else:
            self.deliveries[(remote, key)] = via

    def set_reverse(self, *_: Any) -> None:
        pass

    async def settle(self) -> None:
        pass


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Routes the data plane installs, and the neighbour table it reads."""
    state: dict[str, Any] = {"routes": {}, "neighbours": {BEHIND: ("r18a-eth0", MAC)}}

    async def replace(destination: str, via: str) -> None:
        state["routes"][destination] = via

    async def delete(destination: str) -> None:
        state["routes"].pop(destination, None)

    async def neighbour_of(address: str) -> Any:
        return state["neighbours"].get(address)

    monkeypatch.setattr(netlink, "route_replace", replace)
    monkeypatch.setattr(netlink, "route_del", delete)
    monkeypatch.setattr(netlink, "neighbour_of", neighbour_of)
    return state


def test_two_instances_get_two_visitor_entries_and_two_bindings() -> None:
    net = Network()
    assert net.register(BEHIND, LAN).code == ReplyCode.ACCEPTED
    assert net.register(LAN, BACKBONE).code == ReplyCode.ACCEPTED  # r18a's own instance
    visitors = sorted((v.care_of_address, v.local_address, v.care_of_name)
                      for v in net.foa.visitors.of(HOME))
    assert [(c, lo) for c, lo, _ in visitors] == [(LAN, BEHIND), (BACKBONE, LAN)]
    assert len({name for *_, name in visitors}) == 2, "a second care-of-name too"
    assert sorted(b.care_of_address for b in net.hoa.bindings.for_home(HOME)) == [LAN, BACKBONE]
    # One of them deregisters: only its entry and its binding go.
    assert net.register(LAN, BACKBONE, lifetime=0).code == ReplyCode.ACCEPTED
    assert [v.care_of_address for v in net.foa.visitors.of(HOME)] == [LAN]
    assert [b.care_of_address for b in net.hoa.bindings.for_home(HOME)] == [LAN]


def test_the_instance_behind_the_foa_gets_its_packets_as_frames_while_the_foa_runs_one(
        kernel: dict[str, Any]) -> None:
    net, tunnel = Network(), FakeTunnel()
    dataplane = DataPlane(tunnel, {LAN, BACKBONE})
    net.register(BEHIND, LAN)
    asyncio.run(dataplane.sync_foreign(net.foa))
    behind_key = net.foa.visitors.get(HOME, LAN).gre_key
    assert kernel["routes"] == {f"{HOME}/32": BEHIND} and tunnel.deliveries == {}

    net.register(LAN, BACKBONE)  # a duplicate on r18a itself
    asyncio.run(dataplane.sync_foreign(net.foa))
    own_key = net.foa.visitors.get(HOME, BACKBONE).gre_key
    assert tunnel.accepted == {(HOA, behind_key), (HOA, own_key)}
    assert kernel["routes"] == {}, "no route: r18a holds the address, keys tell them apart"
    assert tunnel.deliveries == {(HOA, behind_key): ("r18a-eth0", MAC)}

    net.register(LAN, BACKBONE, lifetime=0)  # the duplicate goes again
    asyncio.run(dataplane.sync_foreign(net.foa))
    assert tunnel.accepted == {(HOA, behind_key)} and tunnel.deliveries == {}
    assert kernel["routes"] == {f"{HOME}/32": BEHIND}


def test_without_the_routers_mac_the_foa_falls_back_to_the_route(kernel: dict[str, Any],
                                                                monkeypatch) -> None:
    kernel["neighbours"].clear()
    monkeypatch.setattr("agent.mobility.dataplane.ARP_POLLS", 1)
    monkeypatch.setattr("agent.mobility.dataplane._provoke_arp", lambda address: None)
    net, tunnel = Network(), FakeTunnel()
    dataplane = DataPlane(tunnel, {LAN, BACKBONE})
    net.register(BEHIND, LAN)
    net.register(LAN, BACKBONE)
    asyncio.run(dataplane.sync_foreign(net.foa))
    assert tunnel.deliveries == {}  # logged; nothing half-installed


# --- placement -----------------------------------------------------------------------------


def offer(router: str, network: str, objects=(), visiting=(), frames=False, cpu=2.0) -> Offer:
    return Offer(router, router, network, Room(cpu, 2048), tuple(objects), False,
                 tuple(visiting), frames)


def test_a_second_instance_on_a_network_goes_only_on_the_foa_in_front_of_the_first() -> None:
    need = Room(1.0, 256)
    r18b = offer("r18b", "10.12.0.0/24", objects=["svc"])
    r18a = offer("r18a", "10.12.0.0/24", visiting=[HOME], frames=True)
    assert placeable([r18b, r18a], "svc", need, HOME) == [r18a]
    # Not when its tunnel cannot hand packets over by key, nor when the first is not behind it.
    assert placeable([r18b, offer("r18a", "10.12.0.0/24", visiting=[HOME])], "svc", need,
                     HOME) == []
    assert placeable([r18b, offer("r18a", "10.12.0.0/24", frames=True)], "svc", need, HOME) == []
    # Never a third on one network.
    r18c = offer("r18c", "10.12.0.0/24", visiting=[HOME], frames=True)
    r18a_running = offer("r18a", "10.12.0.0/24", objects=["svc"], visiting=[HOME], frames=True)
    assert placeable([r18b, r18a_running, r18c], "svc", need, HOME) == []


# --- the broker --------------------------------------------------------------------------------


def instance(iid: str, router: str, network: str, *, part: str = "duplicate",
             gateway: bool = False) -> Instance:
    return Instance("count-svc", iid, HOME, 4341, router, share=100.0, cpu=1.0,
                    objects=("svc",), part=part, router_address="10.0.0.1", network=network,
                    gateway=gateway)


def test_cos_on_a_network_with_two_instances_get_the_one_on_the_foa() -> None:
    nets = {"10.12.0.30": "10.12.0.0/24", "10.16.0.23": "10.16.0.0/24"}
    broker = Broker(network_of=lambda address: nets.get(address or "", ""))
    broker.register_instance(instance("r18b/p@1", "r18b", "10.12.0.0/24", part="primary"))
    early = broker.request("co12", "count-svc", 30, 0.3, co_network="10.12.0.30")
    assert early.hops[0].instance == "r18b/p@1"
    broker.register_instance(instance("r18a/d@1", "r18a", "10.12.0.0/24", gateway=True))
    # co12's lease follows its network's traffic to the FOA's instance, share and all.
    assert [lease["instance"] for lease in broker.leases()] == ["r18a/d@1"]
    assert broker.admission.used("r18a/d@1").share == 30
    later = broker.request("co12", "count-svc", 30, 0.3, co_network="10.12.0.30")
    assert later.hops[0].instance == "r18a/d@1"
    # From the home network the HOA bicasts: either instance is reached.
    reachable, pinned = broker.reachable("10.16.0.23", "count-svc")
    assert reachable is None and pinned is False


def test_a_secondary_serves_its_part_only_and_a_part_never_pins_a_co() -> None:
    """The broker: a lease on the whole service never goes to a secondary (it runs one part);
    a CO on the primary's network asking for a part is not pinned to the full primary (its
    FOA routes the part's address to the object's router, which forwards it to wherever the
    part runs)."""
    nets = {"10.12.0.30": "10.12.0.0/24"}
    broker = Broker(network_of=lambda address: nets.get(address or "", ""))
    primary = Instance("pair-svc", "r18b/p@1", HOME, 4341, "r18b", share=100.0, cpu=1.0,
                       objects=("svc", "tally"), part="primary", router_address="10.12.0.2",
                       network="10.12.0.0/24", object_addresses={"tally": "10.16.0.224"})
    broker.register_instance(primary)
    broker.request("co12", "tally", 100, 1.0, co_network="10.12.0.30")  # fills the primary
    reachable, pinned = broker.reachable("10.12.0.30", "tally")
    assert pinned is False
    _, pinned_for_service = broker.reachable("10.12.0.30", "pair-svc")
    assert pinned_for_service is True  # the object's own address: its network delivers it
    secondary = Instance("pair-svc", "r20a/s@1", "10.16.0.224", 4341, "r20a", share=100.0,
                         cpu=1.0, objects=("tally",), part="secondary",
                         router_address="10.14.0.1", network="10.14.0.0/24")
    broker.register_instance(secondary)
    with pytest.raises(Exception) as refused:  # the service: only the (full) primary offers it
        broker.request("co14", "pair-svc", 50, 0.5, co_network="10.14.0.30")
    assert getattr(refused.value, "reason", "") == "no_capacity"
    hop = broker.request("co14", "tally", 50, 0.5, co_network="10.14.0.30").hops[0]
    assert (hop.instance, hop.address) == ("r20a/s@1", "10.16.0.224")


def test_the_foa_switches_to_frames_before_its_router_takes_the_home_address(
        kernel: dict[str, Any]) -> None:
    """A duplicate about to start on the FOA's router: from before its home address is added
    there, the instance behind gets its packets as frames (a routed one would stay here)."""
    net, tunnel = Network(), FakeTunnel()
    dataplane = DataPlane(tunnel, {LAN, BACKBONE})
    net.register(BEHIND, LAN)
    dataplane.frames_for.add(HOME)
    asyncio.run(dataplane.sync_foreign(net.foa))
    key = net.foa.visitors.get(HOME, LAN).gre_key
    assert tunnel.deliveries == {(HOA, key): ("r18a-eth0", MAC)} and kernel["routes"] == {}
    dataplane.frames_for.discard(HOME)
    asyncio.run(dataplane.sync_foreign(net.foa))
    assert tunnel.deliveries == {} and kernel["routes"] == {f"{HOME}/32": BEHIND}


def test_the_foa_tells_its_tunnel_what_each_visitor_may_receive(kernel: dict[str, Any]) -> None:
    """Issue 12: each (HOA, key) carries packets for its visitor's home address only."""
    net, tunnel = Network(), FakeTunnel()
    net.register(BEHIND, LAN)
    asyncio.run(DataPlane(tunnel, {LAN, BACKBONE}).sync_foreign(net.foa))
    key = net.foa.visitors.get(HOME, LAN).gre_key
    assert tunnel.serves == {(HOA, key): frozenset({HOME})}
