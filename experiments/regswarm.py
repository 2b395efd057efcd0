"""Many objects' registration clients in one asyncio loop: a swarm of lightweight objects.

An object here is only its registration client (:class:`agent.mobility.client.RegistrationClient`,
the same state machine a router runs for a hosted object): its own UDP socket, its own
Mobile-Home and Mobile-Foreign keys, its own Identifications. What makes it light is that
no process, sandbox or loopback address stands behind it, so a thousand of them fit in one
process. The packets are real: each client's socket was opened in its foreign network's
host namespace (:mod:`topologies.netns_sockets`), the FOA it registers through is that
network's real agent, which checks Mobile-Foreign auth, relays to the real HOA, which
checks Foreign-Home and Mobile-Home auth and the replay window, makes the binding, tunnel
and proxy ARP, and whose reply the FOA relays back after its route is in place.

How a network's objects learn their agent: one Agent Solicitation (ICMP 10, TTL 1, to
224.0.0.2) on the host's LAN, repeated every :data:`SOLICIT_EVERY` s, until the FOA's
advertisement is heard; every client is handed that advertisement, as a router's discovery
role hands a hosted object's client the ones it hears.

How they register: at most ``window`` requests outstanding in all (a burst of a thousand
datagrams would overflow the HOA's receive queue and cost each lost one the client's 1 s
retransmission), each a full :meth:`RegistrationClient.register` with its retransmissions,
again up to :data:`ATTEMPTS` times when it fails. Every acceptance is timed on one monotonic
clock.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.core.config import ObjectConfig
from agent.mobility.client import RegistrationClient
from packets import AdvFlags, AgentAdvertisement, AgentSolicitation, MalformedMessage, decode_discovery

log = logging.getLogger(__name__)

__all__ = ["SwarmError", "SwarmNetwork", "Outcome", "hear_agent", "run_swarm", "ALL_ROUTERS",
           "SOLICIT_EVERY"]

ALL_ROUTERS = "224.0.0.2"
#: How often a network's swarm solicits until its FOA is heard.
SOLICIT_EVERY = 0.5
#: Registrations an object tries (each with the client's own retransmissions and a fresh
#: Identification): a retransmission that crossed its acceptance is refused as a replay (133)
#: although the HOA holds the binding; the object, as a hosted one would, registers again.
ATTEMPTS = 3
#: Reply codes that are acceptances (RFC 5944: 0 accepted, 1 without simultaneous bindings).
ACCEPTED = (0, 1)


class SwarmError(Exception):
    """A swarm could not run: its FOA was never heard, or its input is inconsistent."""


@dataclass
class SwarmNetwork:
    """One foreign network's share of the swarm: the FOA to register through, and per
    object its configuration and a UDP socket opened in the network's host."""

    name: str
    agent: str
    configs: list[ObjectConfig]
    sockets: list[socket.socket]
    #: A raw ICMP socket in the host, bound to its LAN interface, multicast out of it.
    icmp: socket.socket

    def __post_init__(self) -> None:
        if len(self.configs) != len(self.sockets):
            raise SwarmError(f"{self.name}: {len(self.configs)} objects but "
                             f"{len(self.sockets)} sockets")


@dataclass
class Outcome:
    """What one object's registration came to."""

    network: str
    name: str
    home_address: str
    code: int | None
    rtt: float | None
    #: When the acceptance arrived (the swarm's clock), None if it never did.
    accepted_at: float | None
    care_of_address: str = ""
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED and self.accepted_at is not None


@dataclass
class _Reply(asyncio.DatagramProtocol):
    client: RegistrationClient | None = None
    errors: list[str] = field(default_factory=list)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.client is not None:
            self.client._on_reply(data, addr)  # noqa: SLF001 - the client's documented seam

    def error_received(self, exc: Exception) -> None:
        self.errors.append(str(exc))


async def hear_agent(icmp: socket.socket, agent: str, timeout: float,
                     clock: Callable[[], float] = time.monotonic) -> AgentAdvertisement:
    """Solicit on ``icmp``'s link until ``agent`` advertises as a foreign agent; its
    advertisement. :class:`SwarmError` after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    icmp.setblocking(False)
    deadline = clock() + timeout
    solicitation = AgentSolicitation().encode()
    while (left := deadline - clock()) > 0:
        await loop.sock_sendto(icmp, solicitation, (ALL_ROUTERS, 0))
        until = clock() + min(SOLICIT_EVERY, left)
        while (wait := until - clock()) > 0:
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(icmp, 65535), wait)
            except asyncio.TimeoutError:
                break
            if addr[0] != agent or not data:
                continue
            icmp_msg = data[(data[0] & 0x0F) * 4:]
            if icmp_msg[:1] != b"\x09":
                continue
            try:
                adv = decode_discovery(icmp_msg)
            except MalformedMessage:
                continue
            if isinstance(adv, AgentAdvertisement) and adv.flags & AdvFlags.F:
                return adv
    raise SwarmError(f"foreign agent {agent} not heard within {timeout:g} s")


async def _register_network(net: SwarmNetwork, gate: asyncio.Semaphore, hear_timeout: float,
                            clock: Callable[[], float]) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    adv = await hear_agent(net.icmp, net.agent, hear_timeout, clock)
    transports: list[asyncio.BaseTransport] = []

    async def one(cfg: ObjectConfig, sock: socket.socket) -> Outcome:
        async with gate:
            proto = _Reply()
            transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
            transports.append(transport)
            # The advertisement counts as fresh for the swarm's whole run (3 x interval).
            client = RegistrationClient(cfg, solicit=lambda: None,
                                        advertise_interval=max(hear_timeout, 600.0),
                                        clock=clock, transport=transport)  # type: ignore[arg-type]
            proto.client = client
            client.on_advertisement(adv, net.agent, 0)
            # Ask no more than the FOA grants (it refuses a longer one with 69).
            cfg.lifetime = max(1, min(cfg.lifetime, adv.registration_lifetime))
            for _ in range(ATTEMPTS):
                attempt = await client.register()
                ok = attempt.code in ACCEPTED and attempt.lifetime > 0
                if ok:
                    break
            return Outcome(net.name, cfg.name, cfg.home_address, attempt.code, attempt.rtt,
                           clock() if ok else None, attempt.care_of_address,
                           attempt.error or "; ".join(proto.errors[-1:]))

    try:
        return list(await asyncio.gather(*(one(c, s) for c, s in zip(net.configs, net.sockets))))
    finally:
        for t in transports:
            t.close()


async def run_swarm(networks: list[SwarmNetwork], window: int = 32, hear_timeout: float = 5.0,
                    clock: Callable[[], float] = time.monotonic) -> list[Outcome]:
    """Register every object of every network, the networks side by side, with at most
    ``window`` registrations outstanding in all; one :class:`Outcome` per object. A network
    whose FOA is never heard gives each of its objects an outcome with that error."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise SwarmError(f"window must be an int >= 1, got {window!r}")
    gate = asyncio.Semaphore(window)

    async def net_outcomes(net: SwarmNetwork) -> list[Outcome]:
        try:
            return await _register_network(net, gate, hear_timeout, clock)
        except SwarmError as exc:
            return [Outcome(net.name, c.name, c.home_address, None, None, None, "", str(exc))
                    for c in net.configs]

    results = await asyncio.gather(*(net_outcomes(n) for n in networks))
    return [o for outcomes in results for o in outcomes]


def summary(outcomes: list[Outcome], since: float) -> dict[str, Any]:
    """Counts, the time from ``since`` until the last acceptance (None unless all were
    accepted), and the registration round trips' median and worst, per network and in all."""
    def part(items: list[Outcome]) -> dict[str, Any]:
        ok = [o for o in items if o.accepted]
        rtts = sorted(o.rtt for o in ok if o.rtt is not None)
        last = max((o.accepted_at for o in ok), default=None)  # type: ignore[type-var]
        return {
            "objects": len(items), "registered": len(ok),
            "seconds": None if last is None or len(ok) != len(items) else round(last - since, 3),
            "last_accepted_s": None if last is None else round(last - since, 3),
            "rtt_p50_ms": round(rtts[len(rtts) // 2] * 1000, 3) if rtts else None,
            "rtt_max_ms": round(rtts[-1] * 1000, 3) if rtts else None,
        }

    by_net: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_net.setdefault(o.network, []).append(o)
    failed = [o for o in outcomes if not o.accepted]
    return {**part(outcomes), "networks": {n: part(items) for n, items in by_net.items()},
            "failed": [{"name": o.name, "network": o.network, "code": o.code, "error": o.error}
                       for o in failed[:20]],
            "failed_count": len(failed)}
