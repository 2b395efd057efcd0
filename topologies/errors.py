"""Exception types of the ``topologies`` package.

Kept in a module of their own, free of Mininet imports, so the pure parts of the
package (address plan, routing) and their unit tests can raise and catch them without
root and without Mininet.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "TopologyError",
    "TopologyParamError",
    "AddressPlanError",
    "RoutingError",
    "RouteInstallError",
    "DaemonError",
    "UnknownName",
    "ProbeError",
]


class TopologyError(Exception):
    """Base class of every error this package raises on purpose."""


class TopologyParamError(TopologyError, ValueError):
    """A topology parameter is out of range or of the wrong type.

    Also a ``ValueError`` so callers that validate user input generically still catch it.
    """


class AddressPlanError(TopologyError):
    """An address or name breaks the address plan (duplicate, outside its subnet, too long)."""


class RoutingError(TopologyError):
    """Static routes cannot be computed: inconsistent input or a partitioned topology."""


class RouteInstallError(TopologyError):
    """A node refused a route or a sysctl while being configured."""


class DaemonError(TopologyError):
    """A node's managed daemon could not be started (or was started twice)."""


class UnknownName(TopologyError, LookupError):
    """A name given to act on (a router, object, VM, node or run) that the run does not have.

    Raised before anything is sent, so the user reads which names exist instead of a missing
    file or socket. ``kind`` is what was looked for, ``name`` what was given, ``known`` the
    names that would have been accepted, ``where`` what was searched (``run 0102-ab12``).
    """

    def __init__(self, kind: str, name: str, known: Iterable[str], where: str) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        self.where = where
        listed = ", ".join(self.known) if self.known else "none"
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        super().__init__(f"{name} is not {article} {kind} of {where} ({kind}s: {listed})")


class ProbeError(TopologyError):
    """A tool run inside a node (``python -m nodetools...``) failed or timed out."""
