"""A new object's registration client starts with the agents its router heard
(agent.mobility.discovery_role.DiscoveryRole.known -> RegistrationClient.seed): a move's
target registers at once through the agent a long listener would choose, instead of
soliciting and collecting answers for COLLECT_WINDOW first; a seed that is no longer fresh
is not used."""

from __future__ import annotations

from agent.mobility.client import COLLECT_WINDOW
from packets import AgentAdvertisement
from test_registration_client import (COA1, COA2, FOA1, FOA2, FOREIGN, INTERVAL, T0, World,
                                      run_virtual, until)


def adv(coa: str) -> AgentAdvertisement:
    return AgentAdvertisement(7, 300, FOREIGN, [coa])


def test_a_seeded_client_registers_at_once_through_the_lowest_agent_heard() -> None:
    w = World()

    async def main() -> None:
        c = w.client()
        c.seed(FOA2, adv(COA2), 2, w.clock.now - 0.5)
        c.seed(FOA1, adv(COA1), 2, w.clock.now - 0.4)
        await c.start()
        await until(w.clock, T0 + COLLECT_WINDOW / 5)
        assert c.current is not None and c.current.agent == FOA1
        await c.stop(deregister=False)

    run_virtual(w.clock, main)
    [sent] = w.net.sent
    assert sent.dest == FOA1 and sent.at < T0 + COLLECT_WINDOW / 5


def test_a_stale_seed_is_not_used() -> None:
    w = World()

    async def main() -> None:
        c = w.client()
        c.seed(FOA1, adv(COA1), 2, w.clock.now - 4 * INTERVAL)  # older than 3 intervals
        await c.start()
        await until(w.clock, T0 + COLLECT_WINDOW * 2)
        assert c.current is None and w.net.sent == [] and w.solicited >= 1
        await c.stop(deregister=False)

    run_virtual(w.clock, main)


def test_a_router_hands_what_it_heard_only_after_listening_and_not_itself_when_silenced() -> None:
    """agent.mobility.discovery_role.DiscoveryRole.known: nothing before the router has heard
    every agent's periodic advertisement; silenced (it left its links), not its own FOA."""
    import time
    from types import SimpleNamespace

    from agent.mobility import discovery_role as dr

    role = dr.DiscoveryRole.__new__(dr.DiscoveryRole)
    role.config = SimpleNamespace(advertise_interval=1.0, addresses={"10.14.0.1"})
    role.recent = dr.HeardTable(8)
    role.paused = False
    now = time.monotonic()
    for source in ("10.14.0.1", "10.14.0.9"):
        role.recent.put(source, (adv(source), 2, now), 300)
    role.listening_since = now
    assert role.known() == []  # not listened long enough yet
    role.listening_since = now - dr.LISTEN_INTERVALS * 1.0 - 0.1
    assert [k[0] for k in role.known()] == ["10.14.0.1", "10.14.0.9"]
    role.paused = True
    assert [k[0] for k in role.known()] == ["10.14.0.9"]
