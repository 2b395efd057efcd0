"""Small shared helpers for the codecs: address conversion and bounded reads.

Private to ``packets``: each helper turns every low-level failure into ``MalformedMessage``
so the public decoders never leak ``struct.error``, ``OSError`` or ``UnicodeDecodeError``.
"""

from __future__ import annotations

import socket
import struct

from .errors import MalformedMessage


def ip_to_bytes(address: str, field: str) -> bytes:
    """Dotted-quad IPv4 to 4 bytes; rejects anything inet_pton rejects (strict, no '1.2')."""
    try:
        return socket.inet_pton(socket.AF_INET, address)
    # ValueError: an embedded NUL; UnicodeEncodeError (a ValueError): a lone surrogate.
    except (OSError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"{field}: not an IPv4 address: {address!r}") from exc


def bytes_to_ip(raw: bytes) -> str:
    """4 bytes to dotted-quad IPv4."""
    return socket.inet_ntoa(raw)


def utf8(raw: bytes, field: str, offset: int) -> str:
    """Decode UTF-8 or raise MalformedMessage naming the field."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"{field}: invalid UTF-8", offset) from exc


def check_uint(value: int, bits: int, field: str) -> int:
    """Reject values that do not fit an unsigned field before struct does it less clearly."""
    if not isinstance(value, int) or value < 0 or value >= (1 << bits):
        raise MalformedMessage(f"{field}: {value!r} does not fit in {bits} bits")
    return value


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum (ICMP, GRE)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
