"""The distribution role: a router grows a service it runs, or hosts and releases a duplicate
(patent Fig. 12, steps 210-230). Runs on every router of a run with a broker and VMs.

On the primary's router, acting for the mobile object (SERVICE_GROW from the broker):

1. **discover** (210): ask every router of the run for its room (VM_NEGOTIATE ``query``,
   router HMAC; answered VM_OFFER), side by side and bounded in time;
2. **place**: keep routers where a duplicate may go and that have the VM's CPU and memory
   free (:func:`agent.distribution.capacity.placeable`), in the README's order
   (:func:`agent.distribution.capacity.rank`: hops from the CO's network, then the object's
   traffic from that network through the home network, then free CPU);
3. **negotiate** (212): reserve the room at the first candidate (``reserve``); a refusal
   means the next one;
4. **all or part** (216): :func:`agent.distribution.decide.all_or_part`;
5. **move all** (222): the object's checkpoint (taken while it serves) goes to the target
   with the service's VM description (``start``); the target fetches and verifies the
   service from the remote site itself (Fig. 5: dependencies resolved, 214), starts the
   duplicate from the checkpoint, and the duplicate registers through its FOA with ``S`` and
   the object-part NVSE ``duplicate``: its FOA gives it its own care-of address and name, the
   HOA a second binding, and the HOA bicasts. The primary registers with ``S`` from then on,
   so its renewals keep the duplicate's binding.

On any router, for the broker: INSTANCE_RELEASE stops a duplicate that holds no lease: its
objects stop, its cgroups and files go, and its deregistration deletes its binding.

Every failure leaves the service as it was (the primary serves, the CO's other leases hold)
and is listed in ``moat show errors`` on the router that saw it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from typing import Any

from packets import ControlMessage, ControlType

from agent.broker import wire
from agent.broker.errors import BadRequest
from agent.core import fields
from agent.core.errors import ControlError
from agent.core.peer import RouterKeyAuth, peer_call
from agent.core.role import InBand, Periodic, Role
from agent.distribution.capacity import NoRoom, Offer, Reservations, Room
from agent.distribution.grow import RESERVE_TIMEOUT_S, GrowRefused, PrimarySide
from agent.distribution.parts import PartMover
from agent.distribution.traffic import TrafficRule, TrafficWatch
from agent.vm.role import VmRole

log = logging.getLogger(__name__)

__all__ = ["DistributionRole", "GrowRefused"]

ACTIONS = ("query", "reserve", "release", "start", "restore", "cancel", "return")
#: How often the primaries' request counters are sampled for the traffic rule, seconds.
TRAFFIC_PERIOD_S = 1.0


class DistributionRole(PrimarySide, Role):
    """Grows services from their primary, hosts duplicates under reservations, releases them."""

    name = "distribution"

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.broker is not None and config.vm is not None

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        cfg = self.config
        assert cfg.broker is not None
        key = bytes.fromhex(cfg.router_key) if cfg.router_key else None
        self.key = key
        self.auth = RouterKeyAuth.of(cfg)
        #: The routers' public keys by address: a VM's keys and a checkpoint sent to one are
        #: sealed for it (agent.core.sealing).
        self.seal_keys = cfg.seal_keys()
        self.routers = dict(cfg.broker.routers)
        self.hops = cfg.broker.network_hops
        self.reservations = Reservations()
        self.address = cfg.interfaces[0].address
        first = cfg.interfaces[0]
        self.network = str(ipaddress.ip_interface(f"{first.address}/{first.prefix}").network)
        self._subnets = [ipaddress.ip_interface(f"{i.address}/{i.prefix}").network
                         for i in cfg.interfaces]
        self.parts = PartMover(lambda: self.vm, self._hosting, key, self.address,
                               seal_keys=self.seal_keys, run_dir=cfg.run_dir, router=cfg.name)
        self.rule = TrafficRule()
        self.watches: dict[str, TrafficWatch] = {}
        #: Duplicates placed by the traffic rule (for ``room`` and the experiment).
        self.placements: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task] = set()
        self.stats = {"grown": 0, "grow_refused": 0, "duplicates_hosted": 0, "released": 0,
                      "parts_moved": 0,
                      "queries": 0, "reservations_refused": 0}

    @property
    def vm(self) -> Any:
        role = self.agent.role(VmRole)
        if role is None or role.manager is None:
            raise ControlError(f"{self.config.name} runs no virtual machines")
        return role.manager

    def in_band(self) -> dict[ControlType, InBand]:
        return {
            ControlType.VM_NEGOTIATE: InBand(self.on_negotiate, self.auth,
                                             answer=ControlType.VM_OFFER),
            ControlType.SERVICE_GROW: InBand(self.on_grow, self.auth),
            ControlType.INSTANCE_RELEASE: InBand(self.on_release, self.auth),
        }

    async def start(self) -> None:
        role = self.agent.role(VmRole)
        if role is not None and role.manager is not None:
            role.manager.listeners.append(self._on_vm_event)
        # The parts' home agent again for objects whose parts run elsewhere (issue 13).
        await self.parts.resume()

    async def stop(self) -> None:
        await self.parts.close()

    def _on_vm_event(self, event: str, vm: Any) -> None:
        if event == "removed" and vm.name in self.parts.nested:
            task = self.agent.loop.create_task(self.parts.forget(vm.name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _hosting(self) -> Any:
        from agent.hosting.objects import HostingRole

        return self.agent.require(HostingRole)

    def housekeeping(self) -> None:
        for gone in self.reservations.expire():
            log.info("reservation %s for %s ran out unused", gone.reservation_id, gone.service)
        self.parts.housekeeping()

    def periodic(self) -> list[Periodic]:
        return [Periodic("traffic", TRAFFIC_PERIOD_S, self.watch_traffic)]

    def _vms(self) -> list[Any]:
        role = self.agent.role(VmRole)
        return list(role.manager.vms.values()) if role is not None and role.manager else []

    # --- the target's side: room, reservations, the duplicate's start --------------------

    def room(self) -> Room:
        """What this router's VMs leave free of its VM capacity (reservations not counted)."""
        base = self.vm.baseline
        used = Room.total(Room(vm.cpu, vm.memory_mb) for vm in self.vm.vms.values())
        return Room(float(base.capacity_cpu), int(base.capacity_memory_mb)).minus(used)

    def offer(self, home_address: str) -> dict[str, Any]:
        free = self.room().minus(self.reservations.held())
        hosted = sorted({str(c.get("name")) for vm in self.vm.vms.values()
                         for c in vm.mobile.values()})
        home = any(ipaddress.ip_address(home_address) in net for net in self._subnets)
        foreign, frames = self._foreign_agent()
        visiting = sorted({v.home_address for v in foreign.visitors.snapshot_objects()}) \
            if foreign is not None else []
        return Offer(self.config.name, self.address, self.network, free, tuple(hosted),
                     home, tuple(visiting), frames).as_dict()

    def _foreign_agent(self) -> tuple[Any, bool]:
        """This router's FOA logic (None if it is none) and whether its tunnel can deliver
        by GRE key to a router behind it (the userspace and eBPF ones can: set_delivery)."""
        from agent.mobility.agent_role import ObjectAgentRole

        role = self.agent.role(ObjectAgentRole)
        foreign = getattr(role, "foreign", None)
        dataplane = getattr(role, "dataplane", None)
        backend = getattr(getattr(dataplane, "tunnel", None), "backend", "")
        return foreign, backend in ("userspace", "ebpf")

    def second_care_of(self, home_address: str) -> str:
        """An address of this router that no visitor of ``home_address`` uses as its care-of
        address ("" when it is no FOA or has no such visitor): a duplicate here, beside an
        instance behind this FOA, registers with it (patent: "a second care-of-address")."""
        foreign, _frames = self._foreign_agent()
        if foreign is None:
            return ""
        used = {v.care_of_address for v in foreign.visitors.of(home_address)}
        if not used:
            return ""
        free = [i.address for i in self.config.interfaces if i.address not in used]
        return free[-1] if free else ""

    async def on_negotiate(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        action = body.get("action")
        if action not in ACTIONS:
            raise BadRequest(f"action must be one of {ACTIONS}")
        if action == "query":
            self.stats["queries"] += 1
            home = wire.address(body, "home_address", "query")
            return {"ok": True, **self.offer(home)}
        if action in ("restore", "cancel", "return"):
            return await self._on_move_step(action, body)
        rid = wire.field(fields.token, body.get("reservation"), f"{action}.reservation")
        if action == "reserve":
            room = Room(wire.number(body, "cpu", "reserve", gt=0, le=64),
                        int(wire.integer(body, "memory_mb", "reserve", lo=1, hi=1 << 20)))
            try:
                self.reservations.reserve(rid, wire.name(body, "service", "reserve"), room,
                                          self.room())
            except NoRoom as exc:
                self.stats["reservations_refused"] += 1
                raise ControlError(f"no room on {self.config.name}: {exc}") from None
            return {"ok": True, "reservation": rid, "router": self.config.name}
        if action == "release":
            return {"ok": True, "released": self.reservations.release(rid) is not None}
        return await self._start_instance(rid, body)

    async def _on_move_step(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """``restore``: a secondary started here gets its part's final state and serves;
        ``cancel``: a secondary or duplicate started here goes again; ``return``: a part of a
        primary here comes back from its secondary, with the secondary's state."""
        if action == "return":
            part = wire.field(fields.name, body.get("part"), "return.part")
            vm = next((v for v in self.vm.vms.values() if part in v.moved), None)
            if vm is None:
                raise ControlError(f"no part {part!r} of a VM here runs elsewhere")
            await self.parts.come_back(vm, part, body.get("state"), warm=body.get("warm") is True)
            return {"ok": True, "part": part}
        if action == "restore" and "part" in body:  # a part given back, warm, gets its state
            result = await self.parts.restore(wire.field(fields.name, body.get("part"),
                                                         "restore.part"), body.get("state"))
            return {"ok": True, "replayed": result.get("replayed", 0)}
        vm_name = wire.field(fields.name, body.get("vm"), f"{action}.vm")
        name = wire.field(fields.name, body.get("name"), "restore.name") \
            if action == "restore" else ""
        vm = self.vm.vms.get(vm_name)
        if vm is None or vm.part == "primary":
            raise ControlError(f"no secondary or duplicate VM {body.get('vm')!r} here")
        if action == "cancel":
            await self.vm.remove(vm.name)
            return {"ok": True}
        result = await self._hosting().cmd_object_restore(name, body.get("state"), serve=True)
        return {"ok": True, "replayed": (result or {}).get("replayed", 0)}

    async def _start_instance(self, rid: str, body: dict[str, Any]) -> dict[str, Any]:
        """Start the duplicate or secondary the reservation is for (steps 214, 218, 222);
        undo it all on any failure (the VM manager removes what it started and records
        why). A secondary starts warm: it queues until its part's final state arrives."""
        from agent.hosting.migration import MigrationRole

        if self.reservations.get(rid) is None:
            raise ControlError(f"no reservation {rid} on {self.config.name} (expired?)")
        vm_body, state = body.get("vm"), body.get("state")
        if not isinstance(vm_body, dict) or vm_body.get("part") not in ("duplicate", "secondary"):
            raise BadRequest("start needs a duplicate's or secondary's VM description")
        warm = vm_body["part"] == "secondary" and body.get("warm") is True
        objects, mobile = vm_body.get("objects"), vm_body.get("mobile")
        if not isinstance(objects, list) or len(objects) != 1 or not isinstance(mobile, dict) \
                or set(mobile) != set(objects):
            raise BadRequest("a duplicate or secondary runs exactly one mobile object")
        vm_name = wire.field(fields.name, vm_body.get("vm"), "start.vm.vm")
        (obj,) = wire.field(fields.names, objects, "start.vm.objects")
        config = wire.field(fields.mapping, mobile[obj], f"start.vm.mobile.{obj}")
        # Checked before this router uses them (its FOA's frames, the care-of address): the
        # rest of the VM description is checked by the VM manager before anything starts.
        name = wire.field(fields.name, config.get("name"), f"start.vm.mobile.{obj}.name")
        home = wire.field(fields.home_address, config.get("home_address"),
                          config.get("home_agent"), f"start.vm.mobile.{obj}.home_address",
                          own=self.config.addresses)
        if vm_name in self.vm.vms:
            # Never taken for one this start made: a failure below would remove it.
            raise BadRequest(f"start.vm.vm {vm_name!r}: a VM of that name runs here")
        second = self.second_care_of(home) if vm_body["part"] == "duplicate" else ""
        if second:
            mobile[obj] = dict(mobile[obj], care_of_address=second)
            # Before this router holds the home address (which it then delivers to itself),
            # the instance behind its FOA gets its packets as frames by GRE key.
            await self._frames_for(home, True)
        try:
            await self.vm.provision(vm_body, warm=warm, states={obj: state})
            status = await self.agent.require(MigrationRole).wait_registered(name)
        except Exception as exc:
            if second:
                await self._frames_for(home, False)
            if vm_body["vm"] in self.vm.vms:
                await self.vm.remove(vm_body["vm"])
                self.vm.record_error(vm_body["vm"], vm_body.get("service"), vm_body["part"],
                                     f"did not register: {exc}")
            raise ControlError(f"{vm_body['part']} {name} failed on {self.config.name}: {exc}") \
                from None
        finally:
            self.reservations.release(rid)  # the VM now holds the room (or nothing does)
        vm = self.vm.vms[vm_body["vm"]]
        vm.ready = True
        self.vm.changed(vm)  # now the broker may hear of it (and move leases to it)
        self.stats["duplicates_hosted"] += 1
        return {"ok": True, "instance": self.instance_doc(vm),
                "registration": status.get("registration")}

    async def _frames_for(self, home_address: str, on: bool) -> None:
        """Whether this router's FOA hands visitors of ``home_address`` behind it their
        packets as frames (it holds that address itself: a routed packet would stay here)."""
        from agent.mobility.agent_role import ObjectAgentRole

        role = self.agent.role(ObjectAgentRole)
        dataplane = getattr(role, "dataplane", None)
        if dataplane is None:
            return
        if on:
            dataplane.frames_for.add(home_address)
        else:
            dataplane.frames_for.discard(home_address)
        await role.sync_foreign()

    def instance_doc(self, vm: Any) -> dict[str, Any]:
        """``vm``'s instance as the broker registers it (what SERVICE_REGISTER sends)."""
        from agent.broker.instances import instance_doc

        return instance_doc(vm, self.config.name, self.vm.instance_id(vm), self.address,
                            time.time(), self.network, "foreign" in self.config.roles)

    async def on_release(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        """The broker: this duplicate or secondary holds no lease any more (step 230). A
        secondary first gives its part back to the primary's router, with its state."""
        iid = wire.field(fields.identifier, body.get("instance_id"), "release.instance_id")
        vms = [vm for vm in self.vm.vms.values() if self.vm.instance_id(vm) == iid]
        if not vms:
            return {"ok": True, "released": False}  # gone already: nothing to do
        vm = vms[0]
        if vm.part == "primary":
            raise ControlError(f"{iid} is the service's primary: it is not released")
        started = time.monotonic()
        if vm.part == "secondary":
            await self._give_back(vm)
        await self.vm.remove(vm.name)  # stops it; its deregistration deletes its binding
        for config in vm.mobile.values():  # its home address is gone from here: routed again
            if config.get("care_of_address"):
                await self._frames_for(str(config.get("home_address")), False)
        self.stats["released"] += 1
        log.info("released duplicate %s", iid)
        return {"ok": True, "released": True,
                "ms": round((time.monotonic() - started) * 1000, 1)}

    async def _give_back(self, vm: Any) -> None:
        """The move in reverse, make before break: the part restarts warm beside its object
        (from this state; its address back on that router, so new requests queue there),
        then the secondary deregisters and stops with its final checkpoint, which the part
        at home restores before it replays its queue. Nothing counted here is lost."""
        (obj,) = list(vm.objects) or list(vm.mobile)
        name = str(vm.mobile[obj]["name"])
        try:
            state = await self.vm.call(vm.name, obj, "get_state")
            await self._to_parent(vm, {"action": "return", "part": obj, "state": state,
                                       "warm": True})
            stopped = await self._hosting().cmd_object_stop(name, deregister=True)
            final = stopped.get("state")
            await self._to_parent(vm, {"action": "restore", "part": obj,
                                       "state": final if final is not None else state})
        except Exception as exc:  # noqa: BLE001 - released all the same
            self.vm.record_error(vm.name, vm.service, "release",
                                 f"part {obj} not given back to {vm.parent_router}: {exc}")

    async def _to_parent(self, vm: Any, body: dict[str, Any]) -> dict[str, Any]:
        return await peer_call(vm.parent_router, ControlType.VM_NEGOTIATE, body, key=self.key,
                               timeout=RESERVE_TIMEOUT_S * 5, seal_keys=self.seal_keys)

    # --- control commands ----------------------------------------------------------------

    def cmd_room(self) -> dict[str, Any]:
        """This router's VM room and its reservations, and what the traffic rule did."""
        room = self.room()
        return {"capacity_cpu": self.vm.baseline.capacity_cpu,
                "capacity_memory_mb": self.vm.baseline.capacity_memory_mb,
                "free_cpu": room.cpu, "free_memory_mb": room.memory_mb,
                "reservations": self.reservations.snapshot(), "stats": dict(self.stats),
                "traffic_rule": dict(self.rule.__dict__),
                "traffic": {vm: w.window() for vm, w in self.watches.items()},
                "placements": list(self.placements)}

    def cmd_traffic_rule(self, enabled: bool | None = None, window_s: float | None = None,
                         min_requests: int | None = None, share: float | None = None,
                         cooldown_s: float | None = None) -> dict[str, Any]:
        """Show or change the traffic rule's thresholds on this router."""
        current = dict(self.rule.__dict__)
        for key, value in (("enabled", enabled), ("window_s", window_s),
                           ("min_requests", min_requests), ("share", share),
                           ("cooldown_s", cooldown_s)):
            if value is not None:
                current[key] = value
        try:
            rule = TrafficRule(enabled=bool(current["enabled"]),
                               window_s=float(current["window_s"]),
                               min_requests=int(current["min_requests"]),
                               share=float(current["share"]),
                               cooldown_s=float(current["cooldown_s"]))
        except (TypeError, ValueError) as exc:
            raise ControlError(f"bad traffic rule: {exc}") from None
        if not (rule.window_s > 0 and rule.min_requests >= 1 and 0 < rule.share <= 1
                and rule.cooldown_s >= 0):
            raise ControlError("window_s > 0, min_requests >= 1, 0 < share <= 1, cooldown_s >= 0")
        self.rule = rule
        for watch in self.watches.values():
            watch.rule = rule
        return dict(rule.__dict__)

    def status(self) -> dict[str, Any]:
        """Per primary VM here, its nested home agent's revocations (issue 18): sent,
        retried, acknowledged, given up, refused acknowledgements, pending."""
        return {"nested_revocations": {vm: agent.revocations()
                                       for vm, agent in self.parts.nested.items()}}

    def cmd_nested(self) -> dict[str, Any]:
        """The nested home agents here: per primary VM, its secondaries' bindings."""
        return self.parts.bindings()

    def cmd_room_hold(self, cpu: float, memory_mb: int = 1, seconds: float = 60.0) -> dict:
        """Hold room as if a VM were about to arrive (an operator keeping room free, or an
        experiment filling a router): a reservation that runs out after ``seconds``."""
        rid = f"held-{secrets.token_hex(4)}"
        try:
            self.reservations.reserve(rid, "operator", Room(float(cpu), int(memory_mb)),
                                      self.room(), ttl_s=float(seconds))
        except (NoRoom, TypeError, ValueError) as exc:
            raise ControlError(f"cannot hold room: {exc}") from None
        return {"reservation": rid, "cpu": cpu, "memory_mb": memory_mb, "seconds": seconds}
