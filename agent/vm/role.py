"""The VM role: the router's virtual machines, configured in band by the remote site.

The patent's router hosts VMs that the remote site configures (PROVISION, Fig. 5) and that
retire when their lifecycle policy is used up or upgrade when the site publishes a new
version. :class:`agent.vm.manager.VmManager` holds that logic; this role plugs it into the
agent: PROVISION on TCP 4340 (authenticated by the provider's Ed25519 signature for this
router, its objects' keys sealed for it), the lifecycle timer, and the
``vm``/``retired``/``errors``/``vm_remove``/``vm_warm`` commands (and ``upgrade_hold``, a fault
injection point of upgrades: agent.vm.upgrade_hold). A VM's mobile objects are hosted by
:class:`agent.hosting.objects.HostingRole`.

A crash of the agent loses no VM (issue 13): the manager keeps a durable record of its VMs
(:mod:`agent.vm.vm_record`, beside the hosting role's registry), their objects run with
relays that outlive the agent, and their checkpoints are written every
:data:`~agent.hosting.objects.CHECKPOINT_PERIOD` s. The next agent of the router rebuilds the
VM table and takes the objects over (:mod:`agent.vm.recovery`) at its first lifecycle tick:
after every role has started, so the hosting role can run the mobile objects' registration
clients and the broker registration hears of the VMs again.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from typing import Any

from packets import ControlMessage, ControlType

from agent.broker.credentials import derive_service_key
from agent.core.errors import ControlError
from agent.core.msgauth import strip
from agent.core.peer import open_secrets
from agent.core.sealing import SealError
from agent.core.role import InBand, Periodic, Role
from agent.hosting.objects import CHECKPOINT_PERIOD, HostingRole
from agent.vm.manager import VmBaseline, VmManager
from agent.vm.recovery import checkpoint_vms, empty_report, recover_vms
from agent.vm.vm_record import VmRecord

log = logging.getLogger(__name__)

#: How often used-up lifecycle policies and new versions are checked, seconds.
LIFECYCLE_PERIOD = 0.5


class VmRole(Role):
    """PROVISION, lifecycle enforcement and upgrades of this router's VMs (none without a
    baseline in its configuration)."""

    name = "vm"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.manager: VmManager | None = None
        #: What the start found in the record (``vm/object`` names; VMs removed), None
        #: until the record has been taken over.
        self.recovered: dict[str, list[str]] | None = None
        #: Why the record could not be read (it was kept aside), for ``status``.
        self.record_error: str | None = None
        self._recovering = False

    async def start(self) -> None:
        cfg = self.config
        if cfg.vm is None:
            return  # no baseline: the commands answer empty lists, PROVISION is refused
        hosting = self.agent.require(HostingRole)
        service_key = None
        if cfg.router_key:
            # A leased service's objects check credentials under the key the broker issues
            # them with: both derive it from the run's router key, so no key is ever sent.
            service_key = functools.partial(derive_service_key, bytes.fromhex(cfg.router_key))
        self.manager = VmManager(VmBaseline.from_json(cfg.vm), cfg.name, cfg.run_id,
                                 {i.name: i.address for i in cfg.interfaces},
                                 cgroups=hosting.cgroups, host=hosting, service_key=service_key,
                                 prefixes={i.name: i.prefix for i in cfg.interfaces})
        self.manager.networks = [str(ipaddress.ip_interface(f"{i.address}/{i.prefix}").network)
                                 for i in cfg.interfaces if i.advertise]
        # Read now (before any PROVISION can arrive); taken over at the first lifecycle tick.
        self.manager.relay_dir = hosting.hosted_dir
        self.manager.record = VmRecord(hosting.hosted_dir)
        self.manager.record.load()
        self.record_error = self.manager.record.load_error

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.close()

    def _manager(self) -> VmManager:
        if self.manager is None:
            raise ControlError(f"{self.config.name} runs no virtual machines")
        return self.manager

    def periodic(self) -> list[Periodic]:
        if not self.config.vm:
            return []
        return [Periodic("lifecycle", LIFECYCLE_PERIOD, self.lifecycle),
                Periodic("vm checkpoints", CHECKPOINT_PERIOD, self.checkpoint)]

    def status(self) -> dict[str, Any]:
        if self.manager is None:
            return {}
        return {"recovered_vms": self.recovered, "vm_record_error": self.record_error}

    async def recover(self) -> None:
        """Take over the VMs the last agent of this router left (once; see the module)."""
        if self._recovering:
            return
        self._recovering = True  # once, even if the take-over fails half-way
        manager = self._manager()
        try:
            self.recovered = await recover_vms(manager, self.agent.require(HostingRole))
        except Exception as exc:  # noqa: BLE001 - the agent serves on without them
            log.exception("VM record not taken over: %s", exc)
            self.record_error = f"VM record not taken over: {exc!r}"
            self.recovered = empty_report()
        if any(self.recovered.values()):
            log.warning("VMs taken over from the previous agent: %s", self.recovered)

    async def checkpoint(self) -> None:
        """Every VM object's checkpoint into the record (after the take-over only: before,
        the table is not the record's yet)."""
        if self.recovered is not None:
            await checkpoint_vms(self._manager())

    async def lifecycle(self) -> None:
        """Retire VMs whose lifecycle policy is used up; upgrade those with a new version
        (first, once: take over what the last agent left)."""
        await self.recover()
        manager = self._manager()
        await manager.enforce()
        await manager.check_updates()

    def in_band(self) -> dict[ControlType, InBand]:
        return {ControlType.PROVISION: InBand(self.on_provision, self.authenticate)}

    def authenticate(self, msg: ControlMessage) -> dict[str, Any]:
        """A PROVISION signed by one of the baseline's authorized providers (Fig. 5) for this
        router, its ``mobile`` part (the objects' keys) opened: it is sealed for this
        router's X25519 key (agent.core.sealing), and refused if it came in clear."""
        manager = self._manager()
        manager.authorize(msg)
        try:
            return open_secrets(msg, strip(msg.body), self.config.seal_private())
        except SealError as exc:
            manager.record_error(msg.body.get("vm"), msg.body.get("service"), "authorization",
                                 f"PROVISION not accepted: {exc}")
            raise ControlError(f"PROVISION refused: {exc}") from None

    async def on_provision(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "vm": await self._manager().provision(body)}

    # --- control commands ----------------------------------------------------------------

    def cmd_vm(self) -> list[dict]:
        """The provisioned VMs, their objects and what each uses (cgroup measurements)."""
        return [vm.describe() for vm in self.manager.vms.values()] if self.manager else []

    def cmd_retired(self) -> list[dict]:
        """VMs removed because their lifecycle policy was used up."""
        return list(self.manager.retired) if self.manager else []

    def cmd_errors(self) -> list[dict]:
        """Refused provisionings (Fig. 5 steps 92-94), newest last."""
        return list(self.manager.errors) if self.manager else []

    def cmd_upgrade_hold(self, action: str = "status", deadline_s: float = 30.0) -> dict:
        """A fault injection point (tests, ``moat run faults``): ``arm`` holds the next
        upgrade between its version probe and its fetch, at most ``deadline_s`` seconds;
        ``release`` lets it go on; ``disarm`` both; ``status`` says whether one waits."""
        hold = self._manager().upgrade_hold
        if action == "arm":
            hold.arm(deadline_s)
        elif action == "release":
            hold.release()
        elif action == "disarm":
            hold.disarm()
        elif action != "status":
            raise ControlError(f"action must be one of arm, release, disarm, status; not {action!r}")
        return hold.status()

    async def cmd_vm_warm(self, keep_sessions: bool | None = None,
                          cache_versions: bool | None = None) -> dict:
        """Warm provisioning (issue 14): the kept SFTP session to the site and the version
        cache, each on or off (the old path, for a benchmark's baseline), with their
        counters (sessions opened, re-opened, reused; cache hits, misses, refused)."""
        return await self._manager().warm(keep_sessions, cache_versions)

    async def cmd_vm_remove(self, name: str) -> Any:
        if self.manager is None or name not in self.manager.vms:
            raise ControlError(f"no VM {name!r} here")
        return await self.manager.remove(name)
