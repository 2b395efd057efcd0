"""An object notices a restarted agent and registers again at once (issue 13, RFC 5944
§2.4.1): the agent's advertisement sequence numbers start again at 0 in a new process, and the
client, on virtual time (the harness of test_registration_client), sends its request within
one loop turn of the first advertisement of the restarted agent, even when the agent was down
long enough to be forgotten."""

from __future__ import annotations

import asyncio

from agent.mobility import client as client_mod
from agent.mobility.discovery_role import DiscoveryRole
from packets import AgentAdvertisement
from test_agent_roles import FakeAgent, FakeSocket, config
from test_registration_client import (FOA1, FOA2, FOREIGN, HOME_AGENT, INTERVAL, SLACK, T0, World,
                                      run_virtual, until)

from agent.mobility.agent_role import ObjectAgentRole


def advertisements(role: DiscoveryRole, count: int) -> list[int]:
    sock = role.socket
    assert isinstance(sock, FakeSocket)
    for _ in range(count):
        role.advertise("eth0")
    return [AgentAdvertisement.decode(p).sequence for p, _dest, _idx in sock.sent]


def discovery() -> DiscoveryRole:
    agent = FakeAgent(config(["foreign"]))
    role = agent.add(DiscoveryRole)
    role.offer = agent.add(ObjectAgentRole).offer
    role.socket = FakeSocket()  # type: ignore[assignment]
    return role


def test_a_restarted_agent_advertises_from_sequence_one_again() -> None:
    """The agent side: a new process (a new role) counts from 0, whatever the old one sent
    (RFC 5944: the count of advertisements since the agent was initialised)."""
    before = advertisements(discovery(), 300)
    assert before[-1] == 300
    after = advertisements(discovery(), 2)
    assert after == [1, 2] and after[0] < 256


def restarted(w: World, address: str) -> None:
    """The agent at ``address`` restarted: its sequence numbers start again."""
    w._seq[address] = 0


def test_the_object_registers_again_at_once_after_its_foa_restarts() -> None:
    w = World()

    async def main() -> None:
        c = w.client()
        await c.start()
        w.advertise(FOA1, T0, T0 + 30)
        await until(w.clock, T0 + 10.2)
        assert len(w.net.to(FOA1)) == 1 and c.current is not None
        restarted(w, FOA1)  # its next advertisement, at T0 + 11, says so
        await until(w.clock, T0 + 14)
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    first, again = w.net.to(FOA1)
    assert client_mod.COLLECT_WINDOW > SLACK  # the wait for others would show below
    assert T0 + 11 <= again.at <= T0 + 11 + SLACK, "not at once after the restart was heard"
    assert w.c.current is not None and w.c.current.agent == FOA1
    assert w.net.to(FOA2) == []  # the only FOA heard: no time taken to hear others


def test_an_agent_down_longer_than_its_advertisement_lifetime_is_still_seen_restarting(
        monkeypatch) -> None:
    """Its entry in the agents table expired during the outage (advertisement lifetime 2 s,
    down 6 s): the registration remembers the sequence number, so the restart is seen."""
    w = World()
    short = 2

    def hear(address: str, flags=FOREIGN, ifindex: int = 2) -> None:
        w._seq[address] = w._seq.get(address, 0) + 1
        w.c.on_advertisement(AgentAdvertisement(w._seq[address], 300, flags, ["10.0.2.254"],
                                                lifetime=short), address, ifindex)

    async def main() -> None:
        c = w.client()
        await c.start()
        for t in range(0, 8):
            await until(w.clock, T0 + t)
            hear(FOA1)
        assert c.current is not None and len(w.net.to(FOA1)) == 1
        # Down from T0 + 7 to T0 + 13: forgotten at T0 + 9.
        await until(w.clock, T0 + 12)
        # Another agent on the link (a home agent: no candidate) is heard; the table
        # forgets what expired.
        c.on_advertisement(AgentAdvertisement(40, 300, HOME_AGENT, [], lifetime=short),
                           "10.0.2.9", 2)
        assert FOA1 not in c.agents
        restarted(w, FOA1)
        await until(w.clock, T0 + 13)
        hear(FOA1)
        await asyncio.sleep(SLACK / 2)
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    sent = w.net.to(FOA1)
    assert len(sent) == 2 and T0 + 13 <= sent[1].at <= T0 + 13 + SLACK


def test_a_lower_sequence_number_after_the_wrap_is_no_restart() -> None:
    """After 0xffff the numbers go on at 256: that is not a restart, nothing is sent."""
    w = World()

    async def main() -> None:
        c = w.client()
        await c.start()
        w.advertise(FOA1, T0, T0 + 3)
        await until(w.clock, T0 + 2.5)
        assert c.current is not None
        w._seq[FOA1] = 0xFFFF
        w.hear(FOA1)  # 0x10000 would not fit: a real agent sends 256 next
        w.c.on_advertisement(AgentAdvertisement(256, 300, FOREIGN, ["10.0.2.254"]), FOA1, 2)
        await until(w.clock, T0 + 4)
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    assert len(w.net.to(FOA1)) == 1
