"""The router's virtual machine (patent Figs. 2-5): provisioning, fetch, verify, run.

A router boots with a baseline (authorized provider keys, a baseline lifecycle policy,
default resources, how to reach the remote site). A PROVISION message — MOAT control protocol,
in band on TCP 4340, normally sent by the remote site — configures one VM and names the
service it is to run. :meth:`VmManager.provision` then follows Fig. 5 step by step:

1. configure the VM: a **virtual interface** (the service answers on one address added to
   one interface, step 66) or a **virtual service** (it answers on every address of the
   router, so losing one interface does not lose it); credentials may only *restrict* the
   baseline (68), the lifecycle policy may restrict or enhance it (70), resources are set (72);
2. fetch the service's manifest and code from the remote site (74-76);
3. resources sufficient for every object of the manifest? (78)
4. credentials: the service's signer is one of the VM's authorized providers? (80-82)
5. lifecycle policy (84), versions (86: the cache keeps archives by hash), load (88: an
   all-or-nothing install), initialise (90: each object in its sandbox — own cgroup with the
   manifest's limits, unprivileged user, private directory).

A refusal at any step is recorded (``moat show errors``), answered to the sender (92-94) and
leaves nothing behind: no address, no files, no process.

Two optional PROVISION terms serve the service broker (Figs. 10 and 12): ``share`` (percent of
the service this VM's instance offers, default 100) is what it registers as its capacity, and
``leased: true`` makes its objects refuse requests without a valid service credential (164).
Whoever tracks the VMs (the broker registration, :mod:`agent.broker.instances`) subscribes to
:attr:`VmManager.listeners`: ``("started", vm)`` when a VM runs a service (provisioned, moved
in, upgraded, or one of its objects left), ``("removed", vm)`` when it goes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from packets.codes import SERVICE_PORT

from agent.core import fields, netlink
from agent.core.errors import AgentError
from agent.vm.errors import ProvisionError
from agent.vm.machine import MAX_SHARE, ObjectHost, SiteAccess, VirtualMachine, VmBaseline

__all__ = ["MAX_SHARE", "ObjectHost", "ProvisionError", "SiteAccess", "VirtualMachine",
           "VmBaseline", "VmListener", "VmManager"]
from agent.vm.fetch import open_session
from agent.vm.provisioning import fetch_verify_install
from agent.vm.session_pool import SessionPool
from agent.vm.shaping import EgressShaper
from agent.vm.upgrade_hold import UpgradeHold
from agent.vm.version_cache import VersionCache

log = logging.getLogger(__name__)

KINDS = ("interface", "service")
#: What a VM may be called: it names directories and cgroups on the router (the pattern
#: :func:`agent.core.fields.name` checks whole).
VM_NAME_RE = re.compile(rf"^{fields.NAME_RE.pattern}$")
RUN_TIMEOUT = 10.0
#: Most CPUs a PROVISION may ask for (the manifest's limit for one object).
MAX_VM_CPU = 1024.0
#: Objects one PROVISION may name (``objects``, ``mobile``).
MAX_OBJECTS = 64
#: How far ahead of this router's clock a migrating VM's ``running_since`` may be, seconds.
MAX_CLOCK_SKEW_S = 3600.0

#: Told of a VM's events: ("started" | "removed", the VM). Must not block; may raise (logged).
VmListener = Callable[[str, "VirtualMachine"], None]
#: The credential key of a service (derived from the run's router key).
ServiceKey = Callable[[str], bytes]


class VmManager:
    """The VM role of the agent: provisioned VMs, their objects, and the errors log."""

    def __init__(self, baseline: VmBaseline, router: str, run_id: str | None,
                 addresses: dict[str, str], cgroups: Any = None, host: ObjectHost | None = None,
                 service_key: ServiceKey | None = None,
                 prefixes: dict[str, int] | None = None) -> None:
        self.baseline = baseline
        self.router = router
        self.run_id = run_id
        self.addresses = addresses  # interface -> address
        #: interface -> its prefix length (24 when not given): a virtual interface's address
        #: must be on that interface's network.
        self.prefixes = dict(prefixes or {})
        self.host = host
        self.vms: dict[str, VirtualMachine] = {}
        self.errors: list[dict[str, Any]] = []
        self.retired: list[dict[str, Any]] = []
        self._cgroups: Any = cgroups
        self._replays: Any = None  # agent.core.msgauth.ReplayCache of PROVISION nonces
        self.shaper = EgressShaper()
        self._next_key = 0
        self._upgrades = 0  # numbers the directories upgrades install into
        #: VM epoch -> the version it rolled back from: not tried again (each try stops the
        #: objects), only a newer one is.
        self._rolled_back: dict[str, str] = {}
        #: Armed (the ``upgrade_hold`` command), the next upgrade waits between its probe and
        #: its fetch: a fault injection point (agent.vm.upgrade_hold).
        self.upgrade_hold = UpgradeHold()
        #: This router's LAN prefixes (its leased objects honour a sibling's credential from
        #: there: a CO on its network reaches only it).
        self.networks: list[str] = []
        #: Without it, a PROVISION asking for a leased service is refused.
        self.service_key = service_key
        self.listeners: list[VmListener] = []
        #: Set by the VM role: objects start with a relay there and outlive the agent
        #: (issue 13); None: they die with it.
        self.relay_dir: Path | None = None
        #: Set by the VM role: the durable record of the VMs (agent.vm.vm_record.VmRecord),
        #: kept at every change, from which a restarted agent rebuilds this table.
        self.record: Any = None
        #: Warm provisioning (issue 14): the kept SFTP session to the site, and the signed
        #: versions already fetched. Either can be turned off (``vm_warm``) to measure the
        #: old path: a new session, and every archive fetched, per provisioning.
        self.pool = SessionPool(open_session)
        self.versions = VersionCache(Path(baseline.storage) / "service-cache")
        self.keep_sessions = True
        self.cache_versions = True
        #: VM name -> {moment: wall time} of its last provisioning, beyond its steps: when
        #: the PROVISION arrived, the record was written, the interface came up, the objects
        #: started, the listeners were told (``vm_warm`` shows them; the benchmark reads them).
        self.timings: dict[str, dict[str, float]] = {}

    def instance_id(self, vm: VirtualMachine) -> str:
        """The VM's service instance as the broker knows it (and its credentials name)."""
        return f"{self.router}/{vm.name}@{vm.epoch}"

    def changed(self, vm: VirtualMachine) -> None:
        """The VM runs a service still, but differently (a part left or came back): its
        listeners learn it like a start."""
        self._emit("started", vm)

    def _emit(self, event: str, vm: VirtualMachine) -> None:
        """Tell the listeners; a listener's failure is its own, never the VM's. Every event
        is a change the record keeps (a VM that went leaves it)."""
        if event == "removed":
            self.forget(vm.name)
        else:
            self.keep(vm)
        for listener in list(self.listeners):
            try:
                listener(event, vm)
            except Exception:  # noqa: BLE001 - a listener's bug must not undo a VM
                log.exception("VM listener failed on %s of %s", event, vm.name)

    def keep(self, vm: VirtualMachine, states: dict[str, Any] | None = None) -> None:
        """Write ``vm`` as it is now into the record (``states``: checkpoints its objects
        just started from); a disk that refuses is logged: the VM serves on regardless."""
        from agent.hosting.hosted_registry import RegistryError

        if self.record is None or self.vms.get(vm.name) is not vm:
            return
        shaping = self.shaper.caps.get(vm.shaper_key, []) if vm.shaper_key is not None else []
        try:
            self.record.keep(vm, shaping, states)
        except RegistryError as exc:
            log.error("VM %s: %s (a restarted agent would not find it)", vm.name, exc)

    def forget(self, name: str) -> None:
        """Remove VM ``name`` from the record (removed on purpose: not brought back)."""
        from agent.hosting.hosted_registry import RegistryError

        if self.record is None:
            return
        try:
            self.record.remove(name)
        except RegistryError as exc:
            log.error("VM %s: %s", name, exc)

    # --- Fig. 5 -------------------------------------------------------------------------

    async def provision(self, body: dict[str, Any], *, warm: bool = False,
                        states: dict[str, Any] | None = None) -> dict[str, Any]:
        """Provision one VM from a PROVISION body; return what was done (or raise
        :class:`ProvisionError` after recording it and undoing every step).

        ``warm``/``states`` are for a VM that receives migrating objects: they start from
        those checkpoints, or queue requests until their state arrives."""
        vm = None
        try:
            vm = self._configure(body)
            self.vms[vm.name] = vm
            await self._fetch_verify_install(vm)
            await self._initialise(vm, states, warm)
            vm.steps.append(("initialised", time.time()))
            self._mark(vm.name, "initialised")
            vm.last_update_check = time.time()
            # A VM that arrives with a migrating object keeps the service's age: a duration
            # limit counts from the service's first start, not from this move.
            since = body.get("running_since")  # checked by _configure
            vm.running_since = float(since) if since is not None else time.time()
            log.info("VM %s on %s runs %s %s", vm.name, self.router, vm.service, vm.version)
            self._emit("started", vm)
            self._mark(vm.name, "listeners told")
            return vm.describe()
        except ProvisionError as exc:
            self._record(body, exc)
            if vm is not None:
                await self.remove(vm.name)
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure is a refusal too
            err = ProvisionError("internal", repr(exc))
            self._record(body, err)
            if vm is not None:
                await self.remove(vm.name)
            raise err from exc

    def _mark(self, name: Any, moment: str, fresh: bool = False) -> None:
        """Note when ``moment`` of VM ``name``'s provisioning happened (:attr:`timings`)."""
        if not isinstance(name, str) or not VM_NAME_RE.match(name):
            return
        if fresh:
            self.timings.pop(name, None)
        self.timings.setdefault(name, {})[moment] = time.time()
        while len(self.timings) > 16:
            self.timings.pop(next(iter(self.timings)))

    def authorize(self, msg: Any) -> str:
        """A PROVISION must be signed by one of the VM's authorized providers (the patent:
        the router configures a VM only for an authorized remote site); returns the
        signer's key id, or records and raises the refusal."""
        from agent.core.msgauth import MessageAuthError, ReplayCache, verify_ed25519
        from agent.vm.errors import RepositoryError
        from agent.vm.signing import key_id, load_public_key

        if self._replays is None:
            self._replays = ReplayCache()
        self._mark(msg.body.get("vm") if isinstance(msg.body, dict) else None, "received",
                   fresh=True)
        try:
            keys = {}
            for path in self.baseline.authorized_keys:
                key = load_public_key(Path(path))
                keys[key_id(key)] = key
            # Signed for this router: one of its addresses (issue 12).
            return verify_ed25519(msg.type, msg.txid, msg.body, keys, self._replays,
                                  to=set(self.addresses.values()))
        except (MessageAuthError, RepositoryError, OSError) as exc:
            err = ProvisionError("authorization", f"PROVISION not accepted: {exc}")
            self._record(msg.body, err)
            raise err from None

    def record_error(self, vm: Any, service: Any, step: str, reason: str) -> None:
        """A refusal that is not a PROVISION's (a duplicate that could not be placed, say),
        listed with them in ``moat show errors``."""
        self._record({"vm": vm, "service": service}, ProvisionError(step, reason))

    def _record(self, body: dict[str, Any], exc: ProvisionError) -> None:
        self.errors.append({"at": time.time(), "vm": body.get("vm"), "service": body.get("service"),
                            "step": exc.step, "reason": exc.reason})
        del self.errors[:-200]
        log.warning("provisioning of %s refused at %s: %s", body.get("vm"), exc.step, exc.reason)

    def _configure(self, body: dict[str, Any]) -> VirtualMachine:
        """Step 1 on a PROVISION body: every field checked (:mod:`agent.core.fields`) before
        anything is fetched, added or started; a bad one is a refusal at step ``message``
        (or the step it belongs to) that touches nothing."""
        base = self.baseline
        for key in ("vm", "kind", "service"):
            if key not in body:
                raise ProvisionError("message", f"missing field {key!r}")
        try:
            name = fields.name(body["vm"], "vm")
            kind = fields.one_of(body["kind"], "kind", KINDS)
            # Both name directories this router removes and replaces as root: "../x" must
            # touch nothing (issue 12).
            service = fields.name(body["service"], "service")
            port = fields.port(body.get("port", SERVICE_PORT), "port")
            res = dict(fields.mapping(body.get("resources", {}), "resources", max_items=4))
            wanted = body.get("credentials", base.authorized_keys)
            if not isinstance(wanted, list) or len(wanted) > 16 \
                    or not all(isinstance(k, str) for k in wanted):
                raise fields.FieldError("credentials", wanted,
                                        "must be a list of at most 16 provider key files")
            cpu, memory_mb, pids, egress = self._resources(res)
            policy = self._policy(body.get("policy", {}))
            part = fields.one_of(body.get("part", "primary"), "part",
                                 ("primary", "duplicate", "secondary"))
            parent_router = body.get("parent_router", "")
            if parent_router != "":
                fields.address(parent_router, "parent_router")
            parent_instance = body.get("parent_instance", "")
            if parent_instance != "":
                fields.identifier(parent_instance, "parent_instance")
            since = body.get("running_since")
            if since is not None:
                fields.number(since, "running_since", ge=0, le=time.time() + MAX_CLOCK_SKEW_S)
        except fields.FieldError as exc:
            raise ProvisionError("message", str(exc)) from None
        if name in self.vms:
            raise ProvisionError("message", f"VM {name} exists on {self.router}")
        interface = body.get("interface")
        if kind == "interface":
            if not isinstance(interface, str) or interface not in self.addresses:
                raise ProvisionError("virtual interface", f"no interface {interface!r} on {self.router}")
            if not body.get("address"):
                raise ProvisionError("virtual interface", "a virtual interface needs an address")
            own = self.addresses[interface]
            network = f"{own}/{self.prefixes.get(interface, 24)}"
            try:
                # An address of that interface's network, not one the router already has.
                address = fields.address(body.get("address"), "address", within=[network],
                                         exclude=self.addresses.values())
            except fields.FieldError as exc:
                raise ProvisionError("virtual interface", str(exc)) from None
        else:
            address, interface = "0.0.0.0", None
        extra = [k for k in wanted if k not in base.authorized_keys]
        if extra:
            raise ProvisionError("credentials", f"credentials may only restrict the baseline; "
                                 f"not authorized here: {extra}")
        policy = {**base.policy, **policy}  # may restrict or enhance (step 70)
        vm = VirtualMachine(name, kind, service, address, interface, port, cpu, memory_mb, pids,
                            egress, list(wanted), policy)
        vm.mobile, vm.only = self._mobile_part(body)
        vm.leased, vm.share = self._broker_terms(body)
        vm.part = part
        vm.parent_router = parent_router
        vm.ready = vm.part == "primary"  # the distribution role says when the others are
        vm.parent_instance = parent_instance
        vm.steps.append(("configured", time.time()))
        return vm

    def _resources(self, res: dict[str, Any]) -> tuple[float, int, int, int | None]:
        """(cpu, memory_mb, pids, egress_kbit) of a PROVISION's ``resources``, each in
        range; what it leaves out is the baseline's."""
        base = self.baseline
        unknown = set(res) - {"cpu", "memory_mb", "pids", "egress_kbit"}
        if unknown:
            raise fields.FieldError("resources", sorted(unknown), "are unknown fields")
        cpu = fields.number(res.get("cpu", base.cpu), "resources.cpu", gt=0, le=MAX_VM_CPU)
        memory_mb = fields.integer(res.get("memory_mb", base.memory_mb), "resources.memory_mb",
                                   1, 1 << 20)
        pids = fields.integer(res.get("pids", base.pids), "resources.pids", 1, 1 << 16)
        egress = res.get("egress_kbit")
        if egress in (None, 0):
            return cpu, memory_mb, pids, None
        return cpu, memory_mb, pids, fields.integer(egress, "resources.egress_kbit", 8, 10 ** 8)

    @staticmethod
    def _policy(doc: Any) -> dict[str, Any]:
        """A PROVISION's lifecycle ``policy``: only the lifecycle policy's fields, each
        valid by :class:`agent.vm.manifest.LifecyclePolicy`'s rules."""
        from agent.vm.errors import ManifestError
        from agent.vm.manifest import FORMAT, LifecyclePolicy

        doc = dict(fields.mapping(doc, "policy", max_items=8))  # the five fields and format
        known = {"max_transactions", "max_duration_s", "update_check_interval_s", "shareable",
                 "extensible"}
        for key, value in doc.items():
            if key == "format" and value == FORMAT:
                continue  # a policy as the manifest writes it (a VM moving on, a duplicate)
            if key not in known:
                raise fields.FieldError("policy", key, f"is not one of {sorted(known)}")
            if value is None and key not in ("shareable", "extensible"):
                continue
            try:
                LifecyclePolicy(**{key: value})
            except ManifestError as exc:
                raise fields.FieldError(f"policy.{key}", value, f"is refused: {exc}") from None
        return doc

    def _broker_terms(self, body: dict[str, Any]) -> tuple[bool, float]:
        """``leased`` (a JSON boolean, default false) and ``share`` (percent in (0, 100],
        default 100), checked before anything is fetched."""
        leased = body.get("leased", False)
        if not isinstance(leased, bool):
            raise ProvisionError("message", f"leased must be true or false, not {leased!r}")
        if leased and self.service_key is None:
            raise ProvisionError("credentials", f"{self.router} has no router key to derive "
                                 "service credential keys from: it cannot run a leased service")
        share = body.get("share", MAX_SHARE)
        if not isinstance(share, (int, float)) or isinstance(share, bool) \
                or not 0 < share <= MAX_SHARE:
            raise ProvisionError("message", f"share must be a number in (0, {MAX_SHARE:g}], "
                                 f"not {share!r}")
        return leased, float(share)

    def _mobile_part(self, body: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The ``mobile`` (object -> registration config) and ``objects`` (a part of the
        service) fields, checked before anything is fetched: object names, and every
        registration field (:func:`agent.core.fields.object_config`: a home address on its
        home agent's network that is none of this router's, a prefix on the home network)."""
        mobile = body.get("mobile") or {}
        only = body.get("objects") or []
        if not isinstance(mobile, dict) or not isinstance(only, list):
            raise ProvisionError("message", "mobile must map object names to configurations "
                                 "and objects must be a list of object names")
        try:
            only = fields.names(only, "objects", max_items=MAX_OBJECTS)
            fields.mapping(mobile, "mobile", max_items=MAX_OBJECTS)
            for obj in mobile:
                fields.name(obj, "mobile object")
        except fields.FieldError as exc:
            raise ProvisionError("message", str(exc)) from None
        if mobile and self.host is None:
            raise ProvisionError("mobile objects", f"{self.router} cannot host mobile objects")
        names = set()
        for obj, cfg in mobile.items():
            try:
                names.add(fields.object_config(cfg, f"mobile.{obj}",
                                               own=self.addresses.values()).name)
            except fields.FieldError as exc:
                raise ProvisionError("mobile objects", f"{obj}: bad object configuration: "
                                     f"{exc}") from None
        if len(names) != len(mobile):
            raise ProvisionError("mobile objects", "two objects with one mobile name")
        return {str(k): dict(v) for k, v in mobile.items()}, list(only)

    async def _fetch_verify_install(self, vm: VirtualMachine, dest: Path | None = None) -> None:
        where = {"dest": dest} if dest is not None else {}  # else the VM's own directory
        # A new VM may start the cached version the site served last when the site cannot
        # be reached (verified like any other); an upgrade never does: it needs the site.
        await fetch_verify_install(self.baseline, vm, now=lambda: time.time(), **where,
                                   **self._warm(allow_offline=dest is None))

    def _warm(self, allow_offline: bool = False) -> dict[str, Any]:
        """The warm-provisioning arguments of a fetch, as :meth:`warm` set them."""
        return {"pool": self.pool if self.keep_sessions else None,
                "versions": self.versions if self.cache_versions else None,
                "allow_offline": allow_offline and self.cache_versions}

    async def warm(self, keep_sessions: bool | None = None,
                   cache_versions: bool | None = None) -> dict[str, Any]:
        """Turn the kept session and the version cache on or off (``None``: leave it); the
        old path, a new session and a full fetch per provisioning, is what a benchmark
        compares with. Returns both settings and the pool's and cache's counters."""
        for name, value in (("keep_sessions", keep_sessions), ("cache_versions", cache_versions)):
            if value is not None and not isinstance(value, bool):
                raise ProvisionError("message", f"{name} must be true or false, not {value!r}")
        if keep_sessions is not None:
            # Off: fetches open sessions of their own; the kept ones stay (idle) for when it
            # is on again, and close with the agent.
            self.keep_sessions = keep_sessions
        if cache_versions is not None:
            self.cache_versions = cache_versions
        return {"keep_sessions": self.keep_sessions, "cache_versions": self.cache_versions,
                "sessions": self.pool.status(), "versions": self.versions.status(),
                "timings": {k: dict(v) for k, v in self.timings.items()}}

    async def _initialise(self, vm: VirtualMachine, states: dict[str, Any] | None = None,
                          warm: bool = False) -> None:
        # Recorded before the router changes anything for it: should the agent crash while
        # it provisions, the next one finds a VM that never started and removes what it left.
        self.keep(vm)
        self._mark(vm.name, "recorded")
        if vm.kind == "interface":
            try:
                await netlink.address_add(str(vm.address), 32, str(vm.interface))
            except netlink.NetlinkError as exc:
                raise ProvisionError("virtual interface", str(exc)) from None
            self._mark(vm.name, "interface up")
        if vm.egress_kbit:
            self._next_key += 1
            vm.shaper_key = self._next_key
            # The VM's traffic: its virtual interface's address, or its port on every
            # address (UDP and TCP) when it runs objects that are not mobile, and the home
            # addresses its mobile objects answer from.
            homes = [str(c["home_address"]) for c in vm.mobile.values()]
            plain = any(o.name not in vm.mobile for o in self._part(vm))
            if vm.kind == "interface":
                match: dict[str, Any] = {"src": [vm.address, *homes]}
            else:
                match = {"src": homes, "sport": vm.port if plain else None}
            try:
                capped = await self.shaper.cap(vm.shaper_key, vm.egress_kbit, list(self.addresses),
                                               **match)
            except Exception as exc:  # noqa: BLE001 - netlink refusals are a refusal of the VM
                raise ProvisionError("resources", f"egress cap: {exc!r}") from None
            vm.steps.append((f"egress capped at {vm.egress_kbit} kbit/s on {', '.join(capped)}", time.time()))
            self.keep(vm)  # the classes and filters a removal takes away
        self._mark(vm.name, "objects starting")
        await self._start_objects(vm, states, warm)
        self._mark(vm.name, "objects started")

    @staticmethod
    def _part(vm: VirtualMachine) -> list[Any]:
        """The installed manifest's objects this VM runs (all, or its ``only`` part)."""
        from agent.vm.manifest import Manifest

        manifest = Manifest.from_bytes((Path(vm.installed) / "manifest.json").read_bytes())
        return [o for o in manifest.objects if not vm.only or o.name in vm.only]

    async def _start_objects(self, vm: VirtualMachine, states: dict[str, Any] | None = None,
                             warm: bool = False, names: list[str] | None = None) -> None:
        """Start every object of the installed manifest (or the VM's part of it) in its
        sandbox, with a state when it continues from a checkpoint (an upgrade, a migration).

        A mobile object serves on its home address and is handed to the agent, which adds
        the address, runs its registration client and can migrate it; the others serve on
        the VM's address. ``names``: only these (one restarted object)."""
        from agent.hosting.cgroups import CgroupManager, Limits
        from agent.core.config import ObjectConfig
        from agent.hosting.runtime import ObjectProcess, ObjectProcessError, ServiceCredentials

        credentials = None
        if vm.leased:
            assert self.service_key is not None  # checked by _configure
            credentials = ServiceCredentials(vm.service, self.instance_id(vm),
                                             self.service_key(vm.service), vm.part,
                                             tuple(self.networks),
                                             (vm.parent_instance,) if vm.parent_instance else ())
        if self._cgroups is None:
            self._cgroups = CgroupManager(self.run_id, owner=self.router)
        states = states or {}
        self._parts_at_home(vm)
        for obj in self._part(vm):
            if names is not None and obj.name not in names:
                continue
            if obj.name in vm.moved:
                continue  # it runs elsewhere as a secondary
            mobile = vm.mobile.get(obj.name)
            config = ObjectConfig.from_json(mobile) if mobile else None
            process = ObjectProcess(
                config.name if config else obj.name, obj.entry,
                config.home_address if config else vm.address, vm.port, self.router,
                objects_dir=Path(self.baseline.storage) / "objects", cgroups=self._cgroups,
                limits=Limits(**obj.resources.limits_kwargs()), label=f"{vm.name}-{obj.name}",
                code_dir=str(Path(vm.installed) / obj.name),
                extensible=vm.policy.get("extensible") is not False, credentials=credentials,
                relay_dir=self.relay_dir)
            vm.objects[obj.name] = process  # from now on remove() stops it, whatever happens
            state = states.get(obj.name)
            try:
                if config is None:
                    await process.start(warm=warm, state=state)
                elif self.host is not None and self.host.hosted_process(config.name) is not None:
                    # An upgrade: the object stays registered; only its code is replaced.
                    await process.start(warm=warm, state=state)
                    self.host.replace_process(config.name, process)
                else:
                    assert self.host is not None
                    await self.host.host_object(config, process, warm=warm, state=state,
                                                vm=(vm.name, obj.name),
                                                register=obj.name not in vm.at_home)
            except (ObjectProcessError, AgentError) as exc:
                raise ProvisionError("initialise", f"{obj.name}: {exc}") from None
            self.keep(vm, {obj.name: state})  # a later agent finds it (or its checkpoint)

    def _parts_at_home(self, vm: VirtualMachine) -> None:
        """A primary whose object has a mobile network prefix runs the service's other
        objects as its *parts*: each on an address of the prefix, registered with nobody
        while it runs here (the object is their home agent, NEMO), movable as a secondary."""
        from agent.core.config import ObjectConfig
        from agent.vm.parts import part_configs

        own = vm.primary_object()
        if vm.part != "primary" or own is None:
            return
        primary = ObjectConfig.from_json(own[1])
        parts = [o.name for o in self._part(vm) if o.name not in vm.mobile or o.name in vm.at_home
                 or o.name in vm.moved]
        if not primary.network_prefix or not parts:
            return
        try:
            configs = part_configs(primary, parts)
        except ValueError as exc:
            raise ProvisionError("mobile objects", str(exc)) from None
        for name, config in configs.items():
            vm.mobile[name] = config.to_json()
            if name not in vm.moved and name not in vm.at_home:
                vm.at_home.append(name)

    async def enforce(self) -> list[dict[str, Any]]:
        """Remove every VM whose lifecycle policy is used up (transactions served, or time
        since it started); return what was retired and why (patent: lifecycle policy)."""
        retired = []
        now = time.time()
        for name, vm in list(self.vms.items()):
            if vm.running_since is None:
                continue  # still being provisioned
            reason = None
            limit, duration = vm.policy.get("max_transactions"), vm.policy.get("max_duration_s")
            if duration is not None and now - vm.running_since >= float(duration):
                reason = f"duration of {duration} s used up"
            elif limit is not None:
                served = 0
                for obj in vm.objects:
                    try:
                        served += int((await self.call(name, obj, "stats"))["served"])
                    except (AgentError, asyncio.TimeoutError, KeyError, ValueError):
                        continue
                if served >= int(limit):
                    reason = f"{served} of {limit} transactions used"
            if reason is not None:
                await self.remove(name)
                entry = {"at": now, "vm": name, "service": vm.service, "reason": reason}
                self.retired.append(entry)
                retired.append(entry)
                log.info("VM %s retired: %s", name, reason)
        return retired

    async def check_updates(self) -> list[dict[str, Any]]:
        """Ask the remote site for a new version of each VM's service at the interval its
        policy sets, and upgrade a running service without losing its state: the new
        version is fetched, verified and installed beside the old one, the objects stop with
        their checkpoints, and the new objects start from those checkpoints. A failed upgrade leaves or puts the old
        version back with the same state (and is recorded in the errors): see :meth:`_upgrade`.
        A version that was rolled back is not tried again (each try stops the objects); one
        that could not be fetched is, at the next check."""
        from agent.vm.fetch import fetch_service
        from agent.vm.errors import RepositoryError
        from agent.vm.repository import inspect_service

        done = []
        for vm in list(self.vms.values()):
            interval = vm.policy.get("update_check_interval_s")
            now = time.time()
            if vm.running_since is None or interval is None or now - vm.last_update_check < float(interval):
                continue
            vm.last_update_check = now
            site = self.baseline.site
            if site is None:
                continue
            probe = Path(self.baseline.storage) / "fetched" / f"{vm.name}-check"
            warm = self._warm()  # never offline: the probe asks the site
            warm = {k: v for k, v in warm.items() if v is not None and k != "allow_offline"}
            try:
                await asyncio.to_thread(
                    fetch_service, site.address, site.port, site.user, site.client_key,
                    site.known_host_key, vm.service, probe,
                    cache_dir=Path(self.baseline.storage) / "cache", replace=True, **warm)
                version = (await asyncio.to_thread(inspect_service, probe))[0].version
            except RepositoryError as exc:
                log.info("update check for %s failed: %s", vm.name, exc)
                continue
            finally:
                await asyncio.to_thread(shutil.rmtree, probe, ignore_errors=True)
            if version == vm.version or version == self._rolled_back.get(vm.epoch):
                continue
            vm.steps.append((f"update check found {vm.service} {version} (runs {vm.version})",
                             time.time()))
            log.info("VM %s: the remote site has %s %s (runs %s)", vm.name, vm.service, version,
                     vm.version)
            await self.upgrade_hold.wait(vm.name, version)
            if self.vms.get(vm.name) is not vm or vm.running_since is None:
                continue  # removed (or taken away) while the upgrade was held
            done.append(await self._upgrade(vm, version))
        return done

    async def _upgrade(self, vm: VirtualMachine, version: str) -> dict[str, Any]:
        """Upgrade ``vm`` to ``version`` or roll back to the version it runs, with its state.

        The new version is fetched, verified and installed *beside* the old one while the old
        one serves: a remote site unreachable, a bad signature or a dependency missing stops
        nothing. Every object must then answer a checkpoint (else nothing stops either); the
        objects stop with their final checkpoints and the new version starts from them. If it
        cannot start, or refuses a checkpoint, its objects are stopped, its files removed and
        the old version starts again from the same checkpoints (``rolled_back``). Only a
        success removes the old files."""
        old = (vm.version, vm.installed, dict(vm.policy))
        self._upgrades += 1
        dest = Path(self.baseline.storage) / "versions" / vm.name / str(self._upgrades)
        outcome: dict[str, Any] = {"vm": vm.name, "from": old[0], "to": version, "ok": False,
                                   "rolled_back": False}
        try:
            await self._fetch_verify_install(vm, dest=dest)
            ahead = await self._checkpoints(vm)
        except ProvisionError as exc:  # nothing stopped: the old version serves on
            vm.version, vm.installed, vm.policy = old
            await asyncio.to_thread(_remove_version, dest)
            return self._upgrade_refused(vm, outcome, exc)
        states = await self._stop_for_upgrade(vm, ahead)
        self._keep_final(vm, states)
        try:
            await self._start_objects(vm, states)
        except ProvisionError as exc:
            await self._stop_for_upgrade(vm, {})  # what of the new version started
            vm.version, vm.installed, vm.policy = old
            await asyncio.to_thread(_remove_version, dest)
            outcome["rolled_back"] = True
            self._rolled_back[vm.epoch] = version
            try:
                await self._start_objects(vm, states)
            except ProvisionError as again:
                log.error("VM %s: the old version %s does not start again either: %s; removed",
                          vm.name, old[0], again)
                self._upgrade_refused(vm, outcome, exc)
                await self.remove(vm.name)
                return dict(outcome, removed=True)
            vm.steps.append((f"upgrade to {version} rolled back to {old[0]}", time.time()))
            self._emit("started", vm)
            return self._upgrade_refused(vm, outcome, exc)
        if old[1] and old[1] != vm.installed:
            await asyncio.to_thread(_remove_version, Path(old[1]))
        outcome.update(to=vm.version, ok=True)
        self._rolled_back.pop(vm.epoch, None)
        vm.steps.append((f"upgraded {old[0]} -> {vm.version}", time.time()))
        log.info("VM %s: %s", vm.name, outcome)
        self._emit("started", vm)  # the instance again (a new version may change its formats)
        return outcome

    def _upgrade_refused(self, vm: VirtualMachine, outcome: dict[str, Any],
                         exc: ProvisionError) -> dict[str, Any]:
        self._record({"vm": vm.name, "service": vm.service}, ProvisionError(f"upgrade: {exc.step}", exc.reason))
        outcome["error"] = str(exc)
        vm.steps.append((f"upgrade to {outcome['to']} refused", time.time()))
        log.warning("VM %s: %s", vm.name, outcome)
        return outcome

    async def _checkpoints(self, vm: VirtualMachine) -> dict[str, Any]:
        """Every object's checkpoint, asked while it serves: an object that gives none is not
        upgraded (its state would be lost); the fallback should its final one be missing."""
        from agent.hosting.runtime import ObjectProcessError

        states = {}
        for name, process in vm.objects.items():
            try:
                states[name] = await process.call("get_state", timeout=RUN_TIMEOUT)
            except (ObjectProcessError, AgentError, asyncio.TimeoutError) as exc:
                raise ProvisionError("checkpoint", f"{name} gave no checkpoint: {exc}") from None
            if states[name] is None:
                raise ProvisionError("checkpoint", f"{name} gave no checkpoint")
        return states

    def _keep_final(self, vm: VirtualMachine, states: dict[str, Any]) -> None:
        """The final checkpoints of objects an upgrade stopped, into the record at once: an
        agent that crashes before the new version runs restarts them from these, not from
        the last periodic checkpoint (up to its period older), so their state stays exact."""
        from agent.hosting.hosted_registry import RegistryError

        if self.record is None:
            return
        kept = [name for name, state in states.items() if self.record.checkpoint(vm.name, name, state)]
        if kept:
            try:
                self.record.save()
            except RegistryError as exc:
                log.error("VM %s: final checkpoints of %s not recorded: %s", vm.name, kept, exc)

    async def _stop_for_upgrade(self, vm: VirtualMachine, ahead: dict[str, Any]) -> dict[str, Any]:
        """Stop the VM's objects; their final checkpoints (``ahead``'s if one gives none)."""
        states: dict[str, Any] = {}
        for name in list(vm.objects):
            process = vm.objects.pop(name)
            state = await process.stop()
            if state is None and name in ahead:
                log.warning("upgrade of %s: %s gave no final checkpoint: the one taken before "
                            "it stopped is used", vm.name, name)
                state = ahead[name]
            states[name] = state
        return states

    async def call(self, vm_name: str, obj: str, cmd: str, **args: Any) -> Any:
        return await self.vms[vm_name].objects[obj].call(cmd, timeout=RUN_TIMEOUT, **args)

    # --- mobile objects that leave or come back -------------------------------------------

    def migration_body(self, vm_name: str, obj: str, config: dict[str, Any]) -> dict[str, Any]:
        """What a target router needs to run object ``obj`` of this VM, registered with
        ``config``: the same service, policy, credentials and resources, only that object
        (the target fetches and verifies the code from the remote site itself, Fig. 5)."""
        vm = self.vms[vm_name]
        return dict(vm.provision_body(), objects=[obj], mobile={obj: config})

    async def detach(self, vm_name: str, obj: str) -> None:
        """Object ``obj`` left (it migrated): forget it; a VM left with no objects is
        removed (its installed files and address go, as after its last object stopped)."""
        vm = self.vms.get(vm_name)
        if vm is None:
            return
        process = vm.objects.pop(obj, None)
        vm.mobile.pop(obj, None)
        if process is not None:
            await process.stop()  # already stopped by the migration: closes what is left
        vm.steps.append((f"{obj} migrated away", time.time()))
        if not vm.objects:
            log.info("VM %s on %s has no objects left: removed", vm_name, self.router)
            await self.remove(vm_name)
        else:
            self._emit("started", vm)  # still an instance, with fewer objects

    async def restart_object(self, vm_name: str, obj: str, state: Any, warm: bool = False) -> None:
        """Start object ``obj`` of a VM again from ``state`` (a migration that failed after
        the object had stopped here, a part coming back): same code, sandbox and registration
        as before; ``warm``: queue requests until a newer state arrives."""
        vm = self.vms.get(vm_name)
        if vm is None:
            raise ProvisionError("initialise", f"no VM {vm_name} on {self.router} to restart {obj} in")
        old = vm.objects.pop(obj, None)
        if old is not None:
            await old.stop()
        await self._start_objects(vm, {obj: state}, warm=warm, names=[obj])

    async def remove(self, name: str) -> dict[str, Any] | None:
        """Stop a VM's objects (mobile ones deregister: their binding goes too), remove its
        address, files and cgroups (safe to repeat)."""
        vm = self.vms.pop(name, None)
        if vm is None:
            return None
        self._emit("removed", vm)  # first: the broker stops sending clients here
        for obj, process in vm.objects.items():
            config = vm.mobile.get(obj)
            try:
                if config is not None and self.host is not None \
                        and self.host.hosted_process(config["name"]) is process:
                    await self.host.cmd_object_stop(config["name"], deregister=True)
                await process.stop()
            except Exception as exc:  # noqa: BLE001 - still remove the rest
                log.warning("stopping %s of VM %s: %r", obj, name, exc)
        if vm.kind == "interface" and vm.interface:
            try:
                await netlink.address_del(str(vm.address), 32, vm.interface)
            except netlink.NetlinkError as exc:  # still remove the rest
                log.warning("removing %s of VM %s: %s", vm.address, name, exc)
        if vm.shaper_key is not None:
            await self.shaper.uncap(vm.shaper_key)
        if vm.installed:
            await asyncio.to_thread(shutil.rmtree, vm.installed, ignore_errors=True)
        await asyncio.to_thread(shutil.rmtree, Path(self.baseline.storage) / "versions" / name,
                                ignore_errors=True)  # upgrades' directories
        return vm.describe()

    async def close(self) -> None:
        for name in list(self.vms):
            await self.remove(name)
        await asyncio.to_thread(self.pool.close)  # the kept SFTP sessions end with the agent


def _remove_version(path: Path) -> None:
    """Remove one installed version, and its VM's versions directory once it is empty."""
    shutil.rmtree(path, ignore_errors=True)
    if path.parent.parent.name == "versions":
        try:
            path.parent.rmdir()
        except OSError:
            pass  # another version of it (the one that runs) is still there
