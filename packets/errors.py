"""The one error type every MOAT decoder raises.

Agents parse bytes that arrive from the network. A decoder that can raise anything
(``IndexError``, ``struct.error``, ``UnicodeDecodeError``...) forces every caller to guess what
to catch, and one missed case kills an agent. So every decoder in ``packets`` converts every
failure into :class:`MalformedMessage`, which carries a human-readable reason.
"""

from __future__ import annotations


class MalformedMessage(ValueError):
    """Bytes that are not a valid MOAT/RFC 5944 message.

    ``reason`` says what was wrong (a length, a field, an extension); ``offset`` is where in the
    input the decoder stopped, when known.
    """

    def __init__(self, reason: str, offset: int | None = None) -> None:
        self.reason = reason
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{reason}{where}")
