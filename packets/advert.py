"""Agent Advertisement and Agent Solicitation (RFC 5944 §2, on ICMP from RFC 1256).

An advertisement is an ICMP Router Advertisement (type 9) followed by a Mobility Agent
Advertisement Extension (type 16) and optionally a Prefix-Lengths Extension (19)::

    type=9 | code | checksum | num addrs | addr entry size=2 | lifetime(2)
    router address + preference, num addrs times
    16 | length | sequence(2) | registration lifetime(2) | R B H F M G r T U X I + 5 reserved
    care-of addresses

The codec produces and reads ICMP messages (the IP header is the sender's business: TTL 1,
destination 224.0.0.1 or 255.255.255.255, RFC 5944 §2.3.1).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from ._wire import bytes_to_ip, check_uint, internet_checksum, ip_to_bytes
from .codes import ExtType, IcmpType, is_skippable
from .errors import MalformedMessage

_ICMP_RA = struct.Struct("!BBHBBH")
_ROUTER = struct.Struct("!4si")
_MAAE = struct.Struct("!BBHHH")
_SOLICIT = struct.Struct("!BBHI")

#: Code 16: the agent does not route common traffic (a pure mobility agent).
CODE_MOBILITY_ONLY = 16


class AdvFlags(enum.IntFlag):
    """Flags of the Mobility Agent Advertisement Extension, 16 bits, MSB first."""

    R = 0x8000  # registration required (through the FA)
    B = 0x4000  # busy
    H = 0x2000  # home agent
    F = 0x1000  # foreign agent
    M = 0x0800  # minimal encapsulation
    G = 0x0400  # GRE encapsulation
    r = 0x0200  # reserved, sent as zero
    T = 0x0100  # reverse tunneling supported
    U = 0x0080  # UDP tunnelling (RFC 3519)
    X = 0x0040  # registration revocation (RFC 3543)
    I = 0x0020  # foreign agent supports regional registration  # noqa: E741


@dataclass
class AgentAdvertisement:
    """What an object agent says about itself on a link."""

    sequence: int
    registration_lifetime: int
    flags: AdvFlags
    care_of_addresses: list[str] = field(default_factory=list)
    router_addresses: list[tuple[str, int]] = field(default_factory=list)
    lifetime: int = 9000  # ICMP advertisement lifetime, seconds
    code: int = 0
    prefix_lengths: list[int] | None = None
    #: Skippable extensions we do not interpret, as (type, body).
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    def encode(self) -> bytes:
        """ICMP message with a valid checksum."""
        check_uint(self.sequence, 16, "sequence")
        check_uint(self.registration_lifetime, 16, "registration lifetime")
        check_uint(self.lifetime, 16, "lifetime")
        check_uint(int(self.flags), 16, "flags")
        if len(self.router_addresses) > 255:
            raise MalformedMessage("more than 255 router addresses")
        for _addr, pref in self.router_addresses:
            if not isinstance(pref, int) or not -(1 << 31) <= pref < (1 << 31):
                raise MalformedMessage(f"router preference {pref!r} is not a signed 32-bit int")
        routers = b"".join(
            _ROUTER.pack(ip_to_bytes(a, "router address"), pref)
            for a, pref in self.router_addresses
        )
        coas = b"".join(ip_to_bytes(a, "care-of address") for a in self.care_of_addresses)
        body_len = 6 + len(coas)
        if body_len > 255:
            raise MalformedMessage("too many care-of addresses for one extension")
        exts = _MAAE.pack(
            ExtType.MOBILITY_AGENT_ADV,
            body_len,
            self.sequence,
            self.registration_lifetime,
            int(self.flags),
        ) + coas
        if self.prefix_lengths is not None:
            if len(self.prefix_lengths) > 255:
                raise MalformedMessage("too many prefix lengths")
            exts += bytes((ExtType.PREFIX_LENGTHS, len(self.prefix_lengths)))
            exts += bytes(check_uint(p, 8, "prefix length") for p in self.prefix_lengths)
        for ext_type, data in self.unknown_extensions:
            exts += bytes((ext_type, len(data))) + data
        head = _ICMP_RA.pack(
            IcmpType.ROUTER_ADVERTISEMENT, self.code, 0, len(self.router_addresses), 2,
            self.lifetime,
        )
        msg = bytearray(head + routers + exts)
        struct.pack_into("!H", msg, 2, internet_checksum(bytes(msg)))
        return bytes(msg)

    @classmethod
    def decode(cls, data: bytes, verify_checksum: bool = True) -> "AgentAdvertisement":
        """Strictly decode an ICMP advertisement that carries a mobility extension."""
        data = bytes(data)
        if len(data) < _ICMP_RA.size:
            raise MalformedMessage(f"ICMP advertisement is {len(data)} bytes < 8")
        icmp_type, code, _ck, naddrs, entry_size, lifetime = _ICMP_RA.unpack_from(data)
        if icmp_type != IcmpType.ROUTER_ADVERTISEMENT:
            raise MalformedMessage(f"ICMP type {icmp_type} is not an advertisement", 0)
        if code not in (0, CODE_MOBILITY_ONLY):
            raise MalformedMessage(f"advertisement code {code} is neither 0 nor 16", 1)
        if entry_size != 2:
            raise MalformedMessage(f"address entry size {entry_size} != 2", 5)
        if verify_checksum and internet_checksum(data) != 0:
            raise MalformedMessage("bad ICMP checksum", 2)
        pos = _ICMP_RA.size
        end_routers = pos + naddrs * _ROUTER.size
        if end_routers > len(data):
            raise MalformedMessage(f"{naddrs} router addresses do not fit", pos)
        routers = []
        for _ in range(naddrs):
            addr, pref = _ROUTER.unpack_from(data, pos)
            routers.append((bytes_to_ip(addr), pref))
            pos += _ROUTER.size
        adv: AgentAdvertisement | None = None
        prefixes: list[int] | None = None
        unknown: list[tuple[int, bytes]] = []
        while pos < len(data):
            ext_type = data[pos]
            if ext_type == ExtType.PAD:
                pos += 1
                continue
            if pos + 2 > len(data):
                raise MalformedMessage("truncated extension header", pos)
            length = data[pos + 1]
            body = data[pos + 2 : pos + 2 + length]
            if len(body) != length:
                raise MalformedMessage(f"extension {ext_type} runs past the message", pos)
            if ext_type == ExtType.MOBILITY_AGENT_ADV:
                if adv is not None:
                    raise MalformedMessage("two mobility agent extensions", pos)
                if length < 6 or (length - 6) % 4:
                    raise MalformedMessage(f"mobility agent extension length {length}", pos)
                _t, _l, seq, reg_life, flags = _MAAE.unpack_from(data, pos)
                coas = [bytes_to_ip(body[i : i + 4]) for i in range(6, length, 4)]
                adv = cls(seq, reg_life, AdvFlags(flags), coas, routers, lifetime, code)
            elif ext_type == ExtType.PREFIX_LENGTHS:
                if adv is None:
                    raise MalformedMessage("prefix-lengths extension before the mobility one", pos)
                prefixes = list(body)
                if any(p > 32 for p in prefixes):
                    raise MalformedMessage("prefix length > 32", pos)
            elif is_skippable(ext_type):
                unknown.append((ext_type, body))
            else:
                raise MalformedMessage(f"unknown non-skippable extension type {ext_type}", pos)
            pos += 2 + length
        if adv is None:
            raise MalformedMessage("router advertisement without a mobility agent extension")
        adv.prefix_lengths = prefixes
        adv.unknown_extensions = unknown
        return adv


@dataclass
class AgentSolicitation:
    """An ICMP Router Solicitation (type 10): "agents on this link, advertise now"."""

    def encode(self) -> bytes:
        msg = bytearray(_SOLICIT.pack(IcmpType.ROUTER_SOLICITATION, 0, 0, 0))
        struct.pack_into("!H", msg, 2, internet_checksum(bytes(msg)))
        return bytes(msg)

    @classmethod
    def decode(cls, data: bytes, verify_checksum: bool = True) -> "AgentSolicitation":
        data = bytes(data)
        if len(data) < _SOLICIT.size:
            raise MalformedMessage(f"ICMP solicitation is {len(data)} bytes < 8")
        icmp_type, code, _ck, _res = _SOLICIT.unpack_from(data)
        if icmp_type != IcmpType.ROUTER_SOLICITATION or code != 0:
            raise MalformedMessage(f"ICMP {icmp_type}/{code} is not a solicitation", 0)
        if verify_checksum and internet_checksum(data) != 0:
            raise MalformedMessage("bad ICMP checksum", 2)
        return cls()


def decode_discovery(data: bytes, verify_checksum: bool = True) -> AgentAdvertisement | AgentSolicitation:
    """Decode an ICMP message an agent's discovery socket received."""
    if not data:
        raise MalformedMessage("empty ICMP message")
    if data[0] == IcmpType.ROUTER_ADVERTISEMENT:
        return AgentAdvertisement.decode(data, verify_checksum)
    if data[0] == IcmpType.ROUTER_SOLICITATION:
        return AgentSolicitation.decode(data, verify_checksum)
    raise MalformedMessage(f"ICMP type {data[0]} is not agent discovery", 0)
