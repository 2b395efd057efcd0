"""The discovery, object-agent and hosting roles with fake sockets, peers and processes.

What each role adds around the pure logic: what a router advertises on which link, who
answers a solicitation, which role a registration message goes to, that the FOA relays a
reply only after its data plane is in place, and the order in which a hosted object is
stopped (hold, then the address, then the process). No root, no namespaces.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from agent.core.config import AgentConfig, Credential, ForeignConfig, HomeConfig, Interface
from agent.core.errors import ControlError
from agent.hosting import objects as objects_mod
from agent.hosting.objects import HostingRole
from agent.mobility.agent_role import ObjectAgentRole
from agent.mobility.discovery import Heard
from agent.mobility.discovery_role import DiscoveryRole
from packets import (AdvFlags, AgentAdvertisement, AgentSolicitation, ExtType, NaiExtension,
                     RegistrationReply, RegistrationRequest, ReplyCode, append_auth)
from packets.codes import MIP_PORT

LAN = Interface("eth0", "10.16.0.2", 24)
WAN = Interface("eth1", "10.255.0.1", 30, advertise=False)
LAN2 = Interface("eth2", "10.12.0.1", 24)


class FakeAgent:
    """The AgentContext roles see: config, interface table and role lookup."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.loop: Any = None
        self.ifindex = {i.name: n for n, i in enumerate(config.interfaces, start=2)}
        self.iface_by_index = {v: k for k, v in self.ifindex.items()}
        self.roles: list[Any] = []

    def role(self, cls: type) -> Any:
        return next((r for r in self.roles if isinstance(r, cls)), None)

    def require(self, cls: type) -> Any:
        role = self.role(cls)
        if role is None:
            raise ControlError(f"no {cls.name} role")
        return role

    def add(self, cls: type) -> Any:
        role = cls(self)
        self.roles.append(role)
        return role


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, str, int]] = []
        self.malformed = 0

    def send(self, payload: bytes, dest: str, ifindex: int) -> None:
        self.sent.append((payload, dest, ifindex))


def config(roles: list[str], interfaces: list[Interface] | None = None) -> AgentConfig:
    home = HomeConfig(max_lifetime=200, home_interface="eth0") if "home" in roles else None
    foreign = ForeignConfig(foreign_home=Credential(0x300, b"fh"), max_lifetime=120) \
        if "foreign" in roles else None
    return AgentConfig(name="r1", run_dir="/nonexistent", roles=roles,
                       interfaces=interfaces or [LAN, WAN, LAN2], home=home, foreign=foreign)


def discovery_for(roles: list[str]) -> tuple[DiscoveryRole, FakeSocket]:
    agent = FakeAgent(config(roles))
    discovery = agent.add(DiscoveryRole)
    object_agent = agent.add(ObjectAgentRole)
    discovery.offer = object_agent.offer  # what ObjectAgentRole.start does
    discovery.socket = sock = FakeSocket()  # type: ignore[assignment]
    return discovery, sock


def adverts(sock: FakeSocket) -> list[tuple[AgentAdvertisement, int]]:
    return [(AgentAdvertisement.decode(p), idx) for p, _dest, idx in sock.sent]


# --- discovery -----------------------------------------------------------------------------

def test_a_foreign_agent_advertises_on_every_lan_with_its_care_of_address() -> None:
    discovery, sock = discovery_for(["foreign"])
    discovery.advertise_all()
    sent = adverts(sock)
    assert [idx for _, idx in sent] == [2, 4]  # the LANs, never the backbone link (eth1)
    adv, _ = sent[1]
    assert AdvFlags.F in adv.flags and AdvFlags.H not in adv.flags
    assert adv.care_of_addresses == ["10.12.0.1"] and adv.registration_lifetime == 120


def test_a_pure_home_agent_advertises_only_on_its_home_link() -> None:
    discovery, sock = discovery_for(["home"])
    discovery.advertise_all()
    ((adv, idx),) = adverts(sock)
    assert idx == 2 and AdvFlags.H in adv.flags and AdvFlags.F not in adv.flags
    assert adv.care_of_addresses == [] and adv.registration_lifetime == 200


def test_a_router_without_agents_stays_silent_even_when_solicited() -> None:
    discovery, sock = discovery_for([])
    discovery.advertise_all()
    discovery.on_discovery(Heard(AgentSolicitation(), "10.12.0.50", 4, 1))
    assert sock.sent == []


def test_a_solicitation_is_answered_at_once_on_its_link_unless_paused() -> None:
    discovery, sock = discovery_for(["foreign"])
    discovery.on_discovery(Heard(AgentSolicitation(), "10.12.0.50", 4, 1))
    assert [idx for _, idx in adverts(sock)] == [4]
    discovery.cmd_advertising(False)
    discovery.on_discovery(Heard(AgentSolicitation(), "10.12.0.50", 4, 1))
    discovery.advertise_all()
    assert len(sock.sent) == 1


def test_sequence_numbers_wrap_to_256() -> None:
    discovery, sock = discovery_for(["foreign"])
    discovery.sequence = 0xFFFF
    discovery.advertise("eth0")
    assert adverts(sock)[0][0].sequence == 256


def test_heard_advertisements_reach_listeners_and_the_agents_table() -> None:
    discovery, sock = discovery_for([])
    got: list[tuple[str, int]] = []
    discovery.listeners.append(lambda adv, source, idx: got.append((source, idx)))
    adv = AgentAdvertisement(7, 120, AdvFlags.F | AdvFlags.G, ["10.12.0.1"], [("10.12.0.1", 0)], 9000)
    discovery.on_discovery(Heard(adv, "10.12.0.1", 4, 1))
    assert got == [("10.12.0.1", 4)]
    (row,) = discovery.cmd_agents()
    assert row["address"] == "10.12.0.1" and row["interface"] == "eth2" and row["sequence"] == 7


# --- the object agent ----------------------------------------------------------------------

class Recorder:
    """Stands in for UDP 434 and the data plane; keeps one ordered log."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def sendto(self, data: bytes, addr: tuple, source: str | None = None) -> None:
        self.log.append(("send", addr))


def object_agent(roles: list[str]) -> tuple[ObjectAgentRole, Recorder]:
    role = FakeAgent(config(roles)).add(ObjectAgentRole)
    rec = Recorder()
    role._mip = rec  # type: ignore[assignment]
    return role, rec


def request(coa: str, ha: str = "10.16.0.2", mobile_foreign: bool = True) -> bytes:
    rrq = RegistrationRequest("10.16.0.100", ha, coa, 1, 60, extensions=[NaiExtension("c@home.moat")])
    data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, 0x100, b"mh")
    return append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, 0x200, b"mf") if mobile_foreign else data


def test_an_objects_request_for_our_care_of_address_goes_to_the_foa() -> None:
    role, rec = object_agent(["foreign"])
    seen: list = []
    role.foreign = SimpleNamespace(handle_request=lambda rrq, a, p, i, **kw: seen.append((rrq.care_of_address, a, p))
                                   or SimpleNamespace(to_object=None, to_home_agent=b"relayed",
                                                      code=ReplyCode.ACCEPTED))
    role.on_registration(request("10.12.0.1"), ("10.12.0.50", 40000))
    assert seen == [("10.12.0.1", "10.12.0.50", 40000)]
    assert rec.log == [("send", ("10.16.0.2", MIP_PORT))]


def test_a_request_for_someone_elses_care_of_address_is_not_relayed() -> None:
    role, rec = object_agent(["foreign"])
    role.foreign = SimpleNamespace(handle_request=lambda *a: pytest.fail("relayed"))
    role.on_registration(request("10.99.0.1"), ("10.12.0.50", 40000))
    assert rec.log == []


def test_a_relayed_request_for_our_home_agent_address_goes_to_the_hoa() -> None:
    role, rec = object_agent(["home"])
    decision = SimpleNamespace(reply=b"reply", code=ReplyCode.ACCEPTED,
                               update=SimpleNamespace(first_away=True, now_home=False, activated=[],
                                                      removed=[]),
                               notices=[])
    served = {"10.16.0.100": ["binding"], "10.16.0.224": ["binding"]}  # with its prefix
    role.home = SimpleNamespace(handle=lambda rrq: decision,
                                bindings=SimpleNamespace(served=lambda: served))
    started: list[str] = []
    role.proxy_arp = SimpleNamespace(start=started.append, stop=lambda a: None, addresses=set())
    role.dataplane = SimpleNamespace(sync_home=lambda home: rec.log.append(("tunnel",)))
    role.on_registration(request("10.12.0.1", mobile_foreign=False), ("10.12.0.1", 434))
    # the reply, then the tunnel, then the claim on the home LAN (traffic finds the tunnel)
    assert rec.log == [("send", ("10.12.0.1", 434)), ("tunnel",)]
    assert started == ["10.16.0.100", "10.16.0.224"]


@pytest.mark.parametrize("update", [
    SimpleNamespace(first_away=True, now_home=False, activated=["standby"], removed=[]),
    SimpleNamespace(first_away=False, now_home=False, activated=[], removed=["binding"])],
    ids=["leave-home", "deregistration"])
def test_a_path_that_starts_or_ends_is_answered_only_once_the_tunnel_is_in_the_kernel(
        update: Any) -> None:
    """The instance at home holds as soon as it hears its leave-home accepted, and what
    reaches it then is routed to the HOA; the old FOA drops its visitor as it relays a
    deregistration's reply: tunnel, settled, the home link claimed, then the reply."""
    role, rec = object_agent(["home"])
    decision = SimpleNamespace(reply=b"reply", code=ReplyCode.ACCEPTED, update=update,
                               notices=[])
    role.home = SimpleNamespace(handle=lambda rrq: decision,
                                bindings=SimpleNamespace(served=lambda: {"10.16.0.100": ["b"]}))
    role.proxy_arp = SimpleNamespace(start=lambda a: rec.log.append(("claim", a)),
                                     stop=lambda a: None, addresses=set())

    class SlowPlane:
        def sync_home(self, home: Any) -> None:
            rec.log.append(("tunnel",))

        async def settle(self) -> None:
            await asyncio.sleep(0.01)  # the kernel takes a while
            rec.log.append(("settled",))

    role.dataplane = SlowPlane()  # type: ignore[assignment]

    async def main() -> None:
        role.agent.loop = asyncio.get_running_loop()
        role.on_registration(request("10.16.0.100", mobile_foreign=False), ("10.16.0.3", 434))
        assert not [e for e in rec.log if e[0] == "send"]  # nothing answered yet
        await asyncio.gather(*role._tasks)

    asyncio.run(main())
    assert rec.log == [("tunnel",), ("settled",), ("claim", "10.16.0.100"),
                       ("send", ("10.16.0.3", 434))]


def test_a_registration_during_a_deregistrations_settle_announces_the_address_again() -> None:
    """The object deregisters from home, and at once registers away again while the HOA
    waits for the kernel before answering the deregistration: the new binding's claim must
    go out on the home link (the removal let the address go at once), not be lost between
    a proxy that still held the address and a removal that found it served again."""
    role, rec = object_agent(["home"])
    served: dict[str, list] = {"10.16.0.100": ["b"]}
    announced: list[str] = []

    class Proxy:  # the real ProxyArp's bookkeeping: announce only an address it lacks
        addresses = {"10.16.0.100"}

        def start(self, address: str) -> None:
            if address not in self.addresses:
                self.addresses.add(address)
                announced.append(address)

        def stop(self, address: str) -> None:
            self.addresses.discard(address)

    role.proxy_arp = Proxy()  # type: ignore[assignment]
    dereg = SimpleNamespace(reply=b"reply", code=ReplyCode.ACCEPTED, notices=[],
                            update=SimpleNamespace(first_away=False, now_home=True, activated=[],
                                                   removed=["b"]))
    away = SimpleNamespace(reply=b"reply", code=ReplyCode.ACCEPTED, notices=[],
                           update=SimpleNamespace(first_away=True, now_home=False, activated=[],
                                                  removed=[]))

    def handle(rrq: Any) -> Any:
        if rrq.care_of_address == "10.16.0.100":
            served.clear()
            return dereg
        served["10.16.0.100"] = ["b2"]
        return away

    role.home = SimpleNamespace(handle=handle, bindings=SimpleNamespace(served=lambda: served))
    released = asyncio.Event()

    class SlowPlane:
        def sync_home(self, home: Any) -> None:
            pass

        async def settle(self) -> None:
            await released.wait()

    role.dataplane = SlowPlane()  # type: ignore[assignment]

    async def main() -> None:
        role.agent.loop = asyncio.get_running_loop()
        role.on_registration(request("10.16.0.100", mobile_foreign=False), ("10.16.0.3", 434))
        await asyncio.sleep(0)  # the deregistration now waits on the kernel
        role.on_registration(request("10.12.0.1", mobile_foreign=False), ("10.12.0.1", 434))
        released.set()
        await asyncio.gather(*role._tasks)

    asyncio.run(main())
    assert announced == ["10.16.0.100"]
    assert role.proxy_arp.addresses == {"10.16.0.100"}


def test_malformed_registration_messages_are_counted() -> None:
    role, rec = object_agent(["home", "foreign"])
    role.on_registration(b"\x01\x00", ("10.12.0.50", 1))
    assert role.malformed == 1 and rec.log == []


def test_the_foa_relays_a_reply_only_after_its_data_plane_is_in_place() -> None:
    role, rec = object_agent(["foreign"])
    pending = SimpleNamespace(object_address="10.12.0.50", object_port=40000,
                              local_address="10.12.0.1")
    role.foreign = SimpleNamespace(handle_reply=lambda rrp, source: (pending, b"to object"))

    class SlowPlane:
        async def sync_foreign(self, foreign: Any) -> None:
            await asyncio.sleep(0.01)  # the kernel takes a while to install the route
            rec.log.append(("routes",))

    role.dataplane = SlowPlane()  # type: ignore[assignment]
    reply = RegistrationReply(ReplyCode.ACCEPTED, "10.16.0.100", "10.16.0.2", 1, 60).encode()

    async def main() -> None:
        role.agent.loop = asyncio.get_running_loop()
        role.on_registration(reply, ("10.16.0.2", 434))
        await asyncio.gather(*role._tasks)

    asyncio.run(main())
    assert rec.log == [("routes",), ("send", ("10.12.0.50", 40000))]


# --- hosting -------------------------------------------------------------------------------

class FakeProcess:
    def __init__(self, log: list, fail_start: bool = False) -> None:
        self.log = log
        self.fail_start = fail_start
        self.running = False
        self.pid = 4242
        self.spec = "agent.objects.counter:Counter"

    async def start(self, warm: bool = False, state: Any = None) -> None:
        self.log.append(("start", warm, state))
        if self.fail_start:
            raise RuntimeError("sandbox refused")
        self.running = True

    async def call(self, cmd: str, **args: Any) -> Any:
        self.log.append(("call", cmd))
        return {}

    async def stop(self, kill: bool = False) -> Any:
        self.log.append(("stop",))
        self.running = False
        return {"object": {"count": 3}}

    def usage(self) -> dict:
        return {}


@pytest.fixture
def hosting(monkeypatch) -> tuple[HostingRole, list]:
    log: list = []

    async def add(address: str, prefixlen: int, ifname: str) -> None:
        log.append(("addr+", address, ifname))

    async def delete(address: str, prefixlen: int, ifname: str) -> None:
        log.append(("addr-", address, ifname))

    monkeypatch.setattr(objects_mod.netlink, "address_add", add)
    monkeypatch.setattr(objects_mod.netlink, "address_del", delete)
    agent = FakeAgent(config([]))
    role = agent.add(HostingRole)
    return role, log


def obj(name: str = "counter") -> Any:
    from agent.core.config import ObjectConfig

    return ObjectConfig.from_json({
        "name": name, "home_address": "10.16.0.100", "home_agent": "10.16.0.2",
        "nai": f"{name}@home.moat", "mobile_home": {"spi": 256, "key": "aa" * 16},
        "mobile_foreign": {"spi": 257, "key": "bb" * 16}})


def test_an_object_serves_only_once_its_address_is_there(hosting) -> None:
    role, log = hosting
    process = FakeProcess(log)
    asyncio.run(role.host_object(obj(), process, register=False))  # type: ignore[arg-type]
    assert log == [("start", True, None), ("addr+", "10.16.0.100", "lo"), ("call", "serve")]
    assert role.cmd_objects()[0]["pid"] == 4242


def test_stopping_holds_then_removes_the_address_then_stops(hosting) -> None:
    role, log = hosting
    asyncio.run(role.host_object(obj(), FakeProcess(log), register=False))  # type: ignore[arg-type]
    log.clear()
    stopped = asyncio.run(role.cmd_object_stop("counter", deregister=False))
    assert log == [("call", "hold"), ("addr-", "10.16.0.100", "lo"), ("stop",)]
    assert stopped["state"] == {"object": {"count": 3}}
    assert role.objects == {}


def test_a_failed_start_leaves_nothing_hosted(hosting) -> None:
    role, log = hosting
    with pytest.raises(RuntimeError):
        asyncio.run(role.host_object(obj(), FakeProcess(log, fail_start=True), register=False))  # type: ignore[arg-type]
    assert role.objects == {}
    assert ("addr+", "10.16.0.100", "lo") not in log


def test_an_object_runs_once_per_router(hosting) -> None:
    role, log = hosting
    asyncio.run(role.host_object(obj(), FakeProcess(log), register=False))  # type: ignore[arg-type]
    with pytest.raises(ControlError, match="already runs here"):
        asyncio.run(role.host_object(obj(), FakeProcess(log), register=False))  # type: ignore[arg-type]
    with pytest.raises(ControlError, match="no object 'ghost'"):
        asyncio.run(role.cmd_object_stop("ghost"))


def test_the_foa_is_told_the_interface_a_request_arrived_on() -> None:
    role, rec = object_agent(["foreign"])
    seen: list = []
    role.foreign = SimpleNamespace(handle_request=lambda rrq, a, p, i, **kw: seen.append(i)
                                   or SimpleNamespace(to_object=None, to_home_agent=b"relayed",
                                                      code=ReplyCode.ACCEPTED))
    eth2 = role.agent.ifindex["eth2"]
    role.on_registration(request("10.12.0.1"), ("10.12.0.50", 40000), eth2, "10.12.0.1")
    role.on_registration(request("10.12.0.1"), ("10.12.0.1", 40000), 1, "10.12.0.1")
    assert seen == ["eth2", "lo"]


def test_the_hoa_answers_from_the_address_the_request_was_sent_to() -> None:
    """RFC 5944 §3.8.3.1: the FOA relayed to that address and takes a reply only from it."""
    role, _ = object_agent(["home"])
    sent: list = []
    role._mip = SimpleNamespace(sendto=lambda data, addr, source=None: sent.append((addr, source)))
    decision = SimpleNamespace(reply=b"reply", code=ReplyCode.HA_FA_FAILED_AUTH, update=None)
    role.home = SimpleNamespace(handle=lambda rrq: decision)
    role.dataplane = SimpleNamespace(sync_home=lambda home: pytest.fail("a refusal syncs nothing"))
    role.on_registration(request("10.12.0.1", mobile_foreign=False), ("10.12.0.1", 434), 3,
                         "10.16.0.2")
    role.on_registration(request("10.12.0.1", mobile_foreign=False), ("10.12.0.1", 434), 3,
                         "224.0.0.1")  # not one of ours: the kernel chooses
    assert sent == [(("10.12.0.1", 434), "10.16.0.2"), (("10.12.0.1", 434), None)]


def test_the_foa_passes_the_replys_source_to_the_relay_check() -> None:
    role, rec = object_agent(["foreign"])
    sources: list = []
    role.foreign = SimpleNamespace(handle_reply=lambda rrp, source: sources.append(source))
    reply = RegistrationReply(ReplyCode.HA_ADMIN_PROHIBITED, "10.16.0.100", "10.16.0.2", 1, 0)
    role.on_registration(reply.encode(), ("10.99.0.9", 434))
    assert sources == ["10.99.0.9"] and rec.log == []


def test_refused_and_malformed_registration_packets_log_a_bounded_number_of_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    role, _ = object_agent(["home", "foreign"])
    with caplog.at_level("DEBUG", logger="agent.mobility.agent_role"):
        for n in range(5000):
            role.on_registration(b"\x01\x00" + bytes([n % 256]), ("10.12.0.66", 1000 + n))
            role.on_registration(request("10.99.0.1", ha="10.99.0.2"), ("10.12.0.66", 2))
    assert role.malformed == 5000
    assert role.refusals.counts == {"malformed": 5000, "no-role": 5000}
    assert len(caplog.records) <= 4  # the first of each kind, then one per interval at most


def test_a_housekeeping_tick_with_nothing_expired_does_no_data_plane_work() -> None:
    role, _ = object_agent(["home", "foreign"])
    expired: dict[str, list] = {"home": [], "foreign": []}
    role.home = SimpleNamespace(bindings=SimpleNamespace(expire=lambda: expired["home"],
                                                         served=lambda: {}))
    role.foreign = SimpleNamespace(visitors=SimpleNamespace(expire=lambda: expired["foreign"]),
                                   expire_pending=lambda timeout: [])
    synced: list = []
    role.dataplane = SimpleNamespace(sync_home=lambda home: synced.append("home"))
    role._spawn = lambda coro: (coro.close(), synced.append("foreign"))  # type: ignore
    role.proxy_arp = None
    for _ in range(100):
        role.housekeeping()
    assert synced == []
    expired["home"] = [SimpleNamespace(home_address="10.16.0.100", care_of_address="10.12.0.1")]
    expired["foreign"] = [SimpleNamespace(home_address="10.14.0.100")]
    role.housekeeping()
    assert synced == ["home", "foreign"]


def test_a_reconciliation_left_undone_is_retried_on_the_next_tick() -> None:
    role, _ = object_agent(["foreign"])
    role.foreign = SimpleNamespace(visitors=SimpleNamespace(expire=lambda: []),
                                   expire_pending=lambda timeout: [])
    results = [False, True]
    calls: list[int] = []

    class Plane:
        async def sync_foreign(self, foreign: Any) -> bool:
            calls.append(1)
            return results.pop(0)

    role.dataplane = Plane()  # type: ignore[assignment]

    async def main() -> None:
        role.agent.loop = asyncio.get_running_loop()
        await role.sync_foreign()  # after a reply: something could not be set up
        for _ in range(3):
            role.housekeeping()
            await asyncio.gather(*role._tasks)

    asyncio.run(main())
    assert len(calls) == 2  # one retry, then nothing more to do


def test_with_a_userspace_tunnel_a_deregistration_is_answered_at_once() -> None:
    """Its own table changed with set_peers: nothing in the kernel to wait for."""
    role, rec = object_agent(["home"])
    decision = SimpleNamespace(reply=b"reply", code=ReplyCode.ACCEPTED, notices=[],
                               update=SimpleNamespace(first_away=False, now_home=False,
                                                      activated=[], removed=["binding"]))
    role.home = SimpleNamespace(handle=lambda rrq: decision,
                                bindings=SimpleNamespace(served=lambda: {}))
    role.proxy_arp = SimpleNamespace(start=lambda a: None, stop=lambda a: None, addresses=set())
    role.dataplane = SimpleNamespace(sync_home=lambda home: rec.log.append(("tunnel",)),
                                     tunnel=SimpleNamespace(peers_in_kernel=False))
    role.on_registration(request("10.12.0.1", mobile_foreign=False), ("10.12.0.1", 434))
    assert rec.log == [("send", ("10.12.0.1", 434)), ("tunnel",)]
