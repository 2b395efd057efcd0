"""The object agent role with its journal (issue 13): an HOA's binding and an FOA's visitor
are on disk before the registration is answered, a new role (the restarted agent) gets them
back, drops what it does not serve, and rebuilds the data plane from them (the same GRE
key) and removes what an expired visitor left in the kernel, before it opens UDP 434."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent.core.config import (AgentConfig, Credential, ForeignConfig, HomeConfig, HomeObject,
                               Interface)
from agent.mobility import dataplane as dataplane_mod
from agent.mobility.agent_role import ObjectAgentRole
from agent.mobility.bindings import Visitor
from agent.mobility.dataplane import DataPlane
from agent.mobility.journal import Journal, journal_path
from packets import (ExtType, NaiExtension, RegistrationReply, RegistrationRequest, ReplyCode,
                     append_auth, new_identification)
from packets.extensions import GreKey
from test_agent_roles import FakeAgent

HOME, HOME_OTHER = "10.16.0.100", "10.16.0.101"
HA = "10.16.0.2"
COA = "10.12.0.1"
MH = Credential(0x100, b"mh")
FH = Credential(0x300, b"fh")
LAN = Interface("eth0", HA, 24)
FLAN = Interface("eth1", COA, 24)


def agent_config(run_dir: Path, roles: list[str], objects: tuple[str, ...] = (HOME,)) -> AgentConfig:
    home = HomeConfig([HomeObject(h, "counter@home.moat", MH) for h in objects], [FH],
                      home_interface="eth0") if "home" in roles else None
    foreign = ForeignConfig([Credential(0x200, b"mf")], FH) if "foreign" in roles else None
    return AgentConfig("r1", str(run_dir), roles, [LAN, FLAN], home=home, foreign=foreign)


class Wire:
    """UDP 434: what the role sends, and what the journal held at that moment."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sent: list[tuple[bytes, tuple, str]] = []

    def sendto(self, data: bytes, addr: tuple, source: str | None = None) -> None:
        self.sent.append((data, addr, self.path.read_text() if self.path.exists() else ""))

    def close(self) -> None:
        pass


class Tunnel:
    """The GRE backend, recorded."""

    backend = "fake"

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def set_peers(self, address: str, peers: list) -> None:
        self.log.append(("peers", address, peers))

    def accept(self, remote: str, key: int) -> None:
        self.log.append(("accept", remote, key))

    def restrict(self, remote: str, key: int, destinations: Any) -> None:
        pass

    def forget(self, remote: str, key: int) -> None:
        self.log.append(("forget", remote, key))

    def set_reverse(self, address: str, peer: Any) -> None:
        pass

    async def settle(self) -> None:
        pass


def role_for(run_dir: Path, roles: list[str], objects: tuple[str, ...] = (HOME,)
             ) -> tuple[ObjectAgentRole, Wire, Tunnel]:
    role = FakeAgent(agent_config(run_dir, roles, objects)).add(ObjectAgentRole)
    wire = Wire(journal_path(run_dir, "r1"))
    role._mip = wire  # type: ignore[assignment]
    tunnel = Tunnel()
    role.dataplane = DataPlane(tunnel, role.config.addresses)
    role.proxy_arp = None
    return role, wire, tunnel


def relayed_request(lifetime: int = 120) -> bytes:
    """What an FOA relays to the HOA: Mobile-Home, then Foreign-Home under the FOA's key."""
    rrq = RegistrationRequest(HOME, HA, COA, new_identification(), lifetime,
                              extensions=[NaiExtension("counter@home.moat")])
    data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, MH.spi, MH.key)
    return append_auth(data, ExtType.FOREIGN_HOME_AUTH, FH.spi, FH.key)


def test_the_binding_is_in_the_journal_before_the_hoa_answers(tmp_path: Path) -> None:
    role, wire, _ = role_for(tmp_path, ["home"])
    role.restore(Journal(journal_path(tmp_path, "r1")))
    role.on_registration(relayed_request(), (COA, 434), dest=HA)
    [(reply, _addr, journal_then)] = wire.sent
    rrp = RegistrationReply.decode(reply)
    assert rrp.code == ReplyCode.ACCEPTED
    key = rrp.find(GreKey)[0].key
    assert f'"gre_key":{key}' in journal_then and HOME in journal_then


def test_a_restarted_hoa_has_its_binding_and_rebuilds_the_tunnel_with_the_same_key(
        tmp_path: Path) -> None:
    first, wire, _ = role_for(tmp_path, ["home"])
    first.restore(Journal(journal_path(tmp_path, "r1")))
    first.on_registration(relayed_request(), (COA, 434), dest=HA)
    key = RegistrationReply.decode(wire.sent[0][0]).find(GreKey)[0].key
    # kill -9: nothing is stopped; a new process starts on the same run directory.
    second, _, tunnel = role_for(tmp_path, ["home"])
    restored = second.restore(Journal(journal_path(tmp_path, "r1")))
    assert restored.summary()["bindings"] == 1
    [b] = second.home.bindings.for_home(HOME)  # type: ignore[union-attr]
    assert (b.care_of_address, b.gre_key) == (COA, key)
    assert 119 < b.remaining(second.home.bindings._clock()) <= 120  # type: ignore[union-attr]
    asyncio.run(second.rebuild_dataplane(restored))
    assert ("peers", HOME, [(COA, key)]) in tunnel.log
    status = second.status()["journal"]
    assert status["ok"] and status["restored"]["bindings"] == 1


def test_a_replayed_request_is_still_refused_after_the_restart(tmp_path: Path) -> None:
    first, _, _ = role_for(tmp_path, ["home"])
    first.restore(Journal(journal_path(tmp_path, "r1")))
    request = relayed_request()
    first.on_registration(request, (COA, 434), dest=HA)
    second, wire, _ = role_for(tmp_path, ["home"])
    second.restore(Journal(journal_path(tmp_path, "r1")))
    second.on_registration(request, (COA, 434), dest=HA)
    [(reply, _addr, _)] = wire.sent
    assert RegistrationReply.decode(reply).code == ReplyCode.HA_IDENTIFICATION_MISMATCH


def test_bindings_of_addresses_no_longer_served_are_dropped(tmp_path: Path) -> None:
    first, _, _ = role_for(tmp_path, ["home"])
    first.restore(Journal(journal_path(tmp_path, "r1")))
    first.on_registration(relayed_request(), (COA, 434), dest=HA)
    second, _, _ = role_for(tmp_path, ["home"], objects=(HOME_OTHER,))
    second.restore(Journal(journal_path(tmp_path, "r1")))
    assert len(second.home.bindings) == 0  # type: ignore[union-attr]
    third, _, _ = role_for(tmp_path, ["home"])  # and the snapshot no longer holds it
    third.restore(Journal(journal_path(tmp_path, "r1")))
    assert len(third.home.bindings) == 0  # type: ignore[union-attr]


def visitor(local: str, lifetime: int, now: float, home: str = HOME, key: int = 77) -> Visitor:
    return Visitor(home, HA, local, 40000, "counter@home.moat", "counter.r1", lifetime, now,
                   key, COA, False, "", "eth1")


def test_a_restarted_foa_accepts_its_visitors_keys_and_removes_routes_of_expired_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, _, _ = role_for(tmp_path, ["foreign"])
    first.restore(Journal(journal_path(tmp_path, "r1")))
    foreign = first.foreign
    assert foreign is not None
    now = foreign.clock()
    foreign.visitors.add(visitor(COA, 300, now, HOME, 77))  # runs on this router
    foreign.visitors.add(visitor("10.12.0.2", 300, now - 299.5, HOME_OTHER, 78))  # about to go
    routes: list[tuple[str, Any]] = []

    async def set_route(destination: str, via: str | None) -> None:
        routes.append((destination, via))

    monkeypatch.setattr(dataplane_mod, "set_route", set_route)
    asyncio.run(asyncio.sleep(0.6))  # the second visitor expires while no agent runs
    second, _, tunnel = role_for(tmp_path, ["foreign"])
    restored = second.restore(Journal(journal_path(tmp_path, "r1")))
    assert [v.home_address for v in second.foreign.visitors.snapshot_objects()] == [HOME]  # type: ignore[union-attr]
    assert [v.home_address for v in restored.expired_visitors] == [HOME_OTHER]
    asyncio.run(second.rebuild_dataplane(restored))
    assert ("accept", HA, 77) in tunnel.log and ("accept", HA, 78) not in tunnel.log
    assert (f"{HOME_OTHER}/32", None) in routes  # the leftover route of the expired visitor
