"""GRE header (RFC 2784) with the Key and Sequence fields of RFC 2890.

MOAT's tunnels put the binding id in the Key so the foreign agent can tell bindings apart.
This codec is what the userspace tunnel backend writes and reads on its raw protocol-47
socket; Scapy's own ``GRE`` layer reads the same bytes in captures::

    C . K S | reserved0 (9) | version (3) | protocol type (2)
    [checksum (2) | reserved1 (2)]   if C
    [key (4)]                        if K
    [sequence number (4)]            if S
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._wire import check_uint, internet_checksum
from .errors import MalformedMessage

_BASE = struct.Struct("!HH")
FLAG_C = 0x8000
FLAG_K = 0x2000
FLAG_S = 0x1000
_VERSION_MASK = 0x0007
_RESERVED_MASK = 0x4FF8  # bit 1 (routing, RFC 1701) and reserved0 must be zero
ETH_P_IP = 0x0800


@dataclass(frozen=True)
class GreHeader:
    """The fields of a GRE header; ``None`` means the optional field is absent."""

    protocol: int = ETH_P_IP
    key: int | None = None
    sequence: int | None = None
    checksum: bool = False

    def encode(self, payload: bytes) -> bytes:
        """Header followed by ``payload``; the checksum, if on, covers both."""
        check_uint(self.protocol, 16, "protocol")
        flags = 0
        opt = b""
        if self.checksum:
            flags |= FLAG_C
            opt += b"\x00\x00\x00\x00"
        if self.key is not None:
            flags |= FLAG_K
            opt += struct.pack("!I", check_uint(self.key, 32, "key"))
        if self.sequence is not None:
            flags |= FLAG_S
            opt += struct.pack("!I", check_uint(self.sequence, 32, "sequence"))
        packet = bytearray(_BASE.pack(flags, self.protocol) + opt + payload)
        if self.checksum:
            struct.pack_into("!H", packet, 4, internet_checksum(bytes(packet)))
        return bytes(packet)

    @property
    def length(self) -> int:
        return 4 + 4 * (self.checksum + (self.key is not None) + (self.sequence is not None))


def decode_gre(data: bytes, verify_checksum: bool = True) -> tuple[GreHeader, bytes]:
    """Split a GRE packet into its header and payload; strict about version and reserved bits."""
    data = bytes(data)
    if len(data) < _BASE.size:
        raise MalformedMessage(f"GRE packet is {len(data)} bytes < 4")
    flags, protocol = _BASE.unpack_from(data)
    if flags & _VERSION_MASK:
        raise MalformedMessage(f"GRE version {flags & _VERSION_MASK} != 0", 1)
    if flags & _RESERVED_MASK:
        raise MalformedMessage("GRE reserved bits set", 0)
    pos = _BASE.size
    has_c, has_k, has_s = bool(flags & FLAG_C), bool(flags & FLAG_K), bool(flags & FLAG_S)
    need = pos + 4 * (has_c + has_k + has_s)
    if len(data) < need:
        raise MalformedMessage(f"GRE header needs {need} bytes, got {len(data)}")
    if has_c:
        if verify_checksum and internet_checksum(data) != 0:
            raise MalformedMessage("bad GRE checksum", pos)
        pos += 4
    key = seq = None
    if has_k:
        (key,) = struct.unpack_from("!I", data, pos)
        pos += 4
    if has_s:
        (seq,) = struct.unpack_from("!I", data, pos)
        pos += 4
    return GreHeader(protocol, key, seq, has_c), data[pos:]
