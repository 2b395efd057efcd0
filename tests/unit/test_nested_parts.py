"""Secondary mobile objects without a network (NEMO for Mobile IPv4, RFC 5177; patent Fig. 12
step 218): the parts' registration configurations, the object's router as its parts' home
agent (:class:`agent.distribution.nested.NestedHomeAgent`, driven with real RRQs through a
real :class:`ForeignAgent`, a fake transport and a fake tunnel), the FOA's acceptance of its
replies and its route for a visitor's mobile network, the make-before-break move of a part
(:class:`agent.distribution.parts.PartMover`, with a fake VM manager, hosting role and peer),
a secondary's credential check, and the mobile-network NVSE in the Lua dissector.

The wrong-prefix refusal (142) is unit-tested with the HOA in test_agent_home.py; the runner's
side of a secondary's aliases in test_runner_credentials.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.broker.credentials import Claims, issue
from agent.core import netlink
from agent.core.config import Credential, ForeignConfig, HomeConfig, HomeObject, ObjectConfig
from agent.core.peer import PeerError, PeerRefused
from agent.distribution import parts as parts_mod
from agent.distribution.capacity import Offer, Room
from agent.distribution.nested import (MAX_PARTS, PART_SPI_BASE, NestedHomeAgent, part_configs,
                                       part_credential)
from agent.distribution.parts import PartMover, PartMoveFailed
from agent.hosting.credential_check import CredentialCheck
from agent.mobility.dataplane import DataPlane
from agent.mobility.foreign import NESTED_HOME_SPI, ForeignAgent, nested_home_credential
from agent.mobility.home import HomeAgent
from agent.vm.machine import VirtualMachine
from packets import (
    ControlType,
    ExtType,
    GreKey,
    MobileNetwork,
    NaiExtension,
    ObjectPart,
    PartRole,
    RegistrationReply,
    RegistrationRequest,
    ReplyCode,
    RequestFlags,
    append_auth,
    bytes_before,
    verify_auth,
)
from packets.codes import MIP_PORT
from packets.ident import new_identification

ROUTER_KEY = bytes(range(32))
HOME = "10.16.0.100"  # the object's home address: its parts' home agent
HOA = "10.16.0.2"
PREFIX = "10.16.0.224/30"
PARTS = ["tally", "gauge"]
COA = "10.14.0.1"  # r20a's care-of address
FOA_UP = "10.255.0.6"  # where r20a relays from
PART_ROUTER = "10.14.0.1"  # the secondary runs on the FOA's own router here
R18B = "10.12.0.2"  # the object's router
MF = Credential(0x2002, b"mobile-foreign key of the run")
FH = Credential(0x3003, b"foreign-home key of r20a")


def primary_config(**over: Any) -> ObjectConfig:
    cfg = ObjectConfig(name="svc", home_address=HOME, home_agent=HOA, nai="svc@home.moat",
                       mobile_home=Credential(0x1001, b"mobile-home key of svc"),
                       mobile_foreign=MF, lifetime=60, network_prefix=PREFIX)
    return replace(cfg, **over)


# --- the parts' configurations ---------------------------------------------------------------


def test_each_part_gets_an_address_of_the_prefix_in_order_and_the_object_as_home_agent() -> None:
    primary = primary_config()
    configs = part_configs(primary, PARTS)
    assert list(configs) == PARTS
    assert [c.home_address for c in configs.values()] == ["10.16.0.224", "10.16.0.225"]
    for index, (name, cfg) in enumerate(configs.items()):
        assert cfg.name == name and cfg.home_agent == HOME
        assert cfg.nai == f"{name}.svc@home.moat"
        assert (cfg.part, cfg.part_id, cfg.network_prefix) == ("secondary", index + 1, "")
        assert cfg.mobile_foreign == MF  # the FOAs know the run's MF key
        assert cfg.lifetime == primary.lifetime
        assert cfg.mobile_home == part_credential(primary, name, index)
        assert cfg.mobile_home.spi == PART_SPI_BASE + index
        # The VM keeps it as JSON: it must come back the same.
        assert ObjectConfig.from_json(cfg.to_json()) == cfg


def test_a_parts_key_is_its_own_and_only_the_objects_key_makes_it() -> None:
    primary = primary_config()
    configs = part_configs(primary, PARTS)
    keys = [c.mobile_home.key for c in configs.values()]
    assert len(set(keys)) == 2 and primary.mobile_home.key not in keys
    assert all(len(k) == 32 for k in keys)
    # Derived from the object's MH key and the part's name: the same again, other under
    # another object's key.
    assert part_configs(primary, PARTS)["tally"].mobile_home == configs["tally"].mobile_home
    other = primary_config(mobile_home=Credential(0x1001, b"another object's key"))
    assert part_configs(other, PARTS)["tally"].mobile_home.key != keys[0]
    assert keys[0] == hmac.new(primary.mobile_home.key, b"moat part tally",
                               hashlib.sha256).digest()


def test_a_domainless_nai_still_names_the_part() -> None:
    cfg = part_configs(primary_config(nai="svc"), ["tally"])["tally"]
    assert cfg.nai == "tally.svc"


@pytest.mark.parametrize("prefix, parts, message", [
    ("", ["tally"], "has no mobile network prefix"),
    (PREFIX, ["a", "b", "c", "d", "e"], "has room for 4 parts, not 5"),
    ("10.16.0.0/24", [f"p{i}" for i in range(MAX_PARTS + 1)], f"not {MAX_PARTS + 1}"),
])
def test_parts_need_a_prefix_with_room_for_them(prefix: str, parts: list[str],
                                                message: str) -> None:
    with pytest.raises(ValueError, match=message):
        part_configs(primary_config(network_prefix=prefix), parts)


def test_a_prefix_with_room_takes_every_part() -> None:
    configs = part_configs(primary_config(network_prefix="10.16.0.0/24"),
                           [f"p{i}" for i in range(MAX_PARTS)])
    assert [c.home_address for c in configs.values()] == \
        [f"10.16.0.{i}" for i in range(MAX_PARTS)]


# --- the object's router as its parts' home agent --------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


class FakeTunnel:
    """What a DataPlane tells its GRE backend, recorded."""

    def __init__(self) -> None:
        self.peers: dict[str, list[tuple[str, int]]] = {}
        self.accepted: set[tuple[str, int]] = set()
        self.calls: list[tuple] = []
        self.closed = False

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        self.calls.append(("set_peers", inner_dst, list(peers)))
        if peers:
            self.peers[inner_dst] = list(peers)
        else:
            self.peers.pop(inner_dst, None)

    def restrict(self, remote: str, key: int, destinations: Any) -> None:
        self.serves = getattr(self, "serves", {})
        self.serves[(remote, key)] = destinations

    def accept(self, remote: str, key: int) -> None:
        self.accepted.add((remote, key))

    def forget(self, remote: str, key: int) -> None:
        self.accepted.discard((remote, key))

    def set_reverse(self, inner_src: str, peer: Any) -> None:
        self.calls.append(("set_reverse", inner_src, peer))

    def set_delivery(self, remote: str, key: int, via: Any) -> None:
        self.calls.append(("set_delivery", remote, key, via))

    async def settle(self, timeout: float = 5.0) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


class Nested:
    """The nested home agent of ``svc`` (parts tally, gauge) with a fake socket and tunnel,
    and r20a's FOA (trusting the run's nested home agents) in front of it."""

    def __init__(self, foa_router_key: bytes | None = ROUTER_KEY) -> None:
        self.primary = primary_config()
        self.parts = part_configs(self.primary, PARTS)
        self.agent = NestedHomeAgent(self.primary, self.parts, ROUTER_KEY, "mnh9")
        self.transport = FakeTransport()
        self.tunnel = FakeTunnel()
        self.agent._transport = self.transport  # what start() would open
        self.agent.dataplane = DataPlane(self.tunnel, set())
        nested = nested_home_credential(foa_router_key) if foa_router_key is not None else None
        self.foa = ForeignAgent(ForeignConfig(trusted_objects=[MF], foreign_home=FH), "r20a",
                                {COA}, nested_home=nested)
        self._ident: int | None = None

    def request(self, part: str = "tally", *, lifetime: int = 60,
                mh: Credential | None = None, home_agent: str = HOME,
                home: str | None = None, exts: list | None = None) -> bytes:
        """The part's request as its registration client sends it (agent/mobility/client.py)."""
        cfg = self.parts[part]
        self._ident = new_identification(last=self._ident)
        rrq = RegistrationRequest(
            home or cfg.home_address, home_agent, COA, self._ident, lifetime, RequestFlags.G,
            [NaiExtension(cfg.nai), ObjectPart(PartRole.SECONDARY, cfg.part_id, ""),
             *(exts or [])])
        key = mh or cfg.mobile_home
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, key.spi, key.key)
        return append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, MF.spi, MF.key)

    def relayed(self, data: bytes) -> bytes:
        """What the FOA sends the home agent for the part's request."""
        relay = self.foa.handle_request(RegistrationRequest.decode(data), PART_ROUTER, 40000)
        assert relay.code == ReplyCode.ACCEPTED and relay.to_home_agent is not None, relay
        return relay.to_home_agent

    def decide(self, relayed: bytes) -> RegistrationReply | None:
        before = len(self.transport.sent)
        self.agent.on_datagram(relayed, (FOA_UP, MIP_PORT))
        if len(self.transport.sent) == before:
            return None
        data, addr = self.transport.sent[-1]
        assert addr == (FOA_UP, MIP_PORT)
        return RegistrationReply.decode(data)

    def register(self, part: str = "tally", **kw: Any) -> tuple[RegistrationReply, Any]:
        """Through the FOA and back: the home agent's reply and what the FOA made of it."""
        rrp = self.decide(self.relayed(self.request(part, **kw)))
        assert rrp is not None
        return rrp, self.foa.handle_reply(rrp, rrp.home_agent)


def test_a_parts_registration_is_accepted_without_a_foreign_home_key_and_tunnelled() -> None:
    env = Nested()
    rrp, out = env.register()
    assert rrp.code == ReplyCode.ACCEPTED and rrp.home_agent == HOME and rrp.lifetime == 60
    # The nested home agent knows no FOA key; it signs under the run's nested-home credential.
    nested = nested_home_credential(ROUTER_KEY)
    assert nested.spi == NESTED_HOME_SPI == 3000
    assert verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH, {nested.spi: nested.key})
    assert not verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH, {FH.spi: FH.key})
    assert not verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH,
                           {nested.spi: nested_home_credential(bytes(32)).key})
    tally = env.parts["tally"].mobile_home
    assert verify_auth(rrp, ExtType.MOBILE_HOME_AUTH, {tally.spi: tally.key})
    # Its binding: the part's address, care-of r20a, part "secondary"; the tunnel follows.
    (b,) = env.agent.bindings()
    assert (b["home_address"], b["care_of_address"], b["part"], b["care_of_name"]) == \
        ("10.16.0.224", COA, "secondary", "tally.svc.r20a"), b
    assert rrp.find(GreKey) == [GreKey(b["gre_key"])]
    assert env.tunnel.peers == {"10.16.0.224": [(COA, b["gre_key"])]}
    # The FOA accepts the acceptance (signed by no HOA it knows) and makes the part a visitor
    # whose home agent is the object's home address.
    assert out is not None, env.foa.stats
    pending, to_part = out
    (visitor,) = env.foa.visitors.snapshot_objects()
    assert (visitor.home_address, visitor.home_agent, visitor.gre_key, visitor.network_prefix) \
        == ("10.16.0.224", HOME, b["gre_key"], "")
    reply = RegistrationReply.decode(to_part)
    assert reply.code == ReplyCode.ACCEPTED
    assert verify_auth(reply, ExtType.MOBILE_FOREIGN_AUTH, {MF.spi: MF.key})
    assert verify_auth(reply, ExtType.MOBILE_HOME_AUTH, {tally.spi: tally.key})
    assert env.agent.malformed == 0


def test_a_request_with_no_foreign_home_authenticator_at_all_is_accepted_too() -> None:
    env = Nested()
    data = env.request()  # straight from the part, Mobile-Foreign cut off as an FOA would
    rrq = RegistrationRequest.decode(data)
    rrp = env.decide(bytes_before(rrq, ExtType.MOBILE_FOREIGN_AUTH))
    assert rrp is not None and rrp.code == ReplyCode.ACCEPTED
    assert verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH,
                       {NESTED_HOME_SPI: nested_home_credential(ROUTER_KEY).key})


def test_two_parts_two_bindings_and_a_deregistration_takes_one_and_its_tunnel() -> None:
    env = Nested()
    assert env.register("tally")[0].code == ReplyCode.ACCEPTED
    assert env.register("gauge")[0].code == ReplyCode.ACCEPTED
    assert sorted(env.tunnel.peers) == ["10.16.0.224", "10.16.0.225"]
    rrp, out = env.register("tally", lifetime=0)
    assert rrp.code == ReplyCode.ACCEPTED and out is not None
    assert [b["home_address"] for b in env.agent.bindings()] == ["10.16.0.225"]
    assert sorted(env.tunnel.peers) == ["10.16.0.225"]
    assert [v.home_address for v in env.foa.visitors.snapshot_objects()] == ["10.16.0.225"]


def test_the_wrong_mobile_home_key_is_131_and_binds_nothing() -> None:
    env = Nested()
    primary_key = env.primary.mobile_home  # the object's own key is not the part's
    for wrong in (Credential(PART_SPI_BASE, b"a guess"), env.parts["gauge"].mobile_home,
                  primary_key):
        rrp = env.decide(env.relayed(env.request("tally", mh=wrong)))
        assert rrp is not None and rrp.code == ReplyCode.HA_MN_FAILED_AUTH, wrong
    assert env.agent.bindings() == [] and env.tunnel.peers == {}
    assert env.agent.home.stats["HA_MN_FAILED_AUTH"] == 3


def test_the_object_itself_and_unknown_addresses_are_not_its_parts_136() -> None:
    env = Nested()
    for home in (HOME, "10.16.0.226"):
        rrp = env.decide(env.relayed(env.request("tally", home=home)))
        assert rrp is not None and rrp.code == ReplyCode.HA_UNKNOWN_HA_ADDRESS, home
    assert env.agent.bindings() == []


def test_a_part_may_not_register_a_mobile_network_of_its_own_142() -> None:
    env = Nested()
    rrp = env.decide(env.relayed(env.request(
        "tally", exts=[MobileNetwork("10.16.0.228", 30)])))
    assert rrp is not None and rrp.code == ReplyCode.HA_PREFIX_NOT_AUTHORIZED
    assert env.agent.bindings() == []


def test_a_replayed_request_is_133() -> None:
    env = Nested()
    relayed = env.relayed(env.request())
    assert env.decide(relayed).code == ReplyCode.ACCEPTED
    assert env.decide(relayed).code == ReplyCode.HA_IDENTIFICATION_MISMATCH
    assert len(env.agent.bindings()) == 1


def test_a_request_for_another_home_agent_is_ignored_and_counted() -> None:
    env = Nested()
    relayed = env.relayed(env.request(home_agent=HOA))
    assert env.decide(relayed) is None
    assert env.agent.malformed == 1 and env.agent.bindings() == []


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x03" + bytes(23), b"\xff" * 40])
def test_malformed_datagrams_are_counted_and_unanswered(data: bytes) -> None:
    env = Nested()
    assert env.decide(data) is None
    assert env.agent.malformed == 1


def test_a_reply_is_not_a_request() -> None:
    env = Nested()
    rrp = RegistrationReply(ReplyCode.ACCEPTED, "10.16.0.224", HOME, 1, 60).encode()
    assert env.decide(rrp) is None and env.agent.malformed == 1


def test_an_foa_without_the_runs_nested_credential_drops_the_acceptance() -> None:
    for foa_key in (None, bytes(32)):
        env = Nested(foa_router_key=foa_key)
        rrp, out = env.register()
        assert rrp.code == ReplyCode.ACCEPTED  # the home agent bound it ...
        assert out is None  # ... but the FOA does not believe it
        assert env.foa.stats["bad_replies"] == 1 and len(env.foa.visitors) == 0


def test_a_denial_is_relayed_even_unsigned_for_the_foa() -> None:
    env = Nested(foa_router_key=None)
    rrp = env.decide(env.relayed(env.request(mh=Credential(PART_SPI_BASE, b"a guess"))))
    out = env.foa.handle_reply(rrp, rrp.home_agent)
    assert out is not None and RegistrationReply.decode(out[1]).code == \
        ReplyCode.HA_MN_FAILED_AUTH
    assert len(env.foa.visitors) == 0


def test_close_closes_the_tunnel_and_the_socket() -> None:
    env = Nested()
    env.register()
    asyncio.run(env.agent.close())
    assert env.tunnel.closed and env.agent.dataplane is None and env.agent._transport is None


# --- the FOA routes a visitor's mobile network to the router that runs it --------------------


OBJ_ROUTER = "10.12.0.2"  # r18b, behind r18a


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str | None]]:
    calls: list[tuple[str, str, str | None]] = []

    async def replace_route(destination: str, via: str) -> None:
        calls.append(("replace", destination, via))

    async def del_route(destination: str) -> None:
        calls.append(("del", destination, None))

    monkeypatch.setattr(netlink, "route_replace", replace_route)
    monkeypatch.setattr(netlink, "route_del", del_route)
    return calls


class ObjectAway:
    """svc registering its prefix through r18a (FOA, 10.12.0.1) with a real HOA."""

    def __init__(self) -> None:
        self.primary = primary_config()
        self.hoa = HomeAgent(HomeConfig(
            objects=[HomeObject(HOME, self.primary.nai, self.primary.mobile_home, PREFIX)],
            trusted_foas=[FH]), HOA)
        self.foa = ForeignAgent(ForeignConfig(trusted_objects=[MF], foreign_home=FH), "r18a",
                                {"10.12.0.1"}, nested_home=nested_home_credential(ROUTER_KEY))
        self._ident: int | None = None

    def register(self, router: str, lifetime: int = 60) -> RegistrationReply:
        self._ident = new_identification(last=self._ident)
        net = ipaddress.IPv4Network(PREFIX)
        rrq = RegistrationRequest(HOME, HOA, "10.12.0.1", self._ident, lifetime,
                                  RequestFlags.G, [NaiExtension(self.primary.nai),
                                                   MobileNetwork(str(net.network_address),
                                                                 net.prefixlen)])
        mh, mf = self.primary.mobile_home, MF
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, mh.spi, mh.key)
        data = append_auth(data, ExtType.MOBILE_FOREIGN_AUTH, mf.spi, mf.key)
        relay = self.foa.handle_request(RegistrationRequest.decode(data), router, 40000)
        decision = self.hoa.handle(RegistrationRequest.decode(relay.to_home_agent))
        out = self.foa.handle_reply(RegistrationReply.decode(decision.reply), HOA)
        assert out is not None
        return RegistrationReply.decode(decision.reply)


def test_the_foa_routes_a_visitors_mobile_network_where_it_routes_the_object(
        routes: list) -> None:
    env = ObjectAway()
    assert env.register(OBJ_ROUTER).code == ReplyCode.ACCEPTED
    (visitor,) = env.foa.visitors.snapshot_objects()
    assert visitor.network_prefix == PREFIX
    dp = DataPlane(FakeTunnel(), {"10.12.0.1"})
    asyncio.run(dp.sync_foreign(env.foa))
    assert ("replace", PREFIX, OBJ_ROUTER) in routes
    assert ("replace", f"{HOME}/32", OBJ_ROUTER) in routes
    routes.clear()
    asyncio.run(dp.sync_foreign(env.foa))
    assert routes == []  # nothing changed: nothing done
    # Back home / gone: the prefix route goes with the visitor.
    assert env.register(OBJ_ROUTER, lifetime=0).code == ReplyCode.ACCEPTED
    assert len(env.foa.visitors) == 0
    asyncio.run(dp.sync_foreign(env.foa))
    assert ("del", PREFIX, None) in routes and ("del", f"{HOME}/32", None) in routes


def test_an_object_on_the_foas_own_router_needs_no_prefix_route(routes: list) -> None:
    env = ObjectAway()
    assert env.register("10.12.0.1").code == ReplyCode.ACCEPTED
    asyncio.run(DataPlane(FakeTunnel(), {"10.12.0.1"}).sync_foreign(env.foa))
    assert not [r for r in routes if r[1] == PREFIX], routes


# --- moving a part: PartMover ----------------------------------------------------------------


class FakeProcess:
    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


class FakeManager:
    def __init__(self, log: list) -> None:
        self.log = log
        self.changed_vms: list[str] = []

    async def call(self, vm_name: str, obj: str, cmd: str, **args: Any) -> Any:
        self.log.append(("call", vm_name, obj, cmd))
        return {"count": 7}

    def changed(self, vm: Any) -> None:
        self.changed_vms.append(vm.name)

    async def restart_object(self, vm_name: str, obj: str, state: Any, warm: bool = False) -> None:
        self.log.append(("restart", vm_name, obj, state) + (("warm",) if warm else ()))


class FakeHosting:
    def __init__(self, log: list, final: Any = {"count": 9}) -> None:
        self.log = log
        self.final = final

    async def cmd_object_stop(self, name: str, deregister: bool = True) -> dict[str, Any]:
        self.log.append(("stop", name, deregister))
        return {"name": name, "state": self.final}


class FakeNested:
    def __init__(self) -> None:
        self.closed = False

    def housekeeping(self) -> None:
        pass

    def bindings(self) -> list:
        return []

    async def close(self) -> None:
        self.closed = True


class Mover:
    """A PartMover on r18b whose primary VM ``pair`` runs svc and, at home, its part tally."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: dict[str, Exception] | None = None,
                 final: Any = {"count": 9}) -> None:
        self.log: list[tuple] = []
        self.manager = FakeManager(self.log)
        self.hosting = FakeHosting(self.log, final)
        self.mover = PartMover(lambda: self.manager, lambda: self.hosting, ROUTER_KEY, R18B)
        self.nested = FakeNested()
        self.mover.nested["pair"] = self.nested  # its nested home agent, already listening
        primary = primary_config()
        tally = part_configs(primary, ["tally"])["tally"]
        self.vm = VirtualMachine(name="pair", kind="service", service="pair-svc",
                                 address="0.0.0.0", interface=None, port=4341, cpu=1.0,
                                 memory_mb=256, pids=64, egress_kbit=None, authorized=[],
                                 policy={}, leased=True,
                                 mobile={"counter": primary.to_json(), "tally": tally.to_json()},
                                 at_home=["tally"])
        self.process = FakeProcess()
        self.vm.objects = {"counter": FakeProcess(), "tally": self.process}
        self.refuse = refuse or {}
        self.offer = Offer("r20a", PART_ROUTER, "10.14.0.0/24", Room(2.0, 2048))
        self.steps: list[str] = []

        async def peer_call(address: str, ctype: ControlType, body: dict, key: Any = None,
                            timeout: float = 0.0, **_: Any) -> dict:
            assert ctype == ControlType.VM_NEGOTIATE and key == ROUTER_KEY
            self.log.append(("peer", address, body["action"], body))
            if body["action"] in self.refuse:
                raise self.refuse[body["action"]]
            if body["action"] == "start":
                return {"ok": True, "instance": {"instance_id": "r20a/x@1"}}
            return {"ok": True}

        monkeypatch.setattr(parts_mod, "peer_call", peer_call)

    def move(self) -> dict:
        return asyncio.run(self.mover.move(self.vm, "tally", self.offer, "rid1", "r18b/pair@1",
                                           self.steps.append))



def test_a_part_moves_warm_then_stops_here_then_its_final_state_is_restored_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = Mover(monkeypatch)
    answer = env.move()
    assert answer["instance"] == {"instance_id": "r20a/x@1"}
    kinds = [(e[0], e[2]) if e[0] == "peer" else (e[0], e[1 if e[0] == "stop" else 3])
             for e in env.log]
    assert kinds == [("call", "get_state"), ("peer", "start"), ("stop", "tally"),
                     ("peer", "restore")], env.log
    start, restore = env.log[1][3], env.log[3][3]
    # start: warm, under the reservation, the part's VM only, with the checkpoint it had.
    assert (start["reservation"], start["warm"], start["state"]) == ("rid1", True, {"count": 7})
    vm = start["vm"]
    assert vm["vm"].startswith("pair-s") and vm["part"] == "secondary"
    assert (vm["objects"], list(vm["mobile"])) == (["tally"], ["tally"])
    assert vm["mobile"]["tally"]["home_agent"] == HOME
    assert (vm["parent_router"], vm["parent_instance"]) == (R18B, "r18b/pair@1")
    assert (vm["service"], vm["leased"]) == ("pair-svc", True)
    # stopped here without deregistering (it never registered: it was at home) ...
    assert env.log[2] == ("stop", "tally", False)
    # ... and its final checkpoint restored there, in the same VM.
    assert (restore["vm"], restore["name"], restore["state"]) == (vm["vm"], "tally",
                                                                  {"count": 9})
    assert env.process.stopped and "tally" not in env.vm.objects
    assert (env.vm.at_home, env.vm.moved) == ([], {"tally": "r20a"})
    assert env.manager.changed_vms == ["pair"]  # the primary's instance lost the part
    assert env.steps == [
        "nested home agent listening on the object's home address",
        "secondary tally registered on r20a with the nested home agent",
        "tally stopped here with its final checkpoint (its address is now tunnelled)",
        "secondary tally restored its state and serves"]


@pytest.mark.parametrize("failure", [PeerRefused(PART_ROUTER, "set_state failed"),
                                     PeerError("no valid answer from 10.14.0.1")])
def test_a_restore_that_fails_cancels_the_secondary_and_restarts_the_part_here(
        monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    env = Mover(monkeypatch, refuse={"restore": failure})
    with pytest.raises(PartMoveFailed, match="did not reach r20a.*serves here again"):
        env.move()
    actions = [e[2] if e[0] == "peer" else e[0] for e in env.log]
    assert actions == ["call", "start", "stop", "restore", "cancel", "restart"], env.log
    start, cancel = env.log[1][3], env.log[4][3]
    assert cancel["vm"] == start["vm"]["vm"]
    # The part runs here again from its final checkpoint, not the earlier one.
    assert env.log[5] == ("restart", "pair", "tally", {"count": 9})
    assert (env.vm.at_home, env.vm.moved) == (["tally"], {})
    assert env.manager.changed_vms == ["pair"]


def test_a_part_that_gives_no_final_checkpoint_is_restarted_from_the_last_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = Mover(monkeypatch, final=None)
    with pytest.raises(PartMoveFailed, match="gave no checkpoint"):
        env.move()
    actions = [e[2] if e[0] == "peer" else e[0] for e in env.log]
    assert actions == ["call", "start", "stop", "cancel", "restart"], env.log
    assert env.log[-1] == ("restart", "pair", "tally", {"count": 7})
    assert (env.vm.at_home, env.vm.moved) == (["tally"], {})


def test_a_secondary_that_does_not_start_leaves_the_part_serving_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = Mover(monkeypatch, refuse={"start": PeerRefused(PART_ROUTER, "did not register")})
    with pytest.raises(PartMoveFailed, match="the secondary on r20a failed: did not register"):
        env.move()
    assert [e[2] if e[0] == "peer" else e[0] for e in env.log] == ["call", "start"]
    assert not env.process.stopped and env.vm.objects["tally"] is env.process
    assert (env.vm.at_home, env.vm.moved) == (["tally"], {})
    assert env.manager.changed_vms == []


def test_only_a_part_at_home_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Mover(monkeypatch)
    env.vm.at_home, env.vm.moved = [], {"tally": "r20a"}
    with pytest.raises(PartMoveFailed, match="does not run beside its object here"):
        env.move()
    assert env.log == []


def test_without_a_router_key_no_nested_home_agent_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Mover(monkeypatch)
    env.mover.nested.clear()
    env.mover.key = None
    with pytest.raises(PartMoveFailed, match="no router key"):
        env.move()
    assert env.log == [] and (env.vm.at_home, env.vm.moved) == (["tally"], {})


def test_a_part_comes_back_from_its_secondary_with_its_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = Mover(monkeypatch)
    env.move()
    env.log.clear()
    asyncio.run(env.mover.come_back(env.vm, "tally", {"count": 30}))
    assert env.log == [("restart", "pair", "tally", {"count": 30})]
    assert (env.vm.at_home, env.vm.moved) == (["tally"], {})
    assert env.manager.changed_vms == ["pair", "pair"]
    asyncio.run(env.mover.forget("pair"))
    assert env.nested.closed and env.mover.nested == {}


# --- a secondary's credential check ----------------------------------------------------------


SERVICE = "pair-svc"
SERVICE_KEY = bytes(range(100, 132))
NOW = 1_800_000_000.0
SECONDARY, PARENT, OTHER = "r20a/pair-s1@a", "r18b/pair@b", "r22c/pair-d@c"


def credential(instance: str, expires_in: float = 60.0, key: bytes = SERVICE_KEY) -> str:
    return issue(Claims("lease1", SERVICE, instance, NOW + expires_in, "dns23"), key)


def check(part: str = "secondary", aliases: tuple[str, ...] = (PARENT,)) -> CredentialCheck:
    c = CredentialCheck(clock=lambda: NOW)
    c.configure(SERVICE, SECONDARY, SERVICE_KEY.hex(), part, ["10.14.0.0/24"], list(aliases))
    return c


def test_a_secondary_honours_its_parents_credentials_from_anywhere() -> None:
    c = check()
    for source in ("10.16.0.23", "10.12.0.30", "10.14.0.30", None):
        assert c.refusal(credential(PARENT), source) is None, source
    assert c.refusal(credential(SECONDARY), "10.16.0.23") is None
    assert c.local_siblings == 0 and c.accepted == 5  # aliases are not siblings


def test_without_the_alias_the_parents_credential_is_anothers() -> None:
    c = check(aliases=())
    assert c.refusal(credential(PARENT), "10.16.0.23") == "wrong_instance"


def test_a_third_instances_credential_is_refused_and_left_to_it() -> None:
    c = check()
    assert c.refusal(credential(OTHER), "10.16.0.23") == "wrong_instance"
    assert c.silent("wrong_instance")


def test_a_secondary_answers_its_other_refusals_a_duplicate_does_not() -> None:
    c = check()
    assert c.refusal(credential(PARENT, expires_in=-1), "10.16.0.23") == "expired"
    assert c.refusal(credential(PARENT, key=bytes(32)), "10.16.0.23") == "forged"
    assert c.refusal(None, "10.16.0.23") == "missing"
    for reason in ("expired", "forged", "missing", "revoked"):
        assert not c.silent(reason), reason
    duplicate = check(part="duplicate", aliases=())
    assert all(duplicate.silent(r) for r in ("expired", "forged", "missing", "revoked"))


def test_a_revoked_parent_lease_is_refused_at_the_secondary() -> None:
    c = check()
    c.revoke({"revoked": [{"lease_id": "lease1", "until": NOW + 60}]})
    assert c.refusal(credential(PARENT), "10.16.0.23") == "revoked"


@pytest.mark.parametrize("aliases", [["a/b@1"] * 5, ["bad name with spaces"], "r18b/pair@b"])
def test_aliases_are_checked(aliases: Any) -> None:
    c = CredentialCheck(clock=lambda: NOW)
    with pytest.raises(ValueError):
        c.configure(SERVICE, SECONDARY, SERVICE_KEY.hex(), "secondary", [], aliases)


# --- the mobile-network NVSE in the Lua dissector ---------------------------------------------


LUA = Path(__file__).resolve().parents[2] / "packets" / "wireshark" / "moat.lua"


def _tshark_with_lua() -> str | None:
    tshark = shutil.which("tshark")
    if tshark is None:
        return None
    version = subprocess.run([tshark, "-v"], capture_output=True, text=True, timeout=60).stdout
    return tshark if "with Lua" in version and "without Lua" not in version else None


def test_the_lua_dissector_shows_the_mobile_network_prefix(tmp_path: Path) -> None:
    tshark = _tshark_with_lua()
    if tshark is None:
        pytest.skip("no tshark with Lua on PATH")
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    rrq = RegistrationRequest(HOME, HOA, "10.12.0.1", 1, 60, RequestFlags.G, [
        NaiExtension("svc@home.moat"), ObjectPart(PartRole.PRIMARY, 0, ""),
        MobileNetwork("10.16.0.224", 30)]).encode()
    pcap = tmp_path / "nemo.pcap"
    wrpcap(str(pcap), [Ether() / IP(src="10.255.0.2", dst=HOA)
                       / UDP(sport=MIP_PORT, dport=MIP_PORT) / rrq])
    env = dict(os.environ, HOME=str(tmp_path), LC_ALL="C.UTF-8")
    env.pop("WIRESHARK_CONFIG_DIR", None)
    done = subprocess.run(
        [tshark, "-n", "-X", f"lua_script:{LUA}", "-r", str(pcap), "-T", "fields",
         "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,",
         "-e", "moat.nvse.type", "-e", "moat.nvse.mobile_network.prefix",
         "-e", "moat.nvse.mobile_network.length", "-e", "_ws.expert.message"],
        capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "Lua:" not in done.stderr, done.stderr
    (row,) = [line.split("\t") for line in done.stdout.splitlines()]
    assert row[:3] == ["2,4", "10.16.0.224", "30"], row  # NVSEs: object part, network
    assert "Lua Error" not in row[3], row
