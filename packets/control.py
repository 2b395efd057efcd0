"""The MOAT control protocol: a fixed binary header and a JSON body.

Broker, provisioning, VM negotiation and object-service messages share one framing so that a
single Wireshark dissector (``packets/wireshark/moat.lua``) shows all of them::

    magic "MO" (2) | version (1) | type (1) | transaction id (4) | body length (4) | JSON body

The body is a UTF-8 JSON object. On UDP one datagram carries one message; on TCP messages are
back to back and :func:`frame_length` tells a reader how many bytes the next one needs.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from ._wire import check_uint
from .codes import ControlType
from .errors import MalformedMessage

MAGIC = b"MO"
VERSION = 1
HEADER = struct.Struct("!2sBBII")
#: Bodies above this are refused before any JSON parsing (a stream peer could claim 4 GiB).
MAX_BODY = 1 << 20


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    # "1e400" parses to inf without going through parse_constant; refuse it like "Infinity"
    # (encode() could not send it back: allow_nan=False).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"JSON number {text} is not a finite float")
    return value


@dataclass
class ControlMessage:
    """One control message: its type, a transaction id to match replies, and a JSON body."""

    type: ControlType
    txid: int
    body: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        check_uint(self.txid, 32, "txid")
        payload = json.dumps(self.body, separators=(",", ":"), allow_nan=False).encode()
        if len(payload) > MAX_BODY:
            raise MalformedMessage(f"control body {len(payload)} bytes > {MAX_BODY}")
        return HEADER.pack(MAGIC, VERSION, int(self.type), self.txid, len(payload)) + payload

    @classmethod
    def decode(cls, data: bytes) -> "ControlMessage":
        """Decode exactly one message; trailing or missing bytes are an error."""
        data = bytes(data)
        body_len = frame_length(data) - HEADER.size
        if len(data) != HEADER.size + body_len:
            raise MalformedMessage(
                f"control message is {len(data)} bytes, header says {HEADER.size + body_len}"
            )
        _magic, _version, mtype, txid, _len = HEADER.unpack_from(data)
        try:
            ctype = ControlType(mtype)
        except ValueError:
            raise MalformedMessage(f"unknown control message type {mtype}", 3) from None
        try:
            body = json.loads(
                data[HEADER.size :].decode("utf-8"),
                parse_constant=_reject_constant,
                parse_float=_finite_float,
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MalformedMessage(f"control body is not JSON: {exc}", HEADER.size) from None
        if not isinstance(body, dict):
            raise MalformedMessage("control body is not a JSON object", HEADER.size)
        return cls(ctype, txid, body)


def frame_length(data: bytes) -> int:
    """Total length of the message whose header starts ``data`` (needs 12 bytes)."""
    if len(data) < HEADER.size:
        raise MalformedMessage(f"control header needs {HEADER.size} bytes, got {len(data)}")
    magic, version, _t, _x, body_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage(f"bad control magic {magic!r}", 0)
    if version != VERSION:
        raise MalformedMessage(f"unsupported control version {version}", 2)
    if body_len > MAX_BODY:
        raise MalformedMessage(f"control body length {body_len} > {MAX_BODY}", 8)
    return HEADER.size + body_len
