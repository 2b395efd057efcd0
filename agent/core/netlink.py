"""Addresses, routes, rules and neighbours of the agent's namespace, without blocking the loop.

PLACEHOLDER API (being replaced by a pyroute2 implementation): the signatures below are the
contract the roles code against.
"""

from __future__ import annotations

import asyncio
import logging

from agent.core.errors import AgentError

log = logging.getLogger(__name__)


class NetlinkError(AgentError):
    """The kernel refused an address, route, rule or neighbour change."""


async def _ip(*argv: str, ok_errors: tuple[str, ...] = ()) -> None:
    proc = await asyncio.create_subprocess_exec("ip", *argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    text = err.decode(errors="replace").strip()
    if proc.returncode != 0 and not any(e in text for e in ok_errors):
        raise NetlinkError(f"ip {' '.join(argv)}: {text}")


async def address_add(address: str, prefixlen: int, ifname: str) -> None:
    """Add ``address/prefixlen`` to ``ifname``; an address already there is not an error."""
    await _ip("addr", "add", f"{address}/{prefixlen}", "dev", ifname, ok_errors=("exists",))


async def address_del(address: str, prefixlen: int, ifname: str) -> None:
    """Remove ``address/prefixlen`` from ``ifname``; an address already gone is not an error."""
    await _ip("addr", "del", f"{address}/{prefixlen}", "dev", ifname,
              ok_errors=("Cannot assign",))


async def route_replace(destination: str, via: str) -> None:
    """Route ``destination`` (``a.b.c.d/len``) through gateway ``via``."""
    await _ip("route", "replace", destination, "via", via)


async def route_del(destination: str) -> None:
    """Remove the route to ``destination``; a missing route is not an error."""
    await _ip("route", "del", destination, ok_errors=("No such process",))
