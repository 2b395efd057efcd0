"""Being told at once when an interface comes up: a netlink multicast socket read on the loop.

The static-routes role re-installs a route as soon as the link it goes through is up again;
polling the kernel alone would make that wait for the next poll. The kernel announces every
link change (``RTM_NEWLINK``, group ``RTMGRP_LINK``) and every IPv4 address change
(``RTM_NEWADDR``, ``RTMGRP_IPV4_IFADDR``) to whoever subscribed; this module subscribes and
calls back once per batch of announcements that could make a route installable again: a link
that is now up *with carrier*, or an address added. A link going down calls nothing, since it
can only take routes away.

Nothing here changes the kernel (that is :mod:`agent.core.netlink`'s); this only listens.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from typing import Callable

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWLINK = 16
RTM_NEWADDR = 20
IFF_UP = 0x1
#: The driver signals carrier (``IFF_LOWER_UP``): a veth whose peer is down has IFF_UP only.
IFF_LOWER_UP = 0x10000

#: struct nlmsghdr: length, type, flags, sequence, port id.
NLMSGHDR = struct.Struct("=IHHII")
#: struct ifinfomsg: family, pad, type, index, flags, change.
IFINFOMSG = struct.Struct("=BBHiII")
#: ifaddrmsg: family, prefix length, flags, scope, interface index.
IFADDRMSG = struct.Struct("=BBBBI")
HOST_PREFIX = 32
#: Bytes read at most per datagram (one batch of announcements).
RECV_SIZE = 65536


class LinkEventsError(AgentError):
    """The netlink multicast socket could not be opened."""


def up_events(data: bytes) -> list[str]:
    """What in one netlink datagram could make a route installable again: ``"link <index>"``
    for each link announced up with carrier, ``"address"`` for each address added. A
    truncated or malformed message ends the parse (what was read before it still counts)."""
    found: list[str] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        body = offset + NLMSGHDR.size
        if kind == RTM_NEWLINK and length >= NLMSGHDR.size + IFINFOMSG.size:
            _family, _pad, _type, index, flags, _change = IFINFOMSG.unpack_from(data, body)
            if flags & IFF_UP and flags & IFF_LOWER_UP:
                found.append(f"link {index}")
        elif kind == RTM_NEWADDR:
            # A host address (/32: an object's home address on lo at every move) puts no
            # next hop on-link; the routes' look it caused took the switch's netlink worker.
            if length < NLMSGHDR.size + IFADDRMSG.size or \
                    IFADDRMSG.unpack_from(data, body)[1] < HOST_PREFIX:
                found.append("address")
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return found


class LinkEvents:
    """A ``NETLINK_ROUTE`` socket subscribed to link and IPv4 address announcements, read by
    the event loop; ``on_up`` gets the :func:`up_events` of each readable batch (never an
    empty list). If the kernel's queue overflowed (``ENOBUFS``), announcements were lost:
    ``on_up`` gets ``["overflow"]`` so the caller looks at the kernel's state itself."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_up: Callable[[list[str]], None],
                 groups: int = RTMGRP_LINK | RTMGRP_IPV4_IFADDR,
                 sock: socket.socket | None = None) -> None:
        """Subscribe to ``groups``; ``sock``: a datagram socket already made (tests feed
        announcements through a socketpair) instead of a new netlink one."""
        self.loop = loop
        self.on_up = on_up
        #: Batches read, and times announcements were lost to a full queue.
        self.batches = 0
        self.overflows = 0
        if sock is None:
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                     NETLINK_ROUTE)
            except OSError as exc:
                raise LinkEventsError(f"cannot open a netlink socket: {exc}") from None
            try:
                sock.bind((0, groups))
            except OSError as exc:
                sock.close()
                raise LinkEventsError(f"cannot subscribe to link announcements: {exc}") from None
        self.sock = sock
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        events: list[str] = []
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    events.append("overflow")
                    continue
                log.warning("link announcements: %s", exc)
                break
            self.batches += 1
            events.extend(up_events(data))
        if events:
            self.on_up(events)

    def close(self) -> None:
        """Stop listening; closing twice is fine."""
        if self.sock.fileno() >= 0:
            try:
                self.loop.remove_reader(self.sock.fileno())
            except (RuntimeError, ValueError):  # the loop is already closed
                pass
            self.sock.close()
