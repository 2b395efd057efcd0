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


# --- Binding revocation (after RFC 3543) ---------------------------------------------------
#
# When the home agent drops a binding because the object registered elsewhere (or went
# home), the foreign agent that relayed it would keep its visitor entry, and its route for the
# home address, until the registration's lifetime ran out. The home agent tells it at once,
# with a Registration Revocation modelled on RFC 3543 §3.1 (same type number, UDP 434, a
# Foreign-Home authenticator), acknowledged as in §3.2. MOAT's revocation adds one field to
# the RFC's fixed part: the Identification of the registration it revokes, so the foreign
# agent removes that registration's visitor entry and never a newer one (a revocation that
# crosses a new registration through the same agent, or a replay, changes nothing).
#
# Revocation (30 bytes)::
#
#     type=7 | reserved(3) | home address | home agent | care-of address | revocation id(4)
#     | flags A I + reserved(2) | registration identification(8)
#
# Acknowledgement (14 bytes, RFC 3543 §3.2)::
#
#     type=15 | reserved(3) | home address | revocation id(4) | flags I + reserved(2)

#: Message types of RFC 3543 on UDP 434.
REGISTRATION_REVOCATION = 7
REVOCATION_ACK = 15

_REV = struct.Struct("!B3x4s4s4sIHQ")
_ACK = struct.Struct("!B3x4sIH")


class RevocationFlags(enum.IntFlag):
    """Flags of a revocation (RFC 3543 §3.1): ``A`` the home agent wants an acknowledgement,
    ``I`` the mobile node is told (MOAT: never; the object has already moved)."""

    A = 0x8000
    I = 0x4000  # noqa: E741 - the RFC's name


@dataclass
class RegistrationRevocation:
    """The home agent's notice that the binding at ``care_of_address`` is gone."""

    home_address: str
    home_agent: str
    care_of_address: str
    revocation_id: int
    registration_id: int
    flags: RevocationFlags = RevocationFlags.A
    extensions: list[Extension] = field(default_factory=list)
    raw: bytes = field(default=b"", compare=False, repr=False)
    ext_offsets: list[int] = field(default_factory=list, compare=False, repr=False)

    FIXED_LEN = _REV.size

    def encode(self) -> bytes:
        check_uint(self.revocation_id, 32, "revocation id")
        check_uint(self.registration_id, 64, "registration identification")
        check_uint(int(self.flags), 16, "flags")
        head = _REV.pack(
            REGISTRATION_REVOCATION,
            ip_to_bytes(self.home_address, "home address"),
            ip_to_bytes(self.home_agent, "home agent"),
            ip_to_bytes(self.care_of_address, "care-of address"),
            self.revocation_id,
            int(self.flags),
            self.registration_id,
        )
        return head + b"".join(encode_extension(e) for e in self.extensions)

    @classmethod
    def decode(cls, data: bytes) -> "RegistrationRevocation":
        data = bytes(data)
        if len(data) < _REV.size:
            raise MalformedMessage(f"registration revocation is {len(data)} bytes < {_REV.size}")
        mtype, home, agent, coa, rev_id, flags, reg_id = _REV.unpack_from(data)
        if mtype != REGISTRATION_REVOCATION:
            raise MalformedMessage(f"type {mtype} is not a registration revocation", 0)
        exts, offsets = decode_extensions(data, _REV.size)
        return cls(bytes_to_ip(home), bytes_to_ip(agent), bytes_to_ip(coa), rev_id, reg_id,
                   RevocationFlags(flags), exts, data, offsets)

    def find(self, kind: type) -> list[Extension]:
        return [e for e in self.extensions if isinstance(e, kind)]


@dataclass
class RevocationAck:
    """The foreign agent's acknowledgement of a revocation (RFC 3543 §3.2)."""

    home_address: str
    revocation_id: int
    flags: RevocationFlags = RevocationFlags(0)
    extensions: list[Extension] = field(default_factory=list)
    raw: bytes = field(default=b"", compare=False, repr=False)
    ext_offsets: list[int] = field(default_factory=list, compare=False, repr=False)

    FIXED_LEN = _ACK.size

    def encode(self) -> bytes:
        check_uint(self.revocation_id, 32, "revocation id")
        check_uint(int(self.flags), 16, "flags")
        head = _ACK.pack(REVOCATION_ACK, ip_to_bytes(self.home_address, "home address"),
                         self.revocation_id, int(self.flags))
        return head + b"".join(encode_extension(e) for e in self.extensions)

    @classmethod
    def decode(cls, data: bytes) -> "RevocationAck":
        data = bytes(data)
        if len(data) < _ACK.size:
            raise MalformedMessage(f"revocation acknowledgement is {len(data)} bytes < {_ACK.size}")
        mtype, home, rev_id, flags = _ACK.unpack_from(data)
        if mtype != REVOCATION_ACK:
            raise MalformedMessage(f"type {mtype} is not a revocation acknowledgement", 0)
        exts, offsets = decode_extensions(data, _ACK.size)
        return cls(bytes_to_ip(home), rev_id, RevocationFlags(flags), exts, data, offsets)

    def find(self, kind: type) -> list[Extension]:
        return [e for e in self.extensions if isinstance(e, kind)]


MobileIpMessage = Union[RegistrationRequest, RegistrationReply, RegistrationRevocation,
                        RevocationAck]


def decode_mobileip(data: bytes) -> MobileIpMessage:
    """Decode anything an object agent takes on UDP 434: a request, a reply, a revocation
    or its acknowledgement (:func:`decode_registration` stays limited to the first two,
    for the tools that know only those)."""
    if data and data[0] == REGISTRATION_REVOCATION:
        return RegistrationRevocation.decode(data)
    if data and data[0] == REVOCATION_ACK:
        return RevocationAck.decode(data)
    return decode_registration(data)
