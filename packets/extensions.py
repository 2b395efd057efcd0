"""Registration extensions: MN-NAI, NVSE (with MOAT's sub-types) and authentication.

Wire formats (all lengths exclude the type and length bytes, RFC 5944 §1.9):

* MN-NAI (131, RFC 2794): ``type, length, NAI`` — MOAT puts ``object-name@home-domain`` here.
* NVSE (134, RFC 3115): ``type, length, reserved(2), vendor-id(4), nvse-type(2), value``.
  Under vendor 32473 MOAT defines
  ``CARE_OF_NAME`` (value: UTF-8 name) and
  ``OBJECT_PART`` (value: ``role(1) reserved(1) part-id(2) parent-name(UTF-8)``) and
  ``GRE_KEY`` (value: the binding's 4-byte GRE key, in accepted replies).
* Authentication (32 Mobile-Home, 33 Mobile-Foreign, 34 Foreign-Home, RFC 5944 §3.5):
  ``type, length, SPI(4), authenticator``.

Unknown skippable extensions (type >= 128) survive a decode/encode round trip unchanged;
unknown non-skippable ones make the message malformed.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Union

from ._wire import check_uint, utf8
from .codes import AUTH_EXT_TYPES, MOAT_VENDOR_ID, ExtType, NvseType, PartRole, is_skippable
from .errors import MalformedMessage

_NVSE_HEAD = struct.Struct("!HIH")  # reserved, vendor id, nvse type
_PART_HEAD = struct.Struct("!BBH")  # role, reserved, part id
_SPI = struct.Struct("!I")
MAX_EXT_BODY = 255


@dataclass(frozen=True)
class NaiExtension:
    """MN-NAI: the object's name, ``name@home-domain``."""

    nai: str

    def body(self) -> bytes:
        return self.nai.encode("utf-8")

    ext_type = ExtType.MN_NAI


@dataclass(frozen=True)
class CareOfName:
    """NVSE: the care-of-name the FOA gave the object (patent Fig. 7, 122)."""

    name: str

    ext_type = ExtType.NVSE

    def body(self) -> bytes:
        return _NVSE_HEAD.pack(0, MOAT_VENDOR_ID, NvseType.CARE_OF_NAME) + self.name.encode()


@dataclass(frozen=True)
class ObjectPart:
    """NVSE: which part of a service this object is (primary, duplicate or secondary)."""

    role: PartRole
    part_id: int = 0
    parent: str = ""

    ext_type = ExtType.NVSE

    def body(self) -> bytes:
        check_uint(self.part_id, 16, "part_id")
        return (
            _NVSE_HEAD.pack(0, MOAT_VENDOR_ID, NvseType.OBJECT_PART)
            + _PART_HEAD.pack(int(self.role), 0, self.part_id)
            + self.parent.encode()
        )


@dataclass(frozen=True)
class MobileNetwork:
    """NVSE: the object's mobile network prefix (NEMO, RFC 5177): its secondaries' addresses."""

    prefix: str
    length: int

    ext_type = ExtType.NVSE

    def __post_init__(self) -> None:
        try:
            network = ipaddress.IPv4Network(f"{self.prefix}/{self.length}")
        except (ValueError, TypeError) as exc:
            raise MalformedMessage(f"mobile network {self.prefix}/{self.length}: {exc}") from None
        if not 24 <= self.length <= 32:
            raise MalformedMessage(f"mobile network /{self.length}: MOAT allows /24 to /32")
        del network

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.prefix}/{self.length}")

    def body(self) -> bytes:
        return (_NVSE_HEAD.pack(0, MOAT_VENDOR_ID, NvseType.MOBILE_NETWORK)
                + ipaddress.IPv4Address(self.prefix).packed + bytes((self.length,)))


@dataclass(frozen=True)
class GreKey:
    """NVSE: the GRE key of the binding (= binding id), so the FOA accepts exactly the
    tunnel packets of this binding."""

    key: int

    ext_type = ExtType.NVSE

    def body(self) -> bytes:
        return _NVSE_HEAD.pack(0, MOAT_VENDOR_ID, NvseType.GRE_KEY) + struct.pack("!I", check_uint(self.key, 32, "key"))


@dataclass(frozen=True)
class VendorExtension:
    """An NVSE of another vendor, or of ours with a sub-type this version does not know."""

    vendor_id: int
    nvse_type: int
    value: bytes = b""

    ext_type = ExtType.NVSE

    def body(self) -> bytes:
        check_uint(self.vendor_id, 32, "vendor_id")
        check_uint(self.nvse_type, 16, "nvse_type")
        return _NVSE_HEAD.pack(0, self.vendor_id, self.nvse_type) + self.value


@dataclass(frozen=True)
class AuthExtension:
    """An authentication extension; see :mod:`packets.auth` to compute and check it."""

    ext_type: ExtType
    spi: int
    authenticator: bytes

    def body(self) -> bytes:
        check_uint(self.spi, 32, "spi")
        return _SPI.pack(self.spi) + self.authenticator


@dataclass(frozen=True)
class UnknownExtension:
    """A skippable extension (type >= 128) MOAT does not interpret; kept byte for byte."""

    ext_type: int
    data: bytes

    def body(self) -> bytes:
        return self.data


Extension = Union[
    NaiExtension, CareOfName, ObjectPart, GreKey, MobileNetwork, VendorExtension, AuthExtension,
    UnknownExtension
]


def encode_extension(ext: Extension) -> bytes:
    """Type, length and body of one extension."""
    body = ext.body()
    if len(body) > MAX_EXT_BODY:
        raise MalformedMessage(f"extension {int(ext.ext_type)} body is {len(body)} > 255 bytes")
    return bytes((int(ext.ext_type), len(body))) + body


def _decode_nvse(body: bytes, offset: int) -> Extension:
    if len(body) < _NVSE_HEAD.size:
        raise MalformedMessage(f"NVSE too short ({len(body)} bytes)", offset)
    _reserved, vendor, nvse_type = _NVSE_HEAD.unpack_from(body)
    value = body[_NVSE_HEAD.size :]
    if vendor != MOAT_VENDOR_ID:
        return VendorExtension(vendor, nvse_type, value)
    if nvse_type == NvseType.CARE_OF_NAME:
        name = utf8(value, "care-of-name", offset)
        if not name:
            raise MalformedMessage("empty care-of-name", offset)
        return CareOfName(name)
    if nvse_type == NvseType.OBJECT_PART:
        if len(value) < _PART_HEAD.size:
            raise MalformedMessage("object-part NVSE too short", offset)
        role, _res, part_id = _PART_HEAD.unpack_from(value)
        try:
            part_role = PartRole(role)
        except ValueError:
            raise MalformedMessage(f"unknown object-part role {role}", offset) from None
        parent = utf8(value[_PART_HEAD.size :], "parent object", offset)
        return ObjectPart(part_role, part_id, parent)
    if nvse_type == NvseType.MOBILE_NETWORK:
        if len(value) != 5:
            raise MalformedMessage(f"mobile-network NVSE value is {len(value)} bytes, not 5",
                                   offset)
        return MobileNetwork(str(ipaddress.IPv4Address(value[:4])), value[4])
    if nvse_type == NvseType.GRE_KEY:
        if len(value) != 4:
            raise MalformedMessage(f"GRE-key NVSE value is {len(value)} bytes, not 4", offset)
        return GreKey(struct.unpack("!I", value)[0])
    return VendorExtension(vendor, nvse_type, value)


def decode_extensions(data: bytes, start: int) -> tuple[list[Extension], list[int]]:
    """Decode the extensions from ``data[start:]``; return them and their start offsets."""
    exts: list[Extension] = []
    offsets: list[int] = []
    pos = start
    end = len(data)
    while pos < end:
        if pos + 2 > end:
            raise MalformedMessage("truncated extension header", pos)
        ext_type, length = data[pos], data[pos + 1]
        body_start = pos + 2
        if body_start + length > end:
            raise MalformedMessage(
                f"extension {ext_type} length {length} runs past the message", pos
            )
        body = data[body_start : body_start + length]
        if ext_type == ExtType.MN_NAI:
            nai = utf8(body, "MN-NAI", pos)
            if not nai:
                raise MalformedMessage("empty MN-NAI", pos)
            ext: Extension = NaiExtension(nai)
        elif ext_type == ExtType.NVSE:
            ext = _decode_nvse(body, pos)
        elif ext_type in AUTH_EXT_TYPES:
            if length < _SPI.size:
                raise MalformedMessage(f"authentication extension {ext_type} too short", pos)
            ext = AuthExtension(ExtType(ext_type), _SPI.unpack_from(body)[0], body[4:])
        elif is_skippable(ext_type):
            ext = UnknownExtension(ext_type, body)
        else:
            raise MalformedMessage(f"unknown non-skippable extension type {ext_type}", pos)
        exts.append(ext)
        offsets.append(pos)
        pos = body_start + length
    return exts, offsets
