"""Issue 12, items 5 and 8: advertisements need TTL 1 and an on-link source, and the tables
of agents heard are pruned by lifetime and capped, so a flood of spoofed advertisements
takes bounded memory (sizes asserted, not times)."""

from __future__ import annotations

import asyncio

import pytest

from agent.core.config import Interface
from agent.mobility.client import MAX_AGENTS, RegistrationClient
from agent.mobility.discovery import Heard
from agent.mobility.discovery_role import MAX_HEARD, advertisement_refusal, link_of
from agent.mobility.heard import HeardTable
from fakeclock import FakeClock
from packets import AdvFlags, AgentAdvertisement
from test_agent_roles import discovery_for

ETH2 = Interface("eth2", "10.12.0.1", 24)
FLOOD = 100_000


def advert(seq: int = 1, lifetime: int = 9000) -> AgentAdvertisement:
    return AgentAdvertisement(seq, 120, AdvFlags.F | AdvFlags.G, ["10.12.0.9"],
                              [("10.12.0.9", 0)], lifetime)


@pytest.mark.parametrize("ttl, source, interface, reason", [
    (1, "10.12.0.9", ETH2, None),
    (1, "10.12.0.255", ETH2, None),
    (2, "10.12.0.9", ETH2, "ttl"),
    (255, "10.12.0.9", ETH2, "ttl"),
    (0, "10.12.0.9", ETH2, "ttl"),
    (1, "10.14.0.9", ETH2, "off-link"),
    (1, "10.12.1.9", ETH2, "off-link"),
    (1, "10.12.0.9", None, "off-link"),  # an interface the agent does not know (lo, ...)
    (1, "not an address", ETH2, "off-link"),
])
def test_the_check(ttl: int, source: str, interface: Interface | None,
                   reason: str | None) -> None:
    link = link_of(interface) if interface is not None else None
    assert advertisement_refusal(ttl, source, link) == reason


def test_refused_advertisements_are_dropped_counted_and_reach_no_listener() -> None:
    discovery, _ = discovery_for([])
    got: list[str] = []
    discovery.listeners.append(lambda adv, source, idx: got.append(source))
    eth2 = discovery.agent.ifindex["eth2"]
    discovery.on_discovery(Heard(advert(), "10.12.0.9", eth2, 64))  # forwarded from afar
    discovery.on_discovery(Heard(advert(), "10.16.0.2", eth2, 1))  # not on this link
    discovery.on_discovery(Heard(advert(), "10.12.0.9", 99, 1))  # unknown interface
    assert got == [] and discovery.cmd_agents() == []
    assert discovery.refused == {"ttl": 1, "off-link": 2}
    discovery.on_discovery(Heard(advert(), "10.12.0.9", eth2, 1))
    assert got == ["10.12.0.9"] and len(discovery.cmd_agents()) == 1
    assert discovery.status()["advertisements_refused"] == {"ttl": 1, "off-link": 2}


def test_a_flood_of_spoofed_on_link_advertisements_keeps_the_routers_table_capped() -> None:
    discovery, _ = discovery_for([])
    eth2 = discovery.agent.ifindex["eth2"]
    for n in range(FLOOD):
        source = f"10.12.0.{n % 254 + 1}"  # all on-link: the check lets them in
        discovery.on_discovery(Heard(advert(n % 65536), source, eth2, 1))
    assert len(discovery.heard) <= MAX_HEARD
    assert len(discovery.heard._expiry) <= 4 * MAX_HEARD + 64


def test_a_flood_keeps_each_objects_table_capped_and_the_newest_agents() -> None:
    clock = FakeClock(0.0)
    client = RegistrationClient(config=None, solicit=lambda: None, clock=clock)  # type: ignore
    client._wake = asyncio.Event()
    for n in range(FLOOD):
        client.on_advertisement(advert(), f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 2)
    assert len(client.agents) == MAX_AGENTS
    assert "10.1.134.159" in client.agents  # the last one heard (n = FLOOD - 1) stays
    assert "10.0.0.0" not in client.agents  # the first was evicted
    assert client.agents.evicted == FLOOD - MAX_AGENTS


def test_an_agent_is_forgotten_when_its_advertisement_lifetime_ends() -> None:
    clock = FakeClock(0.0)
    table: HeardTable[str] = HeardTable(8, clock)
    table.put("10.12.0.1", "short", 3)
    table.put("10.12.0.2", "long", 30)
    clock.advance(2.9)
    table.prune()
    assert sorted(table) == ["10.12.0.1", "10.12.0.2"]
    table.put("10.12.0.1", "renewed", 3)  # heard again: a new lifetime
    clock.advance(0.2)
    table.prune()
    assert table.get("10.12.0.1") == "renewed"
    clock.advance(3)
    table.prune()
    assert list(table) == ["10.12.0.2"] and table.expired == 1
    clock.advance(30)
    assert table.get("10.12.0.2") == "long"  # pruned on the next put or prune only
    table.prune()
    assert len(table) == 0 and table.expired == 2


def test_a_full_table_forgets_the_agent_heard_longest_ago() -> None:
    table: HeardTable[int] = HeardTable(3, FakeClock(0.0))
    for n in (1, 2, 3):
        table.put(f"a{n}", n, 100)
    table.put("a1", 11, 100)  # heard again: now the newest
    table.put("a4", 4, 100)
    assert list(table) == ["a3", "a1", "a4"] and table.evicted == 1


def test_a_flood_does_not_evict_the_agent_an_object_is_registered_through() -> None:
    """Else the agent looks gone, and the object registers anew, perhaps via a spoofed one."""
    from agent.mobility.client import Registration

    clock = FakeClock(0.0)
    client = RegistrationClient(config=None, solicit=lambda: None, clock=clock)  # type: ignore
    client._wake = asyncio.Event()
    client.on_advertisement(advert(), "10.12.0.1", 2)
    client.current = Registration("10.12.0.1", "10.12.0.1", "c.r18a", 60, 0.0)
    for n in range(10 * MAX_AGENTS):
        client.on_advertisement(advert(), f"10.12.{1 + n // 256}.{n % 256}", 2)
    assert "10.12.0.1" in client.agents and len(client.agents) == MAX_AGENTS
    client.current = None  # no longer registered there: an ordinary entry again
    client.on_advertisement(advert(), "10.12.9.9", 2)
    assert "10.12.0.1" not in client.agents


def test_a_table_whose_every_other_entry_is_kept_may_exceed_the_cap_by_those() -> None:
    table: HeardTable[int] = HeardTable(2, FakeClock(0.0), keep=lambda s: s in {"a", "b"})
    for key in ("a", "b", "c", "d"):
        table.put(key, 0, 100)
    assert list(table) == ["a", "b", "d"]
