"""UDP 434 with the arrival interface and destination address of every datagram.

asyncio's datagram endpoints hide both, and the object agent needs them: the FOA binds a
visitor to the interface and source its registration came from, and the HOA answers from
the address a request was sent to (RFC 5944 §3.8.3.1: the reply's source is "typically
copied from the IP Destination Address of the Registration Request"), which is the address
the FOA relayed to and the only one it accepts a reply from.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable

from packets.codes import MIP_PORT

from agent.mobility.discovery import IP_PKTINFO

log = logging.getLogger(__name__)

#: (data, (source address, port), arrival ifindex or 0, destination address or "").
DatagramHandler = Callable[[bytes, tuple, int, str], None]

#: Datagrams read per wake-up at most: a flood must not starve the loop.
BATCH = 64


def parse_pktinfo(ancillary: list[tuple[int, int, bytes]]) -> tuple[int, str]:
    """(ifindex, header destination address) from IP_PKTINFO, or (0, "") without it."""
    for level, kind, value in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
            ifindex, _spec, addr = struct.unpack_from("=i4s4s", value)
            return ifindex, socket.inet_ntoa(addr)
    return 0, ""


class MipSocket:
    """UDP 434 on every address, read with IP_PKTINFO; sends from a chosen source address."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: DatagramHandler,
                 port: int = MIP_PORT) -> None:
        self._loop = loop
        self._handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # An object's nested home agent (NEMO) binds UDP 434 on the object's home address
            # on the same router; the kernel gives it its packets.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.sock.bind(("0.0.0.0", port))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def sendto(self, data: bytes, addr: tuple, source: str | None = None) -> None:
        """Send one datagram to ``addr``, from ``source`` (one of this router's addresses)
        when given; a failure is logged, never raised (UDP may lose it anyway)."""
        try:
            if source:
                info = struct.pack("=i4s4s", 0, socket.inet_aton(source), b"\0" * 4)
                self.sock.sendmsg([data], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, addr)
            else:
                self.sock.sendto(data, addr)
        except OSError as exc:
            log.debug("UDP 434 send to %s failed: %s", addr[0], exc)

    def _on_readable(self) -> None:
        for _ in range(BATCH):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("UDP 434 receive failed: %s", exc)
                return
            ifindex, dest = parse_pktinfo(anc)
            self._handler(data, addr, ifindex, dest)
