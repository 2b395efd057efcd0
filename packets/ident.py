"""Registration Identification: NTP timestamps and the replay check (RFC 5944 §5.7).

The 64-bit Identification of a Registration Request is, with timestamp replay protection, an
NTP-format timestamp: 32 bits of seconds since 1900-01-01 and 32 bits of fraction. The home
agent accepts a request only if its timestamp is close enough to the agent's clock and strictly
newer than the last one it accepted from that object; otherwise it answers 133. The check is a
pure function so agents and tests share exactly one rule.
"""

from __future__ import annotations

import time

#: Seconds between the NTP epoch (1900) and the Unix epoch (1970).
NTP_UNIX_OFFSET = 2_208_988_800
#: Default acceptance window around the home agent's clock (RFC 5944 suggests 7 s).
DEFAULT_REPLAY_WINDOW = 7.0


def unix_to_ntp(unix_seconds: float) -> int:
    """Encode a Unix time as a 64-bit NTP timestamp."""
    seconds = int(unix_seconds)
    fraction = int((unix_seconds - seconds) * (1 << 32)) & 0xFFFFFFFF
    return (((seconds + NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32) | fraction


def ntp_to_unix(ntp: int) -> float:
    """Decode a 64-bit NTP timestamp to Unix seconds."""
    seconds = (ntp >> 32) - NTP_UNIX_OFFSET
    return seconds + (ntp & 0xFFFFFFFF) / (1 << 32)


def new_identification(clock: float | None = None, last: int | None = None) -> int:
    """An Identification for a new request: now, and strictly above ``last`` if given.

    Two requests in the same clock tick must still differ, so the result is bumped past
    ``last`` when the clock has not advanced.
    """
    ident = unix_to_ntp(time.time() if clock is None else clock)
    if last is not None and ident <= last:
        ident = last + 1
    return ident & 0xFFFF_FFFF_FFFF_FFFF


def replay_ok(
    identification: int,
    now: float,
    last_accepted: int | None,
    window: float = DEFAULT_REPLAY_WINDOW,
) -> bool:
    """True if a request with this Identification may be accepted.

    It must lie within ``window`` seconds of ``now`` (the home agent's Unix clock) and be
    strictly newer than ``last_accepted`` (the last Identification accepted for this object,
    or None if there was none).
    """
    if abs(ntp_to_unix(identification) - now) > window:
        return False
    return last_accepted is None or identification > last_accepted
