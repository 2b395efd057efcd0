"""The state an attack targets, before and after, from the run's control sockets; an agent's
memory from ``/proc``.

A snapshot keeps only what an attack could change and a healthy run does not change by
itself in a few seconds: who holds a binding and where (not its remaining lifetime), the FOAs'
visitors, which router runs which object, the broker's leases, the VMs, the agents heard.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from topologies.client import RunClient

__all__ = ["snapshot", "diff", "rss_kib", "agent_rss", "alive", "log_bytes"]

log = logging.getLogger(__name__)

BINDING_KEYS = ("home_address", "care_of_address", "part", "part_id")
VISITOR_KEYS = ("home_address", "care_of_address", "local_address", "home_agent")


def _project(items: Any, keys: tuple[str, ...]) -> list[tuple]:
    if not isinstance(items, list):
        return []
    return sorted(tuple(str(i.get(k)) for k in keys) for i in items if isinstance(i, dict))


def _safe(client: RunClient, router: str, cmd: str, **args: Any) -> Any:
    try:
        return client.call(router, cmd, timeout=5.0, **args)
    except (AgentError, OSError) as exc:
        return {"error": str(exc)}


def snapshot(client: RunClient, heard: bool = False) -> dict[str, Any]:
    """The targeted state of every router: bindings, visitors, objects, VMs, (broker) leases
    and, with ``heard``, the agents each router has heard (their addresses)."""
    out: dict[str, Any] = {}
    for router in client.routers():
        status = _safe(client, router, "status")
        roles = status.get("roles", []) if isinstance(status, dict) else []
        entry: dict[str, Any] = {
            "objects": sorted(o.get("name") for o in _safe(client, router, "objects") or []
                              if isinstance(o, dict)),
            "vms": sorted(v.get("name") for v in (_safe(client, router, "vm") or [])
                          if isinstance(v, dict)),
        }
        if "home" in roles:
            entry["bindings"] = _project(_safe(client, router, "bindings"), BINDING_KEYS)
        if "foreign" in roles:
            entry["visitors"] = _project(_safe(client, router, "visitors"), VISITOR_KEYS)
        if heard:
            entry["heard"] = sorted(str(a.get("address")) for a in _safe(client, router, "agents") or []
                                    if isinstance(a, dict))
        out[router] = entry
    try:
        out["_leases"] = sorted(str(lease.get("lease_id")) for lease in client.leases())
    except (AgentError, OSError, Exception) as exc:  # noqa: BLE001 - a run without a broker
        out["_leases"] = f"unavailable: {type(exc).__name__}"
    return out


def diff(before: dict[str, Any], after: dict[str, Any], keys: tuple[str, ...] | None = None
         ) -> list[str]:
    """What changed between two snapshots (``router.key``), limited to ``keys`` if given."""
    changes = []
    for router in sorted(set(before) | set(after)):
        b, a = before.get(router), after.get(router)
        if isinstance(b, dict) and isinstance(a, dict):
            for key in sorted(set(b) | set(a)):
                if keys is not None and key not in keys:
                    continue
                if b.get(key) != a.get(key):
                    changes.append(f"{router}.{key}: {b.get(key)} -> {a.get(key)}")
        elif b != a and (keys is None or router.lstrip("_") in keys):
            changes.append(f"{router}: {b} -> {a}")
    return changes


def rss_kib(pid: int) -> int | None:
    """VmRSS of process ``pid`` in KiB, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def agent_rss(client: RunClient, router: str) -> int | None:
    """The memory of ``router``'s agent process (KiB), from its pid in ``status``."""
    status = _safe(client, router, "status")
    pid = status.get("pid") if isinstance(status, dict) else None
    return rss_kib(int(pid)) if pid else None


def alive(client: RunClient) -> dict[str, bool]:
    """Which agents answer ``ping``."""
    out = {}
    for router in client.routers():
        try:
            out[router] = client.call(router, "ping", timeout=5.0) == "pong"
        except (AgentError, OSError):
            out[router] = False
    return out


def log_bytes(client: RunClient, router: str) -> int:
    """The size of ``router``'s agent log: what a flood made it write."""
    total = 0
    for name in (f"{router}.log", f"{router}.out"):
        try:
            total += (client.run.dir / name).stat().st_size
        except OSError:
            pass
    return total
