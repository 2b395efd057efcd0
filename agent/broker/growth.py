"""The broker's side of growing a service (patent Fig. 12, step 208 → 210-222 → 230).

When admission raises :class:`~agent.broker.errors.NeedsGrowth`, the broker asks the router of
the service's primary instance to place a duplicate (SERVICE_GROW, router HMAC): that router
acts for the mobile object, finds room, negotiates it and starts the duplicate
(:mod:`agent.distribution.role`), and answers with the new instance, which the broker adds to
its directory before it asks admission again. One growth per service at a time: requests that
arrive meanwhile wait for it and then find the new room, instead of each placing a duplicate.

When a duplicate's last lease ends, the broker tells its router (INSTANCE_RELEASE): it stops
the duplicate, frees its resources, and its deregistration deletes its binding at the HOA.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from packets import ControlType

from agent.broker.broker import Broker
from agent.broker.directory import Instance
from agent.broker.errors import LeaseDenied
from agent.core.peer import PeerError, PeerRefused, peer_call

log = logging.getLogger(__name__)

#: How long the primary's router may take to place a duplicate (query, reserve, fetch and
#: verify from the remote site, start, register through an FOA).
GROW_TIMEOUT_S = 30.0
#: How long a release may take at the duplicate's router.
RELEASE_TIMEOUT_S = 10.0
#: Growths remembered for ``moat show growth`` and the experiment's figures.
MAX_HISTORY = 200

Call = Callable[..., Any]


class Growth:
    """Grows services on :class:`NeedsGrowth` and releases idle duplicates."""

    def __init__(self, broker: Broker, key: bytes | None, call: Call = peer_call,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.key = key
        self._call = call
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self.history: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task] = set()

    def lock(self, service: str) -> asyncio.Lock:
        return self._locks.setdefault(service, asyncio.Lock())

    async def grow(self, primary: Instance, share: float, cpu: float, target: str,
                   co_address: str | None) -> Instance:
        """Ask ``primary``'s router for a duplicate; register it; return it, or raise
        LeaseDenied(no_capacity) saying why there is none."""
        started = self._clock()
        body = {"service": primary.service, "instance_id": primary.instance_id,
                "share": share, "cpu": cpu, "target": target, "co_address": co_address or ""}
        record: dict[str, Any] = {"at": time.time(), "service": primary.service,
                                  "from": primary.instance_id, "share": share, "cpu": cpu}
        try:
            answer = await self._call(primary.router_address, ControlType.SERVICE_GROW, body,
                                      key=self.key, timeout=GROW_TIMEOUT_S)
            self.broker.register_from(answer.get("instance"))
            if answer.get("primary") is not None:  # it gave a part away: it offers less
                self.broker.register_from(answer["primary"])
            instance = self.broker.directory.get(str(answer["instance"]["instance_id"]))
            assert instance is not None
        except PeerRefused as exc:
            self._remember(record, started, error=exc.reason)
            raise LeaseDenied("no_capacity", f"{primary.service} is full and could not grow: "
                                             f"{exc.reason}") from None
        except (PeerError, LeaseDenied, KeyError, TypeError, ValueError) as exc:
            self._remember(record, started, error=str(exc))
            raise LeaseDenied("no_capacity", f"{primary.service} is full and could not grow: "
                                             f"{exc}") from None
        self.broker.stats["grown"] += 1
        self._remember(record, started, instance=instance.instance_id,
                       router=instance.router, tried=answer.get("tried", []),
                       steps=answer.get("steps", []))
        log.info("%s grew: duplicate %s on %s", primary.service, instance.instance_id,
                 instance.router)
        return instance

    def _remember(self, record: dict[str, Any], started: float, **more: Any) -> None:
        record.update(more, ms=round((self._clock() - started) * 1000, 1))
        self.history.append(record)
        del self.history[:-MAX_HISTORY]

    def push_releases(self) -> list[asyncio.Task]:
        """Tell the routers of duplicates left without a lease to release them."""
        tasks = []
        for row in self.broker.take_releases():
            task = asyncio.get_running_loop().create_task(self._release(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            tasks.append(task)
        return tasks

    async def _release(self, row: dict[str, Any]) -> None:
        try:
            await self._call(row["router_address"], ControlType.INSTANCE_RELEASE,
                             {"instance_id": row["instance_id"]}, key=self.key,
                             timeout=RELEASE_TIMEOUT_S)
            self.broker.stats["release_sent"] += 1
        except PeerError as exc:
            # Its router is gone or refuses: the instance is out of the directory already,
            # and its binding runs out with its lifetime.
            self.broker.stats["release_failed"] += 1
            log.warning("release of %s at %s failed: %s", row["instance_id"],
                        row["router_address"], exc)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
