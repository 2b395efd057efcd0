"""The VM role: the router's virtual machines, configured in band by the remote site.

The patent's router hosts VMs that the remote site configures (PROVISION, Fig. 5) and that
retire when their lifecycle policy is used up or upgrade when the site publishes a new
version. :class:`agent.vm.manager.VmManager` holds that logic; this role plugs it into the
agent: PROVISION on TCP 4340 (authenticated by the provider's Ed25519 signature for this
router, its objects' keys sealed for it), the lifecycle timer, and the
``vm``/``retired``/``errors``/``vm_remove`` commands (and ``upgrade_hold``, a fault
injection point of upgrades: agent.vm.upgrade_hold). A VM's mobile objects are hosted by
:class:`agent.hosting.objects.HostingRole`.
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
from agent.hosting.objects import HostingRole
from agent.vm.manager import VmBaseline, VmManager

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

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.close()

    def _manager(self) -> VmManager:
        if self.manager is None:
            raise ControlError(f"{self.config.name} runs no virtual machines")
        return self.manager

    def periodic(self) -> list[Periodic]:
        return [Periodic("lifecycle", LIFECYCLE_PERIOD, self.lifecycle)] if self.config.vm else []

    async def lifecycle(self) -> None:
        """Retire VMs whose lifecycle policy is used up; upgrade those with a new version."""
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

    async def cmd_vm_remove(self, name: str) -> Any:
        if self.manager is None or name not in self.manager.vms:
            raise ControlError(f"no VM {name!r} here")
        return await self.manager.remove(name)
