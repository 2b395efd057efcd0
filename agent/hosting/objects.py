"""The hosting role: the objects this router runs, each with its code and/or its registration.

A hosted object is a sandboxed process (:class:`agent.hosting.runtime.ObjectProcess`) serving
on the object's home address, added to this router's loopback, plus the object's Mobile IP
registration client (:class:`agent.mobility.client.RegistrationClient`). Objects placed by an
experiment (``object_start``) and the mobile objects of a provisioned VM both live here; the
VM role and the migration role call :meth:`HostingRole.host_object` and
:meth:`HostingRole.cmd_object_stop` rather than keeping tables of their own.

A crash of the agent loses no object (issue 13): every object it starts outlives it (see
:mod:`agent.hosting.sandbox`) and is written into the router's root-only registry
(:mod:`agent.hosting.hosted_registry`) with its checkpoint every :data:`CHECKPOINT_PERIOD`
s. At start the role takes over each object whose processes are still there (same pid,
state exact), restarts from its checkpoint one whose processes died meanwhile, and starts
each registration client again. Objects stopped on purpose leave the registry. A VM's
objects are not in it: the VM role keeps them in its own record and takes them over with the
same code (:mod:`agent.hosting.takeover`, :mod:`agent.vm.recovery`, :meth:`HostingRole.adopt_object`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from packets import AgentAdvertisement
from packets.codes import SERVICE_PORT

from agent.core import fields, netlink
from agent.core.config import ObjectConfig
from agent.core.errors import AgentError, ControlError
from agent.core.role import Role
from agent.core.role import Periodic
from agent.hosting.cgroups import CgroupManager, Limits
from agent.hosting.hosted_registry import HostedRegistry, RegistryError
from agent.hosting.runtime import ObjectProcess, ObjectProcessError
from agent.hosting.takeover import discard_leftovers, take_over
from agent.mobility.client import RegistrationClient
from agent.mobility.discovery_role import DiscoveryRole

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Killed objects remembered for ``status`` (the oldest are forgotten).
MAX_KILLED = 64
#: How often every hosted object's checkpoint is written to the registry: what an object
#: whose processes died with no agent to see it restarts from.
CHECKPOINT_PERIOD = 5.0


def check_home_address(home_address: str, home_agent: str, own: set[str]) -> None:
    """A home address a router may put on its loopback: a unicast IPv4 address on its home
    agent's network (/21, MOAT's home LAN), not the home agent's own nor one of the router's
    ``own`` addresses; ValueError otherwise (issue 12: it arrives in PROVISION, MIGRATE and
    VM_NEGOTIATE messages)."""
    home, agent = ipaddress.IPv4Address(home_address), ipaddress.IPv4Address(home_agent)
    network = fields.home_network(str(agent))
    if home not in network or home in (network.network_address, network.broadcast_address) \
            or home == agent or str(home) in own:
        raise ValueError(f"home address {home} is not an address of its home agent's network "
                         f"{network} this router may take")


#: Policy routing of a warm instance's address (:meth:`HostingRole._dark_route`).
DARK_TABLE = 4346
DARK_LAN_PRIORITY = 4344
DARK_PRIORITY = 4345
MAIN_TABLE = 254


@dataclass
class HostedObject:
    """An object this router hosts: its registration client and/or its running process."""

    name: str
    home_address: str
    client: RegistrationClient | None = None
    process: ObjectProcess | None = None
    #: (VM, manifest object) when a provisioned VM runs the object's code; None when it
    #: was placed directly (an experiment's ``object_start``).
    vm: tuple[str, str] | None = None
    #: The sandbox resources of a directly placed object (they travel when it migrates).
    resources: dict[str, Any] | None = None
    #: A warm instance on the object's home link: its home address is not the router's (the
    #: serving instance elsewhere keeps the home link) until :meth:`HostingRole.go_live`;
    #: what reaches it meanwhile is queued (:meth:`HostingRole._dark_route`).
    dark: bool = False
    #: A warm instance on a router that is a foreign agent on its LANs: its home address is
    #: delivered here only to what does not come from those LANs (the home agent's tunnel),
    #: so that a client on such a LAN reaches the serving instance until the switch.
    lan_dark: bool = False
    #: The access links exempt from its dark route while that is installed (None: none is).
    dark_route: list[str] | None = None
    #: Held by a move (it answers nothing) and its home address taken away already: its
    #: stop asks neither again (agent.hosting.migration).
    held: bool = False
    address_gone: bool = False

    def status(self) -> dict:
        status = self.client.status() if self.client else {
            "name": self.name, "home_address": self.home_address, "at_home": None,
            "registration": None, "agents": [], "attempts": [], "bad_replies": 0}
        status["pid"] = self.process.pid if self.process else None
        status["vm"] = list(self.vm) if self.vm else None
        status["usage"] = self.process.usage() if self.process else None
        return status


class HostingRole(Role):
    """Runs objects under controlled exec and registers them with their home agent."""

    name = "hosting"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.objects: dict[str, HostedObject] = {}
        #: One cgroup manager for every object this router runs (VM or placed directly).
        self.cgroups = CgroupManager(self.config.run_id, owner=self.config.name)
        self.discovery: DiscoveryRole | None = None
        #: Objects this router stopped and killed because they misbehaved (did not answer,
        #: answered garbage), newest last, with why: ``moat show status`` reports them.
        self.killed: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: Root-only: the registry of hosted objects and the sockets of their relays, so a
        #: restarted agent takes over the objects that outlived its predecessor.
        self.hosted_dir = Path(self.config.run_dir) / f"{self.config.name}-hosted"
        self.registry = HostedRegistry(self.hosted_dir)
        #: What the start found in the registry: objects taken over (running all along),
        #: restarted from their last checkpoint, and let go (gone, nothing to restart from).
        self.recovered: dict[str, list[str]] = {"adopted": [], "restarted": [], "lost": []}
        #: Processes of instances no longer hosted here, still being stopped (a move's held
        #: instance once the target serves: :meth:`cmd_object_stop` with ``linger``).
        self._teardowns: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        from agent.hosting import prestart

        # The fork server and prepared sandbox slots, made in the background (issue 14).
        self.prestart = prestart.begin(self.config, self.cgroups)
        self.discovery = self.agent.role(DiscoveryRole)
        if self.discovery is not None:
            self.discovery.listeners.append(self.on_advertisement)
        await self.recover()

    def periodic(self) -> list[Periodic]:
        return [Periodic("hosted checkpoints", CHECKPOINT_PERIOD, self.checkpoint_all)]

    async def stop(self) -> None:
        for name in list(self.objects):
            try:
                await self.cmd_object_stop(name, deregister=False)
            except Exception:  # noqa: BLE001 - stop the others all the same
                log.exception("stopping object %s failed", name)
        for name in list(self._teardowns):
            await self.torn_down(name)
        # The idle prepared sandbox slots (issue 14) go too (a few directories and claims,
        # at the agent's stop): a forked agent ends with os._exit, which runs no atexit.
        from agent.hosting import prestart, sandbox_pool

        await prestart.end(getattr(self, "prestart", None))  # no pool made after close_all
        sandbox_pool.close_all()

    def on_advertisement(self, adv: AgentAdvertisement, source: str, ifindex: int) -> None:
        for hosted in list(self.objects.values()):
            if hosted.client is not None:
                hosted.client.on_advertisement(adv, source, ifindex)

    def status(self) -> dict[str, Any]:
        return {"objects": sorted(self.objects),
                "killed_objects": [dict(v, name=k) for k, v in self.killed.items()],
                "recovered_objects": {k: list(v) for k, v in self.recovered.items()}}

    # --- outliving the agent ---------------------------------------------------------------

    def _survives(self, hosted: HostedObject) -> bool:
        """Whether a later agent can take this object over: a client only, or a process with
        a relay (a VM's objects are its VM's, which this registry does not hold)."""
        return hosted.vm is None and (hosted.process is None
                                      or getattr(hosted.process, "relay_dir", None) is not None)

    def _remember(self, hosted: HostedObject, config: ObjectConfig, checkpoint: Any = None) -> None:
        """Write ``hosted`` into the registry (a failure is logged: it serves on regardless)."""
        if not self._survives(hosted):
            return
        entry = {"config": config.to_json(), "home_address": hosted.home_address,
                 "register": hosted.client is not None, "resources": hosted.resources,
                 "process": hosted.process.record() if hosted.process is not None else None,
                 "checkpoint": checkpoint, "checkpoint_at": time.time() if checkpoint is not None else None}
        try:
            self.registry.put(hosted.name, entry)
        except (RegistryError, ObjectProcessError) as exc:
            log.error("object %s: %s (a restarted agent would not find it)", hosted.name, exc)

    def _forget(self, name: str) -> None:
        try:
            self.registry.remove(name)
        except RegistryError as exc:
            log.error("object %s: %s", name, exc)

    def record_checkpoint(self, name: str, state: Any) -> None:
        """Keep ``state`` as the object's last checkpoint in the registry (a migration step
        calls this too): what its processes restart from if they die with the agent."""
        if name in self.registry.entries:
            try:
                self.registry.update(name, checkpoint=state, checkpoint_at=time.time())
            except RegistryError as exc:
                log.error("object %s: checkpoint not kept: %s", name, exc)

    async def checkpoint_all(self) -> None:
        """Every hosted object's checkpoint into the registry (one write)."""
        changed = False
        for name, hosted in list(self.objects.items()):
            if hosted.process is None or name not in self.registry.entries or not hosted.process.running:
                continue
            try:
                state = await hosted.process.call("get_state")
            except ObjectProcessError as exc:
                log.debug("object %s: no checkpoint now: %s", name, exc)
                continue
            if name in self.registry.entries:  # not stopped meanwhile
                self.registry.entries[name] = dict(self.registry.entries[name], checkpoint=state,
                                                   checkpoint_at=time.time())
                changed = True
        if changed:
            try:
                self.registry.save()
            except RegistryError as exc:
                log.error("%s", exc)

    async def recover(self) -> None:
        """Take over what the last agent of this router hosted (its registry): an object
        whose processes are still there is adopted, running all along (same pid, state
        exact); one whose processes are gone restarts from its last checkpoint; without one
        it is let go and what it left (cgroup, directory, socket) is removed. Each object's
        registration client starts again (it re-registers, which its agents take as a
        renewal). One object's failure never stops the others or the agent."""
        entries = self.registry.load()
        if not entries:
            return
        for name, entry in entries.items():
            try:
                await self._recover_one(name, entry)
            except Exception as exc:  # noqa: BLE001 - the other objects still come back
                log.error("object %s not recovered: %s", name, exc)
                self.recovered["lost"].append(name)
                self.objects.pop(name, None)
                self.registry.entries.pop(name, None)
        try:
            self.registry.save()
        except RegistryError as exc:
            log.error("%s", exc)

    def _process_args(self) -> dict[str, Any]:
        return {"objects_dir": Path(self.config.run_dir) / "objects", "cgroups": self.cgroups,
                "relay_dir": self.hosted_dir}

    async def _recover_one(self, name: str, entry: dict[str, Any]) -> None:
        obj = ObjectConfig.from_json(entry["config"])
        if obj.name != name:
            raise ControlError(f"registry entry {name} holds object {obj.name}")
        record = entry.get("process")
        register = bool(entry.get("register", True))
        process = None
        if record is not None:
            found = await take_over(record, entry.get("checkpoint"), discard=self._discard,
                                    **self._process_args())
            if not found.adopted:
                self.registry.entries.pop(name, None)
                await self.host_object(obj, found.process, state=found.checkpoint, register=register)
                self.objects[name].resources = entry.get("resources")
                self._remember(self.objects[name], obj, found.checkpoint)
                self.recovered["restarted"].append(name)
                log.warning("object %s restarted from its checkpoint of %s", name,
                            time.ctime(entry.get("checkpoint_at") or 0))
                return
            process = found.process
        hosted = await self.adopt_object(obj, process, register=register,
                                         resources=entry.get("resources"))
        self._remember(hosted, obj, entry.get("checkpoint"))
        self.recovered["adopted"].append(name)
        log.info("object %s taken over from the previous agent (pid %s)", name,
                 process.pid if process else None)

    async def adopt_object(self, obj: ObjectConfig, process: ObjectProcess | None, *,
                           register: bool, vm: tuple[str, str] | None = None,
                           resources: dict[str, Any] | None = None) -> HostedObject:
        """Host again an object whose ``process`` (adopted: running all along, see
        :mod:`agent.hosting.takeover`) outlived the last agent: its home address is on the
        loopback already; its registration client starts again (it re-registers, which its
        agents take as a renewal). The VM role uses this for its VMs' mobile objects."""
        if obj.name in self.objects:
            raise ControlError(f"object {obj.name} already runs here")
        await self.torn_down(obj.name)  # an instance of it that left is gone first
        hosted = HostedObject(obj.name, obj.home_address, process=process, vm=vm,
                              resources=resources)
        self.objects[obj.name] = hosted
        try:
            if process is not None:
                await self._home_address(obj.home_address, add=True)  # there already: no change
            if register:
                hosted.client = self._make_client(obj)
                await hosted.client.start()
        except Exception:
            self.objects.pop(obj.name, None)
            raise
        return hosted

    async def _discard(self, record: dict[str, Any]) -> None:
        """Remove what an object that cannot be taken over left (its cgroup and what still
        runs there, its relay's socket, its directory)."""
        await discard_leftovers(record, cgroups=self.cgroups, relay_dir=self.hosted_dir,
                                objects_dir=Path(self.config.run_dir) / "objects")

    # --- lookups -------------------------------------------------------------------------

    def hosted(self, name: str) -> HostedObject:
        hosted = self.objects.get(name)
        if hosted is None:
            raise ControlError(f"no object {name!r} here")
        return hosted

    def process(self, name: str) -> ObjectProcess:
        process = self.hosted(name).process
        if process is None:
            raise ControlError(f"object {name!r} has no running code here")
        return process

    def client(self, name: str) -> RegistrationClient:
        client = self.hosted(name).client
        if client is None:
            raise ControlError(f"object {name!r} does not register from here")
        return client

    def hosted_process(self, name: str) -> ObjectProcess | None:
        hosted = self.objects.get(name)
        return hosted.process if hosted is not None else None

    def replace_process(self, name: str, process: ObjectProcess) -> None:
        """A VM upgraded the object's code: the new process serves, registration unchanged."""
        self.hosted(name).process = process

    # --- starting and stopping -----------------------------------------------------------

    async def cmd_object_start(self, config: dict, spec: str | None = None, warm: bool = False,
                               state: Any = None, register: bool = True,
                               resources: dict[str, Any] | None = None,
                               arriving: bool = False) -> dict:
        """Host an object: run its code (``spec``, module:Class) on its home address under
        controlled exec (``resources``: cpu, memory_mb, pids; the agent's defaults when
        absent) and/or its registration client. ``warm``: queue requests until
        ``object_restore``; ``state``: continue from that checkpoint; ``arriving``: a
        move's warm instance, which takes no traffic from the serving one until it goes
        live (:meth:`go_live`)."""
        obj = ObjectConfig.from_json(config)
        process = None
        res: dict[str, Any] = {}
        if spec is not None:
            res = {**self.config.object_resources, **(resources or {})}
            try:
                limits = Limits(cpu_quota=float(res["cpu"]), memory_bytes=int(res["memory_mb"]) << 20,
                                pids_max=int(res["pids"]))
            except (KeyError, TypeError, ValueError, AgentError) as exc:
                raise ControlError(f"bad resources {res}: {exc}") from None
            process = ObjectProcess(obj.name, spec, obj.home_address, SERVICE_PORT, self.config.name,
                                    limits=limits, label=f"{self.config.name}-{obj.name}",
                                    **self._process_args())
        status = await self.host_object(obj, process, warm=warm, state=state, register=register,
                                        arriving=arriving and warm)
        if spec is not None:
            self.objects[obj.name].resources = res
            self._remember(self.objects[obj.name], obj, state)
        return status

    async def host_object(self, obj: ObjectConfig, process: ObjectProcess | None, *, warm: bool = False,
                          state: Any = None, register: bool = True,
                          vm: tuple[str, str] | None = None, arriving: bool = False) -> dict:
        """Start ``process`` (if any) and then serve its home address here and run its
        registration client. Used for placed objects and by the VM for its mobile objects."""
        if obj.name in self.objects:
            raise ControlError(f"object {obj.name} already runs here")
        await self.torn_down(obj.name)  # an instance of it that left is gone first
        try:
            check_home_address(obj.home_address, obj.home_agent, self.config.addresses)
        except ValueError as exc:
            raise ControlError(f"object {obj.name}: {exc}") from None
        # A warm instance at home must not take the home link from the instance that
        # serves elsewhere (or at home, on another router) before its move's switch.
        hosted = HostedObject(obj.name, obj.home_address, vm=vm,
                              dark=arriving and self.on_home_link(obj.home_agent))
        self.objects[obj.name] = hosted
        try:
            if register:  # made (not started) first: its first agent decides lan_dark
                hosted.client = self._make_client(obj)
                hosted.client.dark = hosted.dark
                hosted.lan_dark = arriving and not hosted.dark \
                    and self._registers_here(hosted.client)
            if process is not None:
                hosted.process = process
                # Warm until the address is there: a reply (to a request handed over in a
                # checkpoint, say) cannot leave from an address this router does not have.
                await process.start(warm=True, state=state)
                # Only now: an address without a bound socket answers port-unreachable, and
                # this router may be on the path of the object's clients (net 14's border).
                if hosted.lan_dark or hosted.dark:
                    await self._dark_route(hosted, on=True)
                else:
                    await self._home_address(obj.home_address, add=True)
                if not warm:
                    await process.call("serve")
            if hosted.client is not None:
                await hosted.client.start()
        except Exception:
            await self.cmd_object_stop(obj.name, deregister=False)
            raise
        self._remember(hosted, obj, state)
        return hosted.status()

    def on_home_link(self, home_agent: str) -> bool:
        """Whether this router is on the home link of an object with this home agent."""
        try:
            agent = ipaddress.ip_address(home_agent)
        except ValueError:
            return False
        return any(agent in ipaddress.ip_interface(f"{i.address}/{i.prefix}").network
                   for i in self.config.interfaces)

    def _registers_here(self, client: RegistrationClient) -> bool:
        """Whether a new client will register through this router's own foreign agent (its
        first candidate among the agents its router heard): then its warm instance's
        address is darkened to this router's LANs (:meth:`_dark_route`). Not through another
        router's FOA, whose route brings that LAN's packets here: sent back, they would
        loop."""
        if not self._access_links():
            return False
        first = client.candidates()
        return bool(first) and first[0].address in self.config.addresses

    async def registered_at(self, name: str, care_of_address: str) -> bool:
        """A warm instance darkened to this router's LANs that registered through another
        FOA after all (its first choice refused): its address is this router's again, as
        for any instance (True if it changed)."""
        hosted = self.hosted(name)
        if not hosted.lan_dark or care_of_address in self.config.addresses:
            return False
        await self._home_address(hosted.home_address, add=True)
        hosted.lan_dark = False
        await self._dark_route(hosted, on=False)
        return True

    async def go_live(self, name: str, serve: Callable[[], Awaitable[T]]) -> T:
        """A warm instance's switch: a dark one gets its home address here (a reply leaves
        from it), then ``serve`` (its restore) runs while its client claims the home link
        (agent.mobility.client.RegistrationClient.go_live: a direct deregistration, a round
        trip to the HOA no client need wait for, then an announcement). What ``serve``
        gave, once both are done; its error, if it failed. A claim that fails is logged, not
        raised: the instance may serve already, and a switch is not undone for it."""
        hosted = self.hosted(name)
        if hosted.dark or hosted.lan_dark:
            # The address is the router's now: the local table comes first, its dark route
            # no longer matters (:meth:`forget_dark` removes it, after the switch).
            await self._home_address(hosted.home_address, add=True)
            hosted.dark = hosted.lan_dark = False
        claim = asyncio.ensure_future(hosted.client.go_live()) if hosted.client is not None else None
        try:
            return await serve()
        finally:
            if claim is not None:
                try:
                    await claim
                except Exception as exc:  # noqa: BLE001 - it may serve already: never undone for this
                    log.warning("object %s: claiming the home link at its switch failed: %s",
                                name, exc)

    async def forget_dark(self, name: str) -> None:
        """After a warm instance's switch: its dark route goes (failures logged)."""
        hosted = self.objects.get(name)
        if hosted is None or hosted.dark or hosted.lan_dark or hosted.dark_route is None:
            return
        try:
            await self._dark_route(hosted, on=False)
        except ControlError as exc:
            log.warning("object %s: %s", name, exc)

    def _make_client(self, obj: ObjectConfig) -> RegistrationClient:
        discovery = self.discovery
        if discovery is None:
            raise ControlError("objects cannot register on a router without discovery")
        client = RegistrationClient(obj, discovery.solicit, self.config.advertise_interval,
                                    announce=discovery.announce_home)
        for source, adv, ifindex, heard_at in discovery.known():
            client.seed(source, adv, ifindex, heard_at)
        return client

    async def cmd_object_stop(self, name: str, deregister: bool = True, kill: bool = False,
                              linger: bool = False) -> dict:
        """Stop hosting an object; returns its status, its final state (if it ran here and
        could give one) and ``errors``: what failed on the way. Whatever fails, the process
        is stopped (killed if it must be) and the object is no longer hosted here.
        ``kill``: it misbehaves; it is killed without being asked anything. ``linger``: a
        held instance whose state is no longer wanted (its move committed): it is no longer
        hosted (nor addressed) here when this returns, its process is stopped after, off
        the caller's path (:meth:`torn_down`), and no state is returned."""
        hosted = self.objects.pop(name, None)
        if hosted is None:
            raise ControlError(f"no object {name!r} here")
        self._forget(name)  # stopped on purpose: a restarted agent must not bring it back
        errors: list[str] = []
        if hosted.client is not None:
            try:
                await hosted.client.stop(deregister=deregister)
            except (AgentError, OSError) as exc:
                errors.append(f"registration client: {exc}")
        state = None
        if hosted.process is not None:
            # Hold first: from now on the object queues what it receives (the queue goes into
            # its checkpoint) instead of answering from an address about to disappear, which
            # the kernel would refuse: a request counted, its reply lost. Then the address:
            # packets still arriving are routed on to the object's new place instead of
            # hitting a closing socket (port unreachable).
            try:
                if hosted.process.running and not kill and not hosted.held:
                    try:
                        await hosted.process.call("hold")
                    except ObjectProcessError as exc:
                        errors.append(str(exc))
                try:
                    if hosted.dark_route is not None:
                        await self._dark_route(hosted, on=False)
                    if not (hosted.lan_dark or hosted.dark or hosted.address_gone):  # else it never had it
                        await self._home_address(hosted.home_address, add=False)
                except ControlError as exc:
                    errors.append(str(exc))
            finally:  # never left running, whatever the steps before did
                if linger:
                    self._linger(name, hosted.process)
                else:
                    state = await hosted.process.stop(kill=kill)
        for error in errors:
            log.warning("stopping object %s: %s", name, error)
        return dict(hosted.status(), state=state, errors=errors)

    def _linger(self, name: str, process: ObjectProcess) -> None:
        async def teardown() -> None:
            try:
                await process.stop()
            except Exception:  # noqa: BLE001 - logged; the next instance starts anyway
                log.exception("stopping the left instance of %s failed", name)
            finally:
                if self._teardowns.get(name) is task:
                    del self._teardowns[name]

        task = asyncio.get_running_loop().create_task(teardown())
        self._teardowns[name] = task

    async def torn_down(self, name: str) -> None:
        """Wait until a lingering instance of ``name`` (:meth:`cmd_object_stop`) is gone: a
        new one must not meet its cgroup, uid or relay."""
        task = self._teardowns.get(name)
        if task is not None:
            await asyncio.shield(task)

    async def kill(self, name: str, reason: str) -> dict:
        """Stop and kill an object that misbehaves (its process no longer answers, or answers
        garbage), deregistered, and remember why for ``status``."""
        log.warning("object %s killed: %s", name, reason)
        self.killed[name] = {"reason": reason, "at": time.time()}
        self.killed.move_to_end(name)
        while len(self.killed) > MAX_KILLED:
            self.killed.popitem(last=False)
        if name not in self.objects:
            return {"name": name, "state": None, "errors": []}
        return await self.cmd_object_stop(name, deregister=True, kill=True)

    async def _home_address(self, address: str, add: bool) -> None:
        """The object's home address on this router's loopback, so the kernel delivers it."""
        try:
            if add:
                await netlink.address_add(address, 32, "lo")
            else:
                await netlink.address_del(address, 32, "lo")
        except AgentError as exc:
            raise ControlError(f"home address {address} on lo: {exc}") from None

    def _access_links(self) -> list[str]:
        """The LANs this router is a foreign agent on (their clients' gateway)."""
        if "foreign" not in self.config.roles:
            return []
        return [i.name for i in self.config.interfaces if i.advertise]

    async def _dark_route(self, hosted: HostedObject, on: bool) -> None:
        """A warm instance's address, delivered here without being the router's: ``local
        address`` in a table of its own, looked up for every packet to it, after (for an
        instance darkened to its FOA's LANs) a rule that sends the packets from those LANs
        to the main table, on towards the home agent (which bicasts to the instance that
        serves and, through the tunnel, to this one). On the home link (``dark``) nothing
        is exempt: what reaches the router (the HOA's stale neighbour entry once the old
        place deregistered) is queued here rather than sent back to the home agent, which
        would send it here again. (The kernel answers ARP by the policy route too: a
        neighbour that asks for the address while the HOA proxies it may be told this
        router, and its requests then wait here for the switch; none is lost.)"""
        address = hosted.home_address
        if on:
            hosted.dark_route = self._access_links() if hosted.lan_dark else []
        lans = hosted.dark_route or []
        ops = [(netlink.op_local_route("replace" if on else "del", address, DARK_TABLE),
                f"local {address} table {DARK_TABLE}")]
        rules = [(netlink.op_dst_rule("add" if on else "del", address, MAIN_TABLE,
                                      DARK_LAN_PRIORITY, iif=lan),
                  f"rule iif {lan} to {address} lookup main") for lan in lans]
        rules.append((netlink.op_dst_rule("add" if on else "del", address, DARK_TABLE,
                                          DARK_PRIORITY), f"rule to {address} lookup {DARK_TABLE}"))
        # On: the rules come last (the table holds the route when they send packets to it);
        # off: first. One worker runs them in order: submitted at once, awaited together.
        steps = ops + rules if on else rules + ops
        worker = netlink.default()
        try:
            futures = [asyncio.wrap_future(worker.submit(op, what)) for op, what in steps]
            results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                             worker.timeout)
        except (AgentError, asyncio.TimeoutError) as exc:
            results = [exc]
        if not on:
            hosted.dark_route = None
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise ControlError(f"home address {address} for a warm instance: "
                               f"{failed[0] or type(failed[0]).__name__}")

    # --- control commands ----------------------------------------------------------------

    def cmd_objects(self) -> list[dict]:
        return [h.status() for h in self.objects.values()]

    async def cmd_object_state(self, name: str) -> Any:
        """The object's checkpoint (object state + per-client request memory)."""
        return await self.process(name).call("get_state")

    async def cmd_object_restore(self, name: str, state: Any, serve: bool = True) -> Any:
        return await self.process(name).call("set_state", state=state, serve=serve)

    async def cmd_object_stats(self, name: str) -> Any:
        return await self.process(name).call("stats")

    async def cmd_client_stop(self, name: str, deregister: bool = False) -> dict:
        """Stop only the object's registration client (its code keeps running): without
        renewals its binding runs out, as when an object loses touch with its agents."""
        hosted = self.hosted(name)
        client = self.client(name)
        await client.stop(deregister=deregister)
        status = hosted.status()
        hosted.client = None
        if name in self.registry.entries:
            try:
                self.registry.update(name, register=False)
            except RegistryError as exc:
                log.error("object %s: %s", name, exc)
        return status

    async def cmd_register(self, name: str, lifetime: int | None = None) -> dict:
        return (await self.client(name).register(lifetime)).as_dict()

    async def cmd_deregister(self, name: str) -> dict:
        return (await self.client(name).deregister()).as_dict()
