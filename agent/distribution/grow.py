"""The primary's side of distribution (patent Fig. 12, steps 210-222 and "optimize the path
of the service"): grow a service for the broker's SERVICE_GROW — discover room, rank, reserve,
then start a duplicate or move a part — and place a duplicate near the object's traffic.

A mixin of :class:`agent.distribution.role.DistributionRole`, kept apart so each file holds one
side: the role module is the target's side (room, reservations, starting what is sent) and the
in-band dispatch. It uses the role's ``vm``, ``key``, ``routers``, ``hops``, ``network``,
``parts``, ``rule``, ``watches``, ``placements`` and ``stats``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from packets import ControlMessage, ControlType

from agent.broker import wire
from agent.broker.errors import BadRequest
from agent.broker.leases import LeaseRequest
from agent.core import fields
from agent.core.errors import ControlError
from agent.core.peer import PeerError, PeerRefused, peer_call
from agent.distribution.capacity import Offer, Room, placeable, rank
from agent.distribution.decide import all_or_part
from agent.distribution.parts import PartMoveFailed
from agent.distribution.traffic import TrafficWatch

log = logging.getLogger(__name__)

#: One capacity query, seconds: a router that does not answer in time is not a candidate.
QUERY_TIMEOUT_S = 1.5
#: One reservation, seconds.
RESERVE_TIMEOUT_S = 2.0
#: Starting a duplicate: fetch and verify from the site, start, register through an FOA.
START_TIMEOUT_S = 25.0


class Steps:
    """What one growth did, each step with the milliseconds since it began: the broker's
    ``growth`` record and the ``room`` command show them. Call it with each step's text."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []
        self._started = time.monotonic()

    def __call__(self, what: str) -> None:
        self.done.append((what, round((time.monotonic() - self._started) * 1000, 1)))


class GrowRefused(ControlError):
    """The service could not grow (no room anywhere, every candidate refused, the duplicate
    failed): the broker refuses the lease with this text; the primary serves on."""


class PrimarySide:
    """Growing a service from its primary, and the traffic rule (see the module docstring)."""

    vm: Any
    key: bytes | None
    seal_keys: dict[str, bytes]
    routers: dict[str, str]
    hops: dict[str, dict[str, int]]
    network: str
    parts: Any
    rule: Any
    watches: dict[str, TrafficWatch]
    placements: list[dict[str, Any]]
    stats: dict[str, int]
    config: Any
    agent: Any
    _hosting: Any  # the role's: this router's HostingRole

    # --- the traffic rule (patent: "optimize the path of the service") -----------------------

    async def watch_traffic(self) -> None:
        """Sample each local primary's requests per network; place a duplicate on a network
        the rule (:mod:`agent.distribution.traffic`) finds hot."""
        primaries = {vm.name: vm for vm in self._vms() if vm.part == "primary" and vm.leased
                     and vm.primary_object() is not None and vm.running_since is not None}
        for gone in set(self.watches) - set(primaries):
            del self.watches[gone]
        for vm in primaries.values():
            obj, config = vm.primary_object()
            watch = self.watches.setdefault(vm.name, TrafficWatch(self.rule))
            watch.sample(await self._traffic(vm.name, obj))
            hot = watch.hot_network(self.network, set())
            if hot is None:
                continue
            counts = watch.window()
            watch.fired()
            await self._place_near(vm, obj, config, hot, counts)

    async def _place_near(self, vm: Any, obj: str, config: dict[str, Any], network: str,
                          counts: dict[str, int]) -> None:
        step = Steps()

        need = Room(vm.cpu, vm.memory_mb)
        name = str(config["name"])
        offers = await self._query_all(str(config["home_address"]))
        candidates = [o for o in placeable(offers, name, need, str(config["home_address"]))
                      if o.network == network]
        if not candidates:
            log.info("traffic of %s comes from %s, but no router there can take a duplicate",
                     name, network)
            return
        step(f"most requests come from {network} through the home network: {counts}")
        try:
            answer = await self._place(vm, obj, config, need,
                                       rank(candidates, {}, {network: 1}), step)
        except GrowRefused as exc:
            self.vm.record_error(self.vm.instance_id(vm), vm.service, "traffic", str(exc))
            return
        self.placements.append({"at": time.time(), "object": name, "network": network,
                                "router": answer["router"], "steps": step.done})
        del self.placements[:-100]
        log.info("placed a duplicate of %s on %s near its traffic", name, answer["router"])

    # --- the primary's side: grow ----------------------------------------------------------

    async def on_grow(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.grow(body)
        except GrowRefused as exc:
            self.stats["grow_refused"] += 1
            self.vm.record_error(body.get("instance_id"), body.get("service"), "grow", str(exc))
            raise

    async def grow(self, body: dict[str, Any]) -> dict[str, Any]:
        """Steps 210-222 for the broker's SERVICE_GROW; the new instance's document."""
        iid = wire.field(fields.identifier, body.get("instance_id"), "grow.instance_id")
        target = wire.text(body, "target", "grow", max_len=260)
        LeaseRequest(target, 1.0, 1.0)  # a service or object name, or a goal: else BadRequest
        co_address = wire.address(body, "co_address", "grow", default="")
        step = Steps()

        vm = next((v for v in self.vm.vms.values() if self.vm.instance_id(v) == iid), None)
        if vm is None or vm.part != "primary" or vm.primary_object() is None:
            raise GrowRefused(f"{iid} is not a primary with one mobile object here")
        obj, config = vm.primary_object()
        name, home = str(config["name"]), str(config["home_address"])
        move = all_or_part(target, vm.service, [*vm.objects, *vm.moved])
        if not move.whole:
            return await self._move_part(vm, move.part, iid, home, co_address, step)
        need = Room(vm.cpu, vm.memory_mb)
        offers = await self._query_all(home)
        step(f"asked {len(self.routers)} routers for room, {len(offers)} answered")
        traffic = await self._traffic(vm.name, obj)
        candidates = rank(placeable(offers, name, need, home), self._co_hops(co_address), traffic)
        step(f"candidates: {[o.router for o in candidates]}")
        if not candidates:
            raise GrowRefused(f"no router on a foreign network without {name} has "
                              f"{need.cpu:g} CPU and {need.memory_mb} MiB free")
        return await self._place(vm, obj, config, need, candidates, step)

    async def _move_part(self, vm: Any, part: str, iid: str, home: str, co_address: str,
                         step: "Steps") -> dict[str, Any]:
        """Step 218: ``part`` moves to the best candidate as a secondary object."""
        if part in vm.moved:
            raise GrowRefused(f"part {part!r} already runs as a secondary on {vm.moved[part]}")
        if part not in vm.at_home:
            raise GrowRefused(f"{part!r} is not a part of {vm.service} that can move: its "
                              "object has no mobile network prefix")
        need = Room(vm.cpu, vm.memory_mb)
        offers = await self._query_all(home)
        step(f"asked {len(self.routers)} routers for room for part {part}, "
             f"{len(offers)} answered")
        # Not on the primary's own network (its FOA would deliver the part's address by
        # itself, without the nested tunnel), nor where an instance of the object runs (the
        # object's home address, the part's home agent, is local there).
        name = str(vm.primary_object()[1]["name"])
        taken = {o.network for o in offers if name in o.objects}
        candidates = rank([o for o in placeable(offers, part, need)
                           if o.network != self.network and o.network not in taken],
                          self._co_hops(co_address), {})
        step(f"candidates: {[o.router for o in candidates]}")
        if not candidates:
            raise GrowRefused(f"no router on another foreign network has {need.cpu:g} CPU and "
                              f"{need.memory_mb} MiB free for part {part}")

        async def move(offer: Offer, rid: str) -> dict[str, Any]:
            try:
                return await self.parts.move(vm, part, offer, rid, iid, step)
            except PartMoveFailed as exc:
                await self._release_reservation(offer, rid)
                raise GrowRefused(str(exc)) from None

        answer = await self._first_that_reserves(vm.service, need, candidates, step, move)
        self.stats["parts_moved"] += 1
        # The primary no longer offers the part: the broker learns it with the answer.
        answer["primary"] = self.instance_doc(vm)
        return answer

    async def _reserve(self, offer: Offer, rid: str, service: str, need: Room) -> None:
        await peer_call(offer.address, ControlType.VM_NEGOTIATE,
                        {"action": "reserve", "reservation": rid, "service": service,
                         "cpu": need.cpu, "memory_mb": need.memory_mb},
                        key=self.key, timeout=RESERVE_TIMEOUT_S)

    async def _place(self, vm: Any, obj: str, config: dict[str, Any], need: Room,
                     candidates: list[Offer], step: "Steps") -> dict[str, Any]:
        """Steps 212-222 over ``candidates`` in order: reserve, then start the duplicate."""
        async def duplicate(offer: Offer, rid: str) -> dict[str, Any]:
            return await self._duplicate(vm, obj, config, offer, rid, step)

        answer = await self._first_that_reserves(vm.service, need, candidates, step, duplicate)
        self.stats["grown"] += 1
        return answer

    async def _first_that_reserves(self, service: str, need: Room, candidates: list[Offer],
                                   step: "Steps", start: Any) -> dict[str, Any]:
        """Step 212 over ``candidates`` in order: the first that reserves ``need`` gets the
        new instance (``start(offer, reservation id)``, which raises GrowRefused on failure);
        a refusal means the next candidate."""
        tried: list[dict[str, str]] = []
        for offer in candidates:
            rid = secrets.token_hex(8)
            try:
                await self._reserve(offer, rid, service, need)
            except PeerError as exc:
                tried.append({"router": offer.router, "refused": _why(exc)})
                step(f"{offer.router} refused the reservation")
                continue
            step(f"reserved {need.cpu:g} CPU, {need.memory_mb} MiB on {offer.router}")
            answer = await start(offer, rid)
            tried.append({"router": offer.router, "refused": ""})
            return {"ok": True, "instance": answer["instance"], "router": offer.router,
                    "tried": tried, "steps": step.done}
        raise GrowRefused("every candidate refused: " + "; ".join(
            f"{t['router']}: {t['refused']}" for t in tried))

    async def _duplicate(self, vm: Any, obj: str, config: dict[str, Any], offer: Offer,
                         rid: str, step: Any) -> dict[str, Any]:
        """Step 222 at ``offer``'s router under reservation ``rid``."""
        hosted = self._primary_client(str(config["name"]))
        state = await self.vm.call(vm.name, obj, "get_state")
        step("took the primary's checkpoint (it serves on)")
        # From now on the primary's renewals keep the other bindings (RFC 5944's S).
        if hosted is not None:
            hosted.config.simultaneous = True
        part_id = self.stats["grown"] + 1  # this primary's duplicates, in order
        # Without the mobile network: the parts' addresses go to the primary only.
        dup_config = dict(config, part="duplicate", part_id=part_id, simultaneous=True,
                          network_prefix="")
        vm_body = dict(vm.provision_body(), vm=f"{vm.name}-d{secrets.token_hex(2)}",
                       objects=[obj], mobile={obj: dup_config}, part="duplicate")
        try:
            answer = await peer_call(offer.address, ControlType.VM_NEGOTIATE,
                                     {"action": "start", "reservation": rid, "vm": vm_body,
                                      "state": state}, key=self.key, timeout=START_TIMEOUT_S,
                                     seal_keys=self.seal_keys)
        except PeerError as exc:
            await self._release_reservation(offer, rid)
            raise GrowRefused(f"the duplicate on {offer.router} failed: {_why(exc)}") from None
        step(f"duplicate serves on {offer.router}, registered with S")
        return answer

    async def _release_reservation(self, offer: Offer, rid: str) -> None:
        try:
            await peer_call(offer.address, ControlType.VM_NEGOTIATE,
                            {"action": "release", "reservation": rid}, key=self.key,
                            timeout=RESERVE_TIMEOUT_S)
        except PeerError as exc:  # it runs out by itself
            log.info("reservation %s on %s not released: %s", rid, offer.router, exc)

    def _primary_client(self, name: str) -> Any:
        hosted = self._hosting().objects.get(name)
        return hosted.client if hosted is not None else None

    async def _query_all(self, home_address: str) -> list[Offer]:
        """Every router's offer (this one's too, unasked), side by side; silent or refusing
        routers are not candidates."""
        async def ask(router: str, address: str) -> Offer | None:
            if router == self.config.name:
                return Offer.from_dict(self.offer(home_address))
            try:
                answer = await peer_call(address, ControlType.VM_NEGOTIATE,
                                         {"action": "query", "home_address": home_address},
                                         key=self.key, timeout=QUERY_TIMEOUT_S)
                return Offer.from_dict(answer)
            except (PeerError, BadRequest) as exc:
                log.debug("no offer from %s: %s", router, exc)
                return None

        answers = await asyncio.gather(*(ask(r, a) for r, a in sorted(self.routers.items())))
        return [a for a in answers if a is not None]

    async def _traffic(self, vm_name: str, obj: str) -> dict[str, int]:
        """Requests the object received per source network (its own stats)."""
        try:
            stats = await self.vm.call(vm_name, obj, "stats")
        except Exception as exc:  # noqa: BLE001 - the order then ignores traffic
            log.info("no traffic figures from %s: %s", obj, exc)
            return {}
        by_network = stats.get("by_network") if isinstance(stats, dict) else None
        return {str(k): int(v) for k, v in (by_network or {}).items()
                if isinstance(v, int) and not isinstance(v, bool)}

    def _co_hops(self, co_address: str) -> dict[str, int]:
        """Hops from the CO's network to each router (none known: {})."""
        return dict(self.hops.get(self.config.broker.network_of(co_address), {}))


def _why(exc: PeerError) -> str:
    return exc.reason if isinstance(exc, PeerRefused) else str(exc)
