"""IPv4 route and address changes as rtnetlink messages built here (issue 14).

A move's switch changes the kernel on every router it touches: the HOA's routes into its
eBPF device, the FOA's delivery routes, the object's home address on ``lo``, the dark
routes. Through pyroute2 each change costs about 0.6 ms of Python (building and parsing
its messages) beside 10 µs in the kernel, and several milliseconds on a loaded machine: a
make-before-break move home waited for ten of them at the HOA. This module builds the
same requests by hand (``struct``: an ``nlmsghdr``, an ``rtmsg`` or ``ifaddrmsg``, and the
few attributes we use) and reads the kernel's acknowledgement, on a socket of the thread
that calls it (the netlink worker, :mod:`agent.core.netlink`, which keeps the order of
every change).

Only what the agents ask for is supported: IPv4 routes to a prefix through a device
and/or a gateway in any table, of type unicast or local; IPv4 addresses on a device. A
route is made as pyroute2 makes it (protocol static, scope global, or host for a local
one), so the two paths are interchangeable; a deletion matches any protocol, scope and
type, as ``ip route del`` does. A refusal raises :class:`RtnlError` with the kernel's
errno (:func:`agent.core.netlink.error_code` reads it).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE, RT_SCOPE_HOST, RT_SCOPE_NOWHERE = 0, 254, 255
RTN_UNICAST, RTN_LOCAL = 1, 2
RT_TABLE_UNSPEC, RT_TABLE_MAIN = 0, 254

NLMSGHDR = struct.Struct("=IHHII")
RTMSG = struct.Struct("=BBBBBBBBI")
IFADDRMSG = struct.Struct("=BBBBI")
#: An acknowledgement is an nlmsgerr: the header, an errno (0: done), the request's header.
MAX_ANSWER = 65536


class RtnlError(OSError):
    """The kernel refused a change (``code``: its errno)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.code = code


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (-length % 4)


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def route_request(command: str, dst: str, prefixlen: int, *, oif: int | None = None,
                  gateway: str | None = None, table: int = RT_TABLE_MAIN, local: bool = False,
                  seq: int = 0) -> bytes:
    """The RTM_NEWROUTE (``replace``) or RTM_DELROUTE (``del``) message for an IPv4 route."""
    if command not in ("replace", "del"):
        raise ValueError(f"route command {command!r} is not replace or del")
    if not 0 <= prefixlen <= 32:
        raise ValueError(f"prefix length {prefixlen} is not 0..32")
    new = command == "replace"
    if new:
        rtype, scope, proto = (RTN_LOCAL, RT_SCOPE_HOST, RTPROT_STATIC) if local \
            else (RTN_UNICAST, RT_SCOPE_UNIVERSE, RTPROT_STATIC)
    else:  # any protocol, scope and type (as ip route del)
        rtype, scope, proto = (RTN_LOCAL if local else 0), RT_SCOPE_NOWHERE, 0
    body = RTMSG.pack(socket.AF_INET, prefixlen, 0, 0,
                      table if table < 256 else RT_TABLE_UNSPEC, proto, scope, rtype, 0)
    body += _attr(RTA_TABLE, _u32(table))
    if prefixlen:
        body += _attr(RTA_DST, socket.inet_aton(dst))
    if gateway is not None:
        body += _attr(RTA_GATEWAY, socket.inet_aton(gateway))
    if oif is not None:
        body += _attr(RTA_OIF, _u32(oif))
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_REPLACE | NLM_F_CREATE if new else 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_NEWROUTE if new else RTM_DELROUTE,
                         flags, seq, 0) + body


def address_request(command: str, index: int, address: str, prefixlen: int, seq: int = 0) -> bytes:
    """The RTM_NEWADDR (``add``: an existing one is EEXIST) or RTM_DELADDR message for an
    IPv4 address on the device with ifindex ``index``."""
    if command not in ("add", "del"):
        raise ValueError(f"address command {command!r} is not add or del")
    if not 0 <= prefixlen <= 32:
        raise ValueError(f"prefix length {prefixlen} is not 0..32")
    packed = socket.inet_aton(address)
    body = IFADDRMSG.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    new = command == "add"
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if new else 0)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_NEWADDR if new else RTM_DELADDR,
                         flags, seq, 0) + body


def parse_ack(data: bytes, seq: int) -> int | None:
    """The errno (0: done) of the acknowledgement of request ``seq`` in ``data``, None if
    ``data`` holds none (another message: skipped)."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, got, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            raise RtnlError(errno.EPROTO, "a malformed rtnetlink answer")
        if kind == NLMSG_ERROR and got == seq:
            if length < NLMSGHDR.size + 4:
                raise RtnlError(errno.EPROTO, "a short rtnetlink acknowledgement")
            return -struct.unpack_from("=i", data, offset + NLMSGHDR.size)[0]
        offset += (length + 3) & ~3
    return None


class Rtnl:
    """One rtnetlink socket per thread that uses it; :meth:`request` sends one message and
    waits for its acknowledgement (the socket's timeout bounds the wait)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._local = threading.local()
        self._seq = 0
        self._lock = threading.Lock()

    def _socket(self) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_ROUTE)
            sock.settimeout(self.timeout)
            sock.bind((0, 0))
            self._local.sock = sock
        return sock

    def next_seq(self) -> int:
        with self._lock:
            self._seq = self._seq % 0xFFFFFFFF + 1
            return self._seq

    def request(self, message: bytes, seq: int, what: str) -> None:
        """Send ``message`` (built with sequence number ``seq``) and wait for its answer."""
        sock = self._socket()
        try:
            sock.send(message)
            while True:
                code = parse_ack(sock.recv(MAX_ANSWER), seq)
                if code is not None:
                    break
        except socket.timeout:
            raise RtnlError(errno.ETIMEDOUT, what) from None
        if code:
            raise RtnlError(code, what)

    def route(self, command: str, dst: str, prefixlen: int, **kw: object) -> None:
        seq = self.next_seq()
        self.request(route_request(command, dst, prefixlen, seq=seq, **kw),  # type: ignore[arg-type]
                     seq, f"route {command} {dst}/{prefixlen}")

    def address(self, command: str, index: int, address: str, prefixlen: int) -> None:
        seq = self.next_seq()
        self.request(address_request(command, index, address, prefixlen, seq=seq), seq,
                     f"address {command} {address}/{prefixlen}")

    def close(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None
