"""Mobile IPv4 Registration Request and Reply (RFC 5944 §3.3, §3.4), byte for byte.

These dataclasses are what agents use: encoding is deterministic, decoding is strict (see
:mod:`packets.errors`). A decoded message remembers the exact bytes it came from and where
each extension started, because authenticators are computed over received bytes, not over a
re-encoding (:mod:`packets.auth`).

Fixed part of a request (24 bytes)::

    type=1 | flags S B D M G r T x | lifetime(2) | home address | home agent | care-of address
    | identification(8)

Fixed part of a reply (20 bytes)::

    type=3 | code | lifetime(2) | home address | home agent | identification(8)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Union

from ._wire import bytes_to_ip, check_uint, ip_to_bytes
from .codes import MessageType, ReplyCode
from .errors import MalformedMessage
from .extensions import Extension, decode_extensions, encode_extension

_RRQ = struct.Struct("!BBH4s4s4sQ")
_RRP = struct.Struct("!BBH4s4sQ")

#: Lifetime value meaning "forever" is not allowed for registrations; 0 means deregister.
DEREGISTER = 0


class RequestFlags(enum.IntFlag):
    """Flags of a Registration Request, most significant bit first (RFC 5944 §3.3)."""

    S = 0x80  # simultaneous bindings
    B = 0x40  # broadcast datagrams
    D = 0x20  # decapsulation by mobile node (co-located care-of address)
    M = 0x10  # minimal encapsulation
    G = 0x08  # GRE encapsulation
    r = 0x04  # reserved, sent as zero
    T = 0x02  # reverse tunneling requested (RFC 3024)
    x = 0x01  # reserved, sent as zero


@dataclass
class RegistrationRequest:
    """A Registration Request; ``extensions`` in wire order."""

    home_address: str
    home_agent: str
    care_of_address: str
    identification: int
    lifetime: int = 180
    flags: RequestFlags = RequestFlags(0)
    extensions: list[Extension] = field(default_factory=list)
    #: Bytes this message was decoded from (empty when built locally).
    raw: bytes = field(default=b"", compare=False, repr=False)
    #: Offset in ``raw`` where each extension starts.
    ext_offsets: list[int] = field(default_factory=list, compare=False, repr=False)

    FIXED_LEN = _RRQ.size

    def encode(self) -> bytes:
        """Fixed part followed by every extension, as they are (authenticators included)."""
        check_uint(self.lifetime, 16, "lifetime")
        check_uint(self.identification, 64, "identification")
        check_uint(int(self.flags), 8, "flags")
        head = _RRQ.pack(
            MessageType.REGISTRATION_REQUEST,
            int(self.flags),
            self.lifetime,
            ip_to_bytes(self.home_address, "home address"),
            ip_to_bytes(self.home_agent, "home agent"),
            ip_to_bytes(self.care_of_address, "care-of address"),
            self.identification,
        )
        return head + b"".join(encode_extension(e) for e in self.extensions)

    @classmethod
    def decode(cls, data: bytes) -> "RegistrationRequest":
        """Strictly decode one request; raise MalformedMessage otherwise."""
        data = bytes(data)
        if len(data) < _RRQ.size:
            raise MalformedMessage(f"registration request is {len(data)} bytes < 24")
        mtype, flags, lifetime, home, agent, coa, ident = _RRQ.unpack_from(data)
        if mtype != MessageType.REGISTRATION_REQUEST:
            raise MalformedMessage(f"type {mtype} is not a registration request", 0)
        exts, offsets = decode_extensions(data, _RRQ.size)
        return cls(
            bytes_to_ip(home),
            bytes_to_ip(agent),
            bytes_to_ip(coa),
            ident,
            lifetime,
            RequestFlags(flags),
            exts,
            data,
            offsets,
        )

    def find(self, kind: type) -> list[Extension]:
        """All extensions of one class, in wire order."""
        return [e for e in self.extensions if isinstance(e, kind)]


@dataclass
class RegistrationReply:
    """A Registration Reply; ``code`` is a :class:`ReplyCode` when the number is known."""

    code: int
    home_address: str
    home_agent: str
    identification: int
    lifetime: int = 0
    extensions: list[Extension] = field(default_factory=list)
    raw: bytes = field(default=b"", compare=False, repr=False)
    ext_offsets: list[int] = field(default_factory=list, compare=False, repr=False)

    FIXED_LEN = _RRP.size

    def encode(self) -> bytes:
        check_uint(int(self.code), 8, "code")
        check_uint(self.lifetime, 16, "lifetime")
        check_uint(self.identification, 64, "identification")
        head = _RRP.pack(
            MessageType.REGISTRATION_REPLY,
            int(self.code),
            self.lifetime,
            ip_to_bytes(self.home_address, "home address"),
            ip_to_bytes(self.home_agent, "home agent"),
            self.identification,
        )
        return head + b"".join(encode_extension(e) for e in self.extensions)

    @classmethod
    def decode(cls, data: bytes) -> "RegistrationReply":
        data = bytes(data)
        if len(data) < _RRP.size:
            raise MalformedMessage(f"registration reply is {len(data)} bytes < 20")
        mtype, code, lifetime, home, agent, ident = _RRP.unpack_from(data)
        if mtype != MessageType.REGISTRATION_REPLY:
            raise MalformedMessage(f"type {mtype} is not a registration reply", 0)
        try:
            code = ReplyCode(code)
        except ValueError:
            pass  # codes the RFC leaves unassigned are still legal on the wire
        exts, offsets = decode_extensions(data, _RRP.size)
        return cls(code, bytes_to_ip(home), bytes_to_ip(agent), ident, lifetime, exts, data, offsets)

    @property
    def accepted(self) -> bool:
        return self.code in (ReplyCode.ACCEPTED, ReplyCode.ACCEPTED_NO_SIMULTANEOUS)

    def find(self, kind: type) -> list[Extension]:
        return [e for e in self.extensions if isinstance(e, kind)]


Registration = Union[RegistrationRequest, RegistrationReply]


def decode_registration(data: bytes) -> Registration:
    """Decode whatever arrived on UDP 434: a request or a reply, by its first byte."""
    if not data:
        raise MalformedMessage("empty datagram")
    if data[0] == MessageType.REGISTRATION_REQUEST:
        return RegistrationRequest.decode(data)
    if data[0] == MessageType.REGISTRATION_REPLY:
        return RegistrationReply.decode(data)
    raise MalformedMessage(f"unknown Mobile IP message type {data[0]}", 0)
