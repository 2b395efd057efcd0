"""Exception types of the ``topologies`` package.

Kept in a module of their own, free of Mininet imports, so the pure parts of the
package (address plan, routing) and their unit tests can raise and catch them without
root and without Mininet.
"""

from __future__ import annotations

__all__ = [
    "TopologyError",
    "TopologyParamError",
    "AddressPlanError",
    "RoutingError",
    "RouteInstallError",
    "DaemonError",
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
