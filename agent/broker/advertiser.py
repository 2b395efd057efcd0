"""Finding the service broker with no configuration (Fig. 12, step 200).

The patent's corresponding object locates the service broker the way a mobile node locates
its agents. Every router of a run with a broker advertises it on its LANs: a BROKER_ADVERT
(MOAT control framing, UDP 4340) to 224.0.0.1 with TTL 1 every ``advertise_interval``
seconds, and at once, unicast, to a host that sends a BROKER_SOLICIT (to 224.0.0.2, the
all-routers group, or to the router itself). Like ICMP agent advertisements these carry no
secret and are not authenticated; what a CO then sends the broker is (LEASE_* messages carry
an HMAC under the CO's key). Everything done before that is bounded: a datagram is decoded
only if it is small, and solicitation answers are rate-limited per source.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any

from packets import ControlMessage, ControlType, MalformedMessage
from packets.codes import CONTROL_PORT

from agent.core.role import Periodic, Role

log = logging.getLogger(__name__)

ALL_SYSTEMS = "224.0.0.1"
ALL_ROUTERS = "224.0.0.2"
#: A solicitation is a header and an empty (or tiny) body; anything bigger is not read.
MAX_SOLICIT = 512
#: Answers to one source per second, at most (a flood of solicitations gets few answers).
ANSWERS_PER_SOURCE = 5
#: Sources remembered for the rate limit, at most (the table cannot grow without bound).
MAX_SOURCES = 1024


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, role: "BrokerAdvertiserRole") -> None:
        self.role = role

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self.role.on_datagram(data, addr)
        except Exception:  # noqa: BLE001 - one bad datagram must not stop the agent
            log.exception("broker solicitation from %s failed", addr[0])

    def error_received(self, exc: Exception) -> None:
        log.info("UDP %d error: %s", CONTROL_PORT, exc)


class BrokerAdvertiserRole(Role):
    """Advertises the run's broker on this router's LANs and answers solicitations."""

    name = "broker-advertiser"

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.broker is not None

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        assert self.config.broker is not None
        self.broker = self.config.broker
        self.sequence = 0
        self.sent = 0
        self.answered = 0
        self.limited = 0
        self._malformed = 0
        self._answers: dict[str, tuple[float, int]] = {}
        self._sock: socket.socket | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.lans = [i for i in self.config.interfaces if i.advertise]

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.bind(("0.0.0.0", CONTROL_PORT))
        for iface in self.lans:
            mreq = struct.pack("4s4si", socket.inet_aton(ALL_ROUTERS), socket.inet_aton("0.0.0.0"),
                               self.agent.ifindex[iface.name])
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            except OSError as exc:
                log.warning("cannot join %s on %s: %s", ALL_ROUTERS, iface.name, exc)
        sock.setblocking(False)
        self._sock = sock
        self._transport, _ = await self.agent.loop.create_datagram_endpoint(
            lambda: _Protocol(self), sock=sock)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def periodic(self) -> list[Periodic]:
        return [Periodic("broker-advertise", self.broker.advertise_interval, self.advertise_all)]

    @property
    def malformed(self) -> int:
        return self._malformed

    def advertisement(self) -> bytes:
        self.sequence = (self.sequence + 1) & 0xFFFFFFFF
        body = {"broker": self.broker.address, "port": CONTROL_PORT, "router": self.config.name,
                "sequence": self.sequence, "interval": self.broker.advertise_interval}
        return ControlMessage(ControlType.BROKER_ADVERT, self.sequence, body).encode()

    def advertise_all(self) -> None:
        """One advertisement per LAN, each leaving by that LAN's interface (TTL 1)."""
        if self._sock is None:
            return
        for iface in self.lans:
            try:
                self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                      socket.inet_aton(iface.address))
                self._sock.sendto(self.advertisement(), (ALL_SYSTEMS, CONTROL_PORT))
                self.sent += 1
            except OSError as exc:
                log.debug("broker advertisement on %s: %s", iface.name, exc)

    def on_datagram(self, data: bytes, addr: tuple) -> None:
        if len(data) > MAX_SOLICIT:
            self._malformed += 1
            return
        try:
            msg = ControlMessage.decode(data)
        except MalformedMessage as exc:
            self._malformed += 1
            log.info("malformed datagram on UDP %d from %s: %s", CONTROL_PORT, addr[0], exc)
            return
        if msg.type != ControlType.BROKER_SOLICIT:
            return  # advertisements of neighbours, answers: not for this role
        if not self._allow(addr[0]):
            self.limited += 1
            return
        assert self._transport is not None
        self._transport.sendto(self.advertisement(), addr)
        self.answered += 1

    def _allow(self, source: str, now: float | None = None) -> bool:
        """At most :data:`ANSWERS_PER_SOURCE` answers per source and second."""
        now = time.monotonic() if now is None else now
        second, count = self._answers.get(source, (0.0, 0))
        if now - second >= 1.0:
            second, count = now, 0
        if count >= ANSWERS_PER_SOURCE:
            return False
        if source not in self._answers and len(self._answers) >= MAX_SOURCES:
            self._answers = {s: v for s, v in self._answers.items() if now - v[0] < 1.0}
            if len(self._answers) >= MAX_SOURCES:
                return False
        self._answers[source] = (second, count + 1)
        return True

    def status(self) -> dict[str, Any]:
        return {"broker": {"address": self.broker.address, "advertisements": self.sent,
                           "solicitations_answered": self.answered,
                           "solicitations_limited": self.limited}}
