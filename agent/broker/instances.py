"""The instances' side of the service broker: this router's VMs in the broker's directory,
and cancelled leases passed on to their objects (patent Figs. 10 and 12).

The broker (:mod:`agent.broker.role`, on one router) can only lease what it knows runs. Every
router of a run with a broker therefore tells it about its VMs' services:

* a VM that starts a service (provisioned, moved in, upgraded) is **registered**
  (SERVICE_REGISTER ``{"instance": ...}``, router HMAC) with what the directory needs to pick
  it (service address list 162, step 204): the service, the address and port where it
  answers, this router, its capacity (the PROVISION's ``share`` and the VM's CPU, step 208),
  its objects, the formats it converts (for service paths, step 202) and its lifecycle (a
  lease never outlives the instance, step 206);
* a VM that retires, is removed or whose objects moved away is **deregistered**
  (SERVICE_DEREGISTER ``{"instance_id"}``): the broker ends its leases and frees its capacity.

The VM manager reports those events synchronously (:attr:`agent.vm.manager.VmManager.listeners`);
this role records what the broker *should* know and sends it from one background task, so a
broker that is down or slow never delays or fails a VM: the difference is retried at the next
housekeeping.

A leased VM's objects check credentials themselves (Fig. 10, 164; the router gave them the
service key at their start). When a CO cancels a lease the broker pushes LEASE_REVOKE (router
HMAC) here; this role hands the lease ids at once to every running object of that service, so
the lease's next request is refused ``revoked`` well within a second. The role keeps what it
was told until the credentials would have expired, for objects of the service that start later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from packets import ControlMessage, ControlType
from packets.codes import SERVICE_PORT

from agent.broker import wire
from agent.broker.credentials import RevocationList
from agent.broker.errors import BadRequest
from agent.broker.leases import MAX_CPU, MAX_SHARE
from agent.core import fields
from agent.core.peer import PeerError, RouterKeyAuth, peer_call
from agent.core.role import InBand, Role
from agent.vm.role import VmRole

log = logging.getLogger(__name__)

#: One exchange with the broker, seconds: a broker that does not answer holds up nothing else
#: for longer (the next try is at the next housekeeping).
BROKER_TIMEOUT = 2.0
#: A revocation reaches every object of the service within this (the broker's promise: 1 s).
REVOKE_TIMEOUT = 0.8
#: Lease ids one LEASE_REVOKE may carry.
MAX_REVOKED = 1000
#: Seconds between tries while the broker cannot be reached.
RETRY_S = 1.0
#: How long a stopping agent waits for the broker to confirm its deregistrations.
STOP_TIMEOUT = 1.0
#: Passes of one sync over what changed (more waits for the next housekeeping).
SYNC_ROUNDS = 3

Clock = Callable[[], float]


class InstanceError(Exception):
    """A VM that cannot be described to the broker (a name the directory refuses, say)."""


# --- the instance document (pure) ---------------------------------------------------------


def service_address(vm: Any, router_address: str) -> str:
    """Where the VM's service answers: its virtual interface's address; the home address of
    its one object when that object is mobile (its parts have their own addresses); else
    this router's (first) address (a virtual service answers on every address of the router)."""
    if vm.kind == "interface":
        return str(vm.address)
    own = vm.primary_object() if hasattr(vm, "primary_object") else None
    if own is not None and vm.part == "primary" and (vm.at_home or vm.moved):
        return str(own[1]["home_address"])
    names = list(vm.objects) or list(vm.mobile)
    if len(names) == 1 and names[0] in vm.mobile:
        return str(vm.mobile[names[0]]["home_address"])
    return router_address


def object_names(vm: Any) -> list[str]:
    """The names a CO may ask for besides the service: its objects (a mobile one by the
    name it registers under)."""
    names: list[str] = []
    for obj in vm.objects or {o: None for o in vm.mobile}:
        name = str(vm.mobile[obj].get("name", obj)) if obj in vm.mobile else str(obj)
        if name not in names:
            names.append(name)
    return names


def formats(installed: str) -> tuple[str, str]:
    """(consumes, produces) from the VM's installed manifest; ("", "") when it declares none
    or cannot be read (the instance is then a plain service, not a path hop)."""
    from agent.vm.errors import ManifestError
    from agent.vm.manifest import MANIFEST_FILE, Manifest

    if not installed:
        return "", ""
    try:
        manifest = Manifest.from_bytes((Path(installed) / MANIFEST_FILE).read_bytes())
    except (OSError, ManifestError) as exc:
        log.warning("no formats for %s: %s", installed, exc)
        return "", ""
    return manifest.consumes, manifest.produces


def instance_doc(vm: Any, router: str, instance_id: str, router_address: str,
                 now: float, network: str = "", gateway: bool = False) -> dict[str, Any]:
    """The SERVICE_REGISTER ``instance`` of ``vm`` (see
    :meth:`agent.broker.directory.Instance.from_dict`), its uptime at wall-clock ``now``.
    Checked here with the broker's own field rules, so a VM the broker would refuse is an
    :class:`InstanceError` on this router, not a refusal retried for ever."""
    consumes, produces = formats(vm.installed)
    max_s = vm.policy.get("max_duration_s")
    since = vm.running_since if vm.running_since is not None else now
    doc = {
        "service": vm.service,
        "instance_id": instance_id,
        "address": service_address(vm, router_address),
        "port": int(vm.port or SERVICE_PORT),
        "router": router,
        "share": float(vm.share),
        "cpu": min(float(vm.cpu), MAX_CPU),
        "objects": object_names(vm),
        "consumes": consumes,
        "produces": produces,
        "lifecycle": {"max_duration_s": None if max_s is None else float(max_s),
                      "uptime_s": round(max(0.0, now - float(since)), 3)},
        "part": getattr(vm, "part", "primary"),
        # A mobile object's service can grow (duplicates) and shrink: the broker needs to
        # reach its router, not the object's home address (every instance answers there).
        "router_address": router_address if vm.mobile else "",
        "network": network if vm.mobile else "",
        "gateway": bool(gateway and vm.mobile),
        "object_addresses": {str(c["name"]): str(c["home_address"])
                             for obj, c in vm.mobile.items() if obj in getattr(vm, "at_home", ())},
    }
    from agent.broker.directory import Instance

    try:
        Instance.from_dict(doc, now)
    except BadRequest as exc:
        raise InstanceError(f"VM {vm.name}: {exc.detail}") from None
    return doc


def revocations_by_service(body: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A LEASE_REVOKE body, every field checked: service -> [{"lease_id", "until"}]."""
    wire.only_keys(body, {"revoked"}, "LEASE_REVOKE")
    rows = body.get("revoked")
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_REVOKED:
        raise BadRequest(f"revoked must be a list of 1 to {MAX_REVOKED} leases")
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        row = wire.as_mapping(row, "revoked lease")
        wire.only_keys(row, {"lease_id", "until", "service"}, "revoked lease")
        service = wire.name(row, "service", "revoked lease")
        out.setdefault(service, []).append({
            "lease_id": wire.field(fields.token, row.get("lease_id"), "revoked lease.lease_id"),
            "until": wire.number(row, "until", "revoked lease", ge=0)})
    return out


# --- the role -----------------------------------------------------------------------------


class ServiceInstancesRole(Role):
    """Registers this router's VMs with the broker and passes revocations to their objects."""

    name = "service-instances"

    @classmethod
    def wanted(cls, config: Any) -> bool:
        return config.broker is not None

    def __init__(self, agent: Any, clock: Clock = time.time) -> None:
        super().__init__(agent)
        assert self.config.broker is not None
        self.broker_address = self.config.broker.address
        key = bytes.fromhex(self.config.router_key) if self.config.router_key else None
        self.router_key = key
        self.router_auth = RouterKeyAuth.of(self.config)
        self.router_address = self.config.interfaces[0].address
        first = self.config.interfaces[0]
        self.network = str(ipaddress.ip_interface(f"{first.address}/{first.prefix}").network)
        self._clock = clock
        self.vms: Any = None  # agent.vm.manager.VmManager, once started
        #: What the broker should know: instance id -> VM (its doc is built when sent).
        self.desired: dict[str, Any] = {}
        #: What the broker acknowledged: instance id -> service.
        self.registered: dict[str, str] = {}
        #: Instances to (re-)register although registered (a VM upgraded or changed).
        self._stale: set[str] = set()
        #: Cancelled leases per service, kept for objects that start later.
        self.revocations: dict[str, RevocationList] = {}
        self.stats = {"registered": 0, "deregistered": 0, "failures": 0, "refused": 0,
                      "revocations_in": 0, "revocations_forwarded": 0, "forward_failures": 0}
        self.last_error = ""
        self._task: asyncio.Task | None = None
        self._next_try = 0.0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        vm_role = self.agent.role(VmRole)
        self.vms = vm_role.manager if vm_role is not None else None
        if self.vms is not None:
            self.vms.listeners.append(self.on_vm_event)

    async def stop(self) -> None:
        """Leave the directory (the VMs stop after this role) and stop listening."""
        if self.vms is not None and self.on_vm_event in self.vms.listeners:
            self.vms.listeners.remove(self.on_vm_event)
        for task in [self._task, *self._tasks]:
            if task is not None:
                task.cancel()
        if self.registered:
            try:
                await asyncio.wait_for(asyncio.gather(
                    *(self._deregister(iid) for iid in list(self.registered)),
                    return_exceptions=True), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("broker did not confirm %d deregistration(s) at shutdown",
                            len(self.registered))

    # --- events from the VM manager ------------------------------------------------------

    def on_vm_event(self, event: str, vm: Any) -> None:
        """A VM started a service (or changed) or went: record it, send it in the background."""
        iid = self.vms.instance_id(vm)
        if event == "started" and not getattr(vm, "ready", True):
            return  # a duplicate or secondary not registered with its home agent yet
        if event == "started":
            self.desired[iid] = vm
            self._stale.add(iid)
            held = self.revocations.get(vm.service)
            if vm.leased and held is not None and len(held):
                self._spawn(self._forward(vm.service, held.as_dict()["revoked"], [vm]))
        elif event == "removed":
            self.desired.pop(iid, None)
            self._stale.discard(iid)
        self._next_try = 0.0
        self._kick()

    def housekeeping(self) -> None:
        now = self._clock()
        for held in self.revocations.values():
            held.prune(now)
        if self.pending and now >= self._next_try:
            self._kick()

    @property
    def pending(self) -> bool:
        """Whether the broker's view differs from this router's."""
        return bool(self._stale or set(self.registered) - set(self.desired)
                    or set(self.desired) - set(self.registered))

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            loop = getattr(self.agent, "loop", None) or asyncio.get_running_loop()
            self._task = loop.create_task(self.sync())

    async def sync(self) -> None:
        """Send the broker the difference: deregistrations first (their capacity is gone),
        then registrations. Stops at the first failure; housekeeping tries again."""
        try:
            for _round in range(SYNC_ROUNDS):  # events that arrive meanwhile, in this task
                if not self.pending:
                    break
                for iid in [i for i in self.registered if i not in self.desired]:
                    await self._deregister(iid)
                for iid in [i for i in self.desired if i not in self.registered or i in self._stale]:
                    vm = self.desired.get(iid)
                    if vm is not None:
                        await self._register(iid, vm)
        except PeerError as exc:
            self.stats["failures"] += 1
            if str(exc) != self.last_error:
                log.warning("broker at %s: %s (retrying)", self.broker_address, exc)
            self.last_error = str(exc)
            self._next_try = self._clock() + RETRY_S
        else:
            self.last_error = ""

    async def _register(self, iid: str, vm: Any) -> None:
        self._stale.discard(iid)
        try:
            doc = instance_doc(vm, self.config.name, iid, self.router_address, self._clock(),
                               self.network, "foreign" in self.config.roles)
        except InstanceError as exc:
            self.stats["refused"] += 1
            log.error("not registering %s with the broker: %s", iid, exc)
            self.desired.pop(iid, None)  # it cannot become valid by waiting
            return
        try:
            await peer_call(self.broker_address, ControlType.SERVICE_REGISTER, {"instance": doc},
                            key=self.router_key, timeout=BROKER_TIMEOUT)
        except PeerError:
            self._stale.add(iid)
            raise
        # Removed or changed while on the wire: the next sync deregisters or updates it.
        self.registered[iid] = vm.service
        self.stats["registered"] += 1
        log.info("registered %s (%s at %s:%s) with the broker", iid, vm.service, doc["address"],
                 doc["port"])

    async def _deregister(self, iid: str) -> None:
        await peer_call(self.broker_address, ControlType.SERVICE_DEREGISTER, {"instance_id": iid},
                        key=self.router_key, timeout=BROKER_TIMEOUT)
        self.registered.pop(iid, None)
        self.stats["deregistered"] += 1
        log.info("deregistered %s from the broker", iid)

    # --- revocations ---------------------------------------------------------------------

    def in_band(self) -> dict[ControlType, InBand]:
        return {ControlType.LEASE_REVOKE: InBand(self.on_revoke, self.router_auth)}

    async def on_revoke(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        """The broker cancelled leases of services running here: tell their objects now."""
        by_service = revocations_by_service(body)
        forwarded = 0
        for service, rows in by_service.items():
            self.stats["revocations_in"] += len(rows)
            held = self.revocations.setdefault(service, RevocationList())
            for row in rows:
                try:
                    held.revoke(row["lease_id"], row["until"])
                except OverflowError:
                    log.warning("revocations of %s: list full", service)
            forwarded += await self._forward(service, rows, self._leased_vms(service))
        return {"ok": True, "forwarded": forwarded}

    def _leased_vms(self, service: str) -> list[Any]:
        if self.vms is None:
            return []
        return [vm for vm in self.vms.vms.values() if vm.service == service and vm.leased]

    async def _forward(self, service: str, rows: list[dict[str, Any]], vms: Iterable[Any]) -> int:
        """Give ``rows`` to every object process of ``vms``, side by side, each bounded by
        :data:`REVOKE_TIMEOUT`; return to how many it was given."""
        processes = [p for vm in vms for p in list(vm.objects.values())]
        results = await asyncio.gather(*(p.revoke(rows, timeout=REVOKE_TIMEOUT) for p in processes),
                                       return_exceptions=True)
        done = 0
        for process, result in zip(processes, results):
            if isinstance(result, BaseException):
                self.stats["forward_failures"] += 1
                log.warning("revocation of %d %s lease(s) not given to %s: %s", len(rows),
                            service, getattr(process, "name", "?"), result)
            else:
                done += 1
        self.stats["revocations_forwarded"] += done
        return done

    def _spawn(self, coro: Any) -> None:
        loop = getattr(self.agent, "loop", None) or asyncio.get_running_loop()
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- control commands ----------------------------------------------------------------

    def cmd_instances(self) -> dict[str, Any]:
        """What this router told the broker, and what it still has to."""
        return {"broker": self.broker_address, "registered": dict(sorted(self.registered.items())),
                "desired": sorted(self.desired), "pending": self.pending,
                "last_error": self.last_error, "stats": dict(self.stats)}

    def status(self) -> dict[str, Any]:
        return {"service_instances": {"registered": len(self.registered),
                                      "pending": self.pending, "last_error": self.last_error}}
