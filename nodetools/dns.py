"""The DNS client side of MOAT: build an A query and read its answer (RFC 1035 §4.1).

The probes ask the run's DNS server (dns23, :mod:`topologies.dns`) from inside a node, so the
client lives here, below :mod:`topologies`, which re-exports it for the server's tests.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["query", "parse_a_answer"]


def query(name: str, txid: int = 0x4d4f) -> bytes:
    """A DNS query for ``name``'s A record (RFC 1035 §4.1), recursion desired."""
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)


def parse_a_answer(data: bytes) -> tuple[int, list[str]]:
    """(rcode, A record addresses) of a DNS response; ValueError when it is not one."""
    if len(data) < 12:
        raise ValueError("short DNS message")
    _txid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if not flags & 0x8000:
        raise ValueError("not a response")
    pos = 12

    def skip_name(p: int) -> int:
        while True:
            if p >= len(data):
                raise ValueError("name runs past the message")
            n = data[p]
            if n & 0xC0 == 0xC0:
                return p + 2
            if n == 0:
                return p + 1
            p += 1 + n

    for _ in range(qd):
        pos = skip_name(pos) + 4
    addresses = []
    for _ in range(an):
        pos = skip_name(pos)
        try:
            rtype, _cls, _ttl, length = struct.unpack("!HHIH", data[pos:pos + 10])
        except struct.error:
            raise ValueError("record runs past the message") from None
        if pos + 10 + length > len(data):
            raise ValueError("record data runs past the message")
        pos += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += length
    return flags & 0x000F, addresses
