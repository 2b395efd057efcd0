"""Agent discovery on the wire: ICMP advertisements and solicitations (RFC 5944 §2).

One raw ICMP socket per daemon. Sending picks the interface with ``IP_MULTICAST_IF`` and uses
TTL 1 as the RFC requires; receiving uses ``IP_PKTINFO`` to learn the arrival interface, since
an agent answers a solicitation on the link it came from and a client must know on which link
it heard an agent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Callable

from packets import AgentAdvertisement, AgentSolicitation, MalformedMessage, decode_discovery

from agent.mobility.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

ALL_SYSTEMS = "224.0.0.1"
ALL_ROUTERS = "224.0.0.2"
_IP_HDR_MIN = 20
#: Linux's IP_PKTINFO; Python only names it from 3.13 on.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


@dataclass
class Heard:
    """A discovery message received: what, from whom, on which interface."""

    message: AgentAdvertisement | AgentSolicitation
    source: str
    ifindex: int
    ttl: int


Handler = Callable[[Heard], None]


class DiscoverySocket:
    """Raw ICMP socket for advertisements and solicitations, driven by the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler) -> None:
        self._loop = loop
        self._handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        self.malformed = 0
        self._refusals = RateLimitedLog(log, 10.0)
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def join(self, group: str, ifindex: int) -> None:
        """Join a multicast group on one interface (ALL_ROUTERS, to hear solicitations)."""
        mreq = struct.pack("=4s4si", socket.inet_aton(group), b"\0" * 4, ifindex)
        try:
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        except OSError as exc:  # already joined, or interface gone
            log.debug("join %s on ifindex %d: %s", group, ifindex, exc)

    def send(self, payload: bytes, dest: str, ifindex: int) -> None:
        """Send one ICMP message out of one interface with TTL 1."""
        mreqn = struct.pack("=4s4si", b"\0" * 4, b"\0" * 4, ifindex)
        try:
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            self.sock.sendmsg(
                [payload], [(socket.IPPROTO_IP, IP_PKTINFO,
                             struct.pack("=i4s4s", ifindex, b"\0" * 4, b"\0" * 4))],
                0, (dest, 0),
            )
        except OSError as exc:
            log.warning("discovery send to %s on ifindex %d failed: %s", dest, ifindex, exc)

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded: never starve the loop
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("discovery receive failed: %s", exc)
                return
            ifindex = 0
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 4:
                    ifindex = struct.unpack_from("=i", value)[0]
            if len(data) < _IP_HDR_MIN:
                continue
            ihl = (data[0] & 0x0F) * 4
            ttl = data[8]
            icmp = data[ihl:]
            if not icmp or icmp[0] not in (9, 10):
                continue  # echo and friends: not ours
            try:
                msg = decode_discovery(icmp)
            except MalformedMessage as exc:
                self.malformed += 1
                self._refusals("malformed", logging.INFO,
                               "malformed discovery message from %s: %s", addr[0], exc)
                continue
            try:
                self._handler(Heard(msg, addr[0], ifindex, ttl))
            except Exception:  # a handler bug must not kill discovery
                log.exception("discovery handler failed")
