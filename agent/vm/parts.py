"""The parts of a service whose mobile object has a mobile network prefix (NEMO, RFC 5177):
the registration configuration each part answers and registers with. A VM runs its parts
beside the object with these (:mod:`agent.vm.manager`); the object's router decides on their
registrations when they run elsewhere (:mod:`agent.distribution.nested`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from agent.core.config import Credential, ObjectConfig

#: SPIs of the parts' Mobile-Home credentials: this plus the part's index.
PART_SPI_BASE = 0x10000
#: Parts of one object (its mobile network prefix has at most this many addresses).
MAX_PARTS = 16


def part_credential(primary: ObjectConfig, part: str, index: int) -> Credential:
    """The Mobile-Home credential of part ``part``: derived from the object's own, so the
    object's router (its nested home agent) and only who holds the object's key can make it."""
    key = hmac.new(primary.mobile_home.key, b"moat part " + part.encode(), hashlib.sha256).digest()
    return Credential(PART_SPI_BASE + index, key)


def part_configs(primary: ObjectConfig, parts: list[str]) -> dict[str, ObjectConfig]:
    """The registration configuration of each part of ``primary``'s service: an address of its
    mobile network prefix (in order), the object's home address as home agent, its own
    Mobile-Home credential, the object's Mobile-Foreign credential (the FOAs know it)."""
    if not primary.network_prefix:
        raise ValueError(f"{primary.name} has no mobile network prefix for its parts")
    addresses = list(ipaddress.IPv4Network(primary.network_prefix))
    if len(parts) > min(len(addresses), MAX_PARTS):
        raise ValueError(f"{primary.name}'s prefix {primary.network_prefix} has room for "
                         f"{len(addresses)} parts, not {len(parts)}")
    out = {}
    for index, part in enumerate(parts):
        user, _, domain = primary.nai.partition("@")
        out[part] = ObjectConfig(
            name=part, home_address=str(addresses[index]), home_agent=primary.home_address,
            nai=f"{part}.{user}@{domain}" if domain else f"{part}.{user}",
            mobile_home=part_credential(primary, part, index),
            mobile_foreign=primary.mobile_foreign, lifetime=primary.lifetime,
            part="secondary", part_id=index + 1)
    return out
