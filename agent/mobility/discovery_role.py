"""Agent discovery (RFC 5944 §2): advertising this router's agents and hearing others'.

Every router runs this role, agent or not: objects hosted anywhere solicit through it and
learn their agents from the advertisements it hears. A router whose object agent role
(:class:`agent.mobility.agent_role.ObjectAgentRole`) is a home or foreign agent advertises
on its links at the configured interval and answers solicitations at once (§2.4); a pure
home agent advertises only on its home link.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import socket
import time
from typing import Any, Callable

from packets import AdvFlags, AgentAdvertisement, AgentSolicitation

from agent.core.config import Interface
from agent.core.role import Periodic, Role
from agent.mobility.arp import Announcer
from agent.mobility.discovery import ALL_ROUTERS, ALL_SYSTEMS, DiscoverySocket, Heard
from agent.mobility.heard import HeardTable
from agent.mobility.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: Agents a router remembers at most (the ones heard longest ago are forgotten first).
MAX_HEARD = 256
#: Refused advertisements: one log line per reason per this many seconds at most.
REFUSAL_LOG_INTERVAL = 10.0


def link_of(interface: Interface) -> ipaddress.IPv4Network:
    """The prefix of the link ``interface`` is on."""
    return ipaddress.IPv4Network(f"{interface.address}/{interface.prefix}", strict=False)


def advertisement_refusal(ttl: int, source: str,
                          link: ipaddress.IPv4Network | None) -> str | None:
    """Why an advertisement heard on the interface whose prefix is ``link`` (None: not one of
    the agent's interfaces) must be dropped, or None to take it.

    RFC 5944 §2.1: an agent sends its advertisements with TTL 1 to its own link, so one that
    arrives with another TTL was forwarded or forged, and one whose source is not on the
    link it came in on (inside that interface's prefix) is not from a neighbour agent."""
    if ttl != 1:
        return "ttl"
    if link is None:
        return "off-link"
    try:
        address = int.from_bytes(socket.inet_pton(socket.AF_INET, source), "big")
    except (OSError, TypeError):
        return "off-link"
    return None if address & int(link.netmask) == int(link.network_address) else "off-link"

#: Called with (advertisement, source address, interface index) for each one heard.
AdvertisementListener = Callable[[AgentAdvertisement, str, int], None]


@functools.lru_cache(maxsize=256)  # 8 bits of flags: bounded
def flag_letters(flags: AdvFlags) -> str:
    """'RFGT' rather than an integer, as the RFC and Wireshark write them."""
    return "".join(f.name or "" for f in AdvFlags if f in flags)


#: Advertisement intervals a router listens before it hands what it heard to a new client.
LISTEN_INTERVALS = 2.5


class DiscoveryRole(Role):
    """ICMP router discovery with the Mobility Agent Advertisement Extension."""

    name = "discovery"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.advertising = {i.name: i.advertise for i in self.config.interfaces}
        #: Each interface's link prefix, for the on-link check of advertisements.
        self.links = {i.name: link_of(i) for i in self.config.interfaces}
        #: Set by the ``advertising`` command: the agent falls silent (it left the link).
        self.paused = False
        self.sequence = 0
        #: Agents heard, by source address, each until its advertisement's lifetime ends.
        self.heard: HeardTable[dict[str, Any]] = HeardTable(MAX_HEARD)
        #: Advertisements dropped, by reason ("ttl", "off-link").
        self.refused: dict[str, int] = {"ttl": 0, "off-link": 0}
        self._refusals = RateLimitedLog(log, REFUSAL_LOG_INTERVAL)
        #: The same agents' newest advertisements as heard (advertisement, ifindex,
        #: monotonic time), to hand a new object's registration client (:meth:`known`).
        self.recent: HeardTable[tuple[AgentAdvertisement, int, float]] = HeardTable(MAX_HEARD)
        #: Who wants each advertisement heard (the hosted objects' registration clients).
        self.listeners: list[AdvertisementListener] = []
        #: What this router advertises as, per interface (set by the object agent role):
        #: returns (flags, lifetimes, care-of addresses) or None for "nothing on this link".
        self.offer: Callable[[str], tuple[AdvFlags, list[int], list[str]] | None] = lambda _: None
        self.socket: DiscoverySocket | None = None
        #: When it began to listen (monotonic; :meth:`known` answers nothing before it has
        #: heard every agent's periodic advertisement).
        self.listening_since = math.inf
        #: Gratuitous ARPs for objects at home, on kept sockets.
        self.announcer = Announcer()

    async def start(self) -> None:
        self.listening_since = time.monotonic()
        self.socket = DiscoverySocket(self.agent.loop, self.on_discovery)
        for idx in self.agent.ifindex.values():
            self.socket.join(ALL_ROUTERS, idx)

    async def stop(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.announcer.close()

    def periodic(self) -> list[Periodic]:
        return [Periodic("advertise", lambda: self.config.advertise_interval, self.advertise_all)]

    @property
    def malformed(self) -> int:
        return self.socket.malformed if self.socket is not None else 0

    # --- advertising ---------------------------------------------------------------------

    def advertisement_for(self, ifname: str) -> AgentAdvertisement | None:
        """This router's advertisement on ``ifname``, or None when it offers nothing there."""
        offer = self.offer(ifname)
        if offer is None:
            return None
        flags, lifetimes, coas = offer
        iface = next(i for i in self.config.interfaces if i.name == ifname)
        self.sequence = self.sequence + 1 if self.sequence < 0xFFFF else 256
        return AgentAdvertisement(
            self.sequence, min(lifetimes) if lifetimes else 0, AdvFlags.G | flags, coas,
            [(iface.address, 0)], self.config.advertisement_lifetime,
            prefix_lengths=[iface.prefix],
        )

    def advertise(self, ifname: str, dest: str = ALL_SYSTEMS) -> None:
        if not self.advertising[ifname] or self.paused or self.socket is None:
            return
        adv = self.advertisement_for(ifname)
        if adv is not None:
            self.socket.send(adv.encode(), dest, self.agent.ifindex[ifname])

    def advertise_all(self) -> None:
        for ifname in self.agent.ifindex:
            self.advertise(ifname)

    def on_discovery(self, heard: Heard) -> None:
        if isinstance(heard.message, AgentSolicitation):
            ifname = self.agent.iface_by_index.get(heard.ifindex)
            if ifname is not None:
                self.advertise(ifname)  # RFC 5944 §2.4: answer at once
            return
        adv = heard.message
        ifname = self.agent.iface_by_index.get(heard.ifindex)
        reason = advertisement_refusal(heard.ttl, heard.source,
                                       self.links.get(ifname) if ifname else None)
        if reason is not None:
            self.refused[reason] += 1
            self._refusals(reason, logging.INFO, "advertisement from %s on %s dropped: %s "
                           "(TTL %d)", heard.source, ifname or heard.ifindex, reason, heard.ttl)
            return
        self.heard.put(heard.source, {
            "address": heard.source, "interface": ifname,
            "sequence": adv.sequence, "flags": flag_letters(adv.flags),
            "care_of_addresses": adv.care_of_addresses, "ttl": heard.ttl,
            "heard_at": time.time(),
        }, adv.lifetime)
        self.recent.put(heard.source, (adv, heard.ifindex, time.monotonic()), adv.lifetime)
        for listener in list(self.listeners):
            listener(adv, heard.source, heard.ifindex)

    def known(self) -> list[tuple[str, AgentAdvertisement, int, float]]:
        """Every agent heard on this router's links whose advertisement has not run out:
        (source, advertisement, ifindex, monotonic time heard). A new object's client starts
        with them, as if it had listened as long as its router (a move's target registers
        at once instead of soliciting and collecting answers first). None before this router
        has listened for :data:`LISTEN_INTERVALS` advertisement intervals: it may not have
        heard every agent yet, and a client that knew only some would choose among those
        (a new client then solicits and collects answers as before)."""
        listened = time.monotonic() - self.listening_since
        if listened < LISTEN_INTERVALS * self.config.advertise_interval:
            return []
        self.recent.prune()
        # Silenced (it left its links, ``advertising``), this router's own foreign agent is
        # not one to register with, however recently it was heard.
        own = set(self.config.addresses) if self.paused else set()
        return [(source, adv, ifindex, at) for source, (adv, ifindex, at) in self.recent.items()
                if source not in own]

    def solicit(self) -> None:
        """Ask every link for its agents (an object that wants to register now)."""
        if self.socket is None:
            return
        payload = AgentSolicitation().encode()
        for idx in self.agent.ifindex.values():
            self.socket.send(payload, ALL_ROUTERS, idx)

    def announce_home(self, ifindex: int, address: str) -> None:
        """Gratuitous ARP for an object back home (RFC 5944 §4.6), from its router."""
        ifname = self.agent.iface_by_index.get(ifindex)
        if ifname is not None:
            try:
                self.announcer.announce(ifname, address)
            except OSError as exc:
                log.warning("gratuitous ARP for %s on %s failed: %s", address, ifname, exc)

    def status(self) -> dict[str, Any]:
        return {"agents_heard": len(self.heard), "advertisements_refused": dict(self.refused)}

    # --- control commands ----------------------------------------------------------------

    def cmd_agents(self) -> list[dict]:
        self.heard.prune()
        now = time.time()
        return [dict(h, age=round(now - h["heard_at"], 3)) for h in self.heard.values()]

    def cmd_advertising(self, enabled: bool) -> bool:
        """Switch advertisements and solicitation answers off/on (an agent leaving a link)."""
        self.paused = not enabled
        return enabled

    def cmd_announce(self, address: str, interface: str) -> str:
        self.announcer.announce(interface, address)
        return "ok"
