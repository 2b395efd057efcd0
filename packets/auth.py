"""Authentication extensions: HMAC-SHA-256 over exactly the bytes RFC 5944 §3.5 protects.

An authenticator covers "the UDP payload ... all prior extensions in their entirety, and the
type, length, and SPI of this extension" (RFC 5944 §3.5.1). So signing appends to bytes that
are already final, and verifying reads the received bytes, never a re-encoding: a relay that
re-encoded a message differently would otherwise break signatures it did not own.

SPIs 0-255 are reserved by the RFC; MOAT refuses them on both sides.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Callable, Mapping, Union

from .codes import AUTH_EXT_TYPES, ExtType
from .errors import MalformedMessage
from .extensions import AuthExtension
from .mobileip import Registration

AUTHENTICATOR_LEN = 32  # SHA-256
MIN_SPI = 256
_TLS = struct.Struct("!BBI")  # type, length, SPI

KeyLookup = Union[Mapping[int, bytes], Callable[[int], "bytes | None"]]


def compute_authenticator(key: bytes, protected: bytes) -> bytes:
    """HMAC-SHA-256 of the protected bytes."""
    return hmac.new(key, protected, hashlib.sha256).digest()


def append_auth(message: bytes, ext_type: ExtType, spi: int, key: bytes) -> bytes:
    """Return ``message`` followed by a signed authentication extension of ``ext_type``."""
    if ext_type not in AUTH_EXT_TYPES:
        raise ValueError(f"{ext_type!r} is not an authentication extension")
    if not MIN_SPI <= spi <= 0xFFFFFFFF:
        raise ValueError(f"SPI {spi} is reserved or out of range (must be >= {MIN_SPI})")
    head = _TLS.pack(int(ext_type), 4 + AUTHENTICATOR_LEN, spi)
    return message + head + compute_authenticator(key, message + head)


def _lookup(keys: KeyLookup, spi: int) -> bytes | None:
    if callable(keys):
        return keys(spi)
    return keys.get(spi)


def find_auth(msg: Registration, ext_type: ExtType) -> tuple[int, AuthExtension] | None:
    """Index and extension of the first authentication extension of ``ext_type``."""
    for i, ext in enumerate(msg.extensions):
        if isinstance(ext, AuthExtension) and ext.ext_type == ext_type:
            return i, ext
    return None


def verify_auth(msg: Registration, ext_type: ExtType, keys: KeyLookup) -> bool:
    """True if ``msg`` carries a valid ``ext_type`` authenticator under a key ``keys`` knows.

    ``msg`` must have been decoded (it needs ``raw`` and ``ext_offsets``). A missing
    extension, a reserved or unknown SPI, or a wrong length are all simply False: the caller
    turns False into the RFC's reply code.
    """
    if not msg.raw:
        raise ValueError("verify_auth needs a decoded message (with raw bytes)")
    found = find_auth(msg, ext_type)
    if found is None:
        return False
    index, ext = found
    if ext.spi < MIN_SPI or len(ext.authenticator) != AUTHENTICATOR_LEN:
        return False
    key = _lookup(keys, ext.spi)
    if key is None:
        return False
    start = msg.ext_offsets[index]
    protected = msg.raw[: start + _TLS.size]
    return hmac.compare_digest(compute_authenticator(key, protected), ext.authenticator)


def bytes_before(msg: Registration, ext_type: ExtType) -> bytes:
    """The received bytes up to (not including) the first extension of ``ext_type``.

    A foreign agent relays a request by cutting it before its Mobile-Foreign extension and
    appending its own extensions and Foreign-Home authenticator.
    """
    found = find_auth(msg, ext_type)
    if found is None:
        raise MalformedMessage(f"no extension of type {int(ext_type)} to cut before")
    return msg.raw[: msg.ext_offsets[found[0]]]
