"""Run-scoped names for what a MOAT network creates in the root network namespace.

Why: the root namespace is shared by every network on the machine. A bridge named ``s16``
(the topology's name for network 16's switch) or a bridge port ``s16-eth1`` can exist only
once, so a second network collided with the first, and worse, a failed second start that
removed "its" names removed the first network's bridges. So every name a run creates there
carries a short per-run *tag*, and the topology's names (``s16``, ``r18a-eth0``) stay what
tests, experiments and the docs use:

* the tag is ``m`` and four hex digits (``m3f9c``): unique among the runs of the machine
  (reserved atomically by :meth:`topologies.run.Run.reserve_tag`) and among the interfaces
  that exist (no interface may start with ``<tag>-``);
* network 16's bridge is ``<tag>-s16`` (``m3f9c-s16``), its port ``k`` is ``<tag>-s16-k``
  (``m3f9c-s16-1``): at most 14 characters for network 254 and port 999, within IFNAMSIZ;
* the interfaces inside a node's namespace keep their names (``r18a-eth0``): Mininet makes
  each veth pair from inside the first node's namespace with the peer created directly in
  the other end's namespace (``ip link add ... netns``), so a router's or host's end never
  exists in the root namespace, and two networks' ``r18a-eth0`` live in different
  namespaces.

The functions here are pure (an injected random source and interface list), so the unit
tests check lengths, uniqueness and refusal without root.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable

from topologies.addressing import MAX_IFNAME
from topologies.errors import TopologyError

__all__ = [
    "NamingError",
    "TAG_PATTERN",
    "bridge_name",
    "choose_tag",
    "is_tag",
    "port_name",
    "random_tag",
    "tag_in_use",
]

#: ``m`` and four lowercase hex digits.
TAG_PATTERN = re.compile(r"^m[0-9a-f]{4}$")
#: How many random tags :func:`choose_tag` tries before it gives up.
TAG_ATTEMPTS = 64


class NamingError(TopologyError):
    """A run-scoped name that cannot be made (bad tag, too long, no free tag)."""


def is_tag(text: str) -> bool:
    return bool(TAG_PATTERN.match(text))


def random_tag(token_hex: Callable[[int], str] | None = None) -> str:
    """A fresh tag (not yet checked against anything)."""
    return "m" + (token_hex or secrets.token_hex)(2)


def _check(name: str) -> str:
    if not 1 <= len(name) <= MAX_IFNAME:
        raise NamingError(f"interface name {name!r} is longer than {MAX_IFNAME} characters")
    return name


def bridge_name(tag: str, switch: str) -> str:
    """The kernel name of the topology's switch ``switch`` (``s16``) in run ``tag``."""
    if not is_tag(tag):
        raise NamingError(f"bad run tag {tag!r} (want 'm' and four hex digits)")
    if not switch or not switch.isalnum():
        raise NamingError(f"bad switch name {switch!r}")
    return _check(f"{tag}-{switch}")


def port_name(bridge: str, port: int) -> str:
    """The name of ``bridge``'s port number ``port`` (the switch's end of a LAN link)."""
    if isinstance(port, bool) or not isinstance(port, int) or port < 0:
        raise NamingError(f"bad port number {port!r}")
    return _check(f"{bridge}-{port}")


def tag_in_use(tag: str, interfaces: Iterable[str]) -> bool:
    """Whether an existing interface already carries ``tag`` (a leftover, another run)."""
    prefix = f"{tag}-"
    return any(name == tag or name.startswith(prefix) for name in interfaces)


def choose_tag(interfaces: Iterable[str], taken: Callable[[str], bool] = lambda _t: False,
               token_hex: Callable[[int], str] | None = None,
               attempts: int = TAG_ATTEMPTS) -> str:
    """A tag no existing interface carries and ``taken(tag)`` does not refuse (the run
    root's reservation: ``taken`` reserves it and returns False, or returns True when
    another run holds it). Raises :class:`NamingError` after ``attempts`` tries."""
    existing = list(interfaces)
    for _ in range(attempts):
        tag = random_tag(token_hex)
        if tag_in_use(tag, existing):
            continue
        if taken(tag):
            continue
        return tag
    raise NamingError(f"no free run tag after {attempts} tries "
                      f"({len(existing)} interfaces exist; run `moat clean`?)")
