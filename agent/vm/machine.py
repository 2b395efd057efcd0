"""What a router's virtual machine is: its baseline, its terms, and the host of its objects.

Plain data, kept apart from :mod:`agent.vm.manager` (which runs Fig. 5 on it) so that the
broker registration, the migration role and tests can read a VM without the manager's
machinery.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

#: A VM's share of its service (percent), as its instance registers with the broker.
MAX_SHARE = 100.0


#: The remote site's SFTP account: an unprivileged system user, chrooted into the
#: repository and read-only there (topologies/site.py); never root.
SITE_USER = "moat-site"


@dataclass
class SiteAccess:
    """How this router reaches the remote site's repository (SFTP)."""

    address: str
    known_host_key: str  # path of the site's public host key
    client_key: str  # path of this router's private key
    user: str = SITE_USER
    port: int = 22


@dataclass
class VmBaseline:
    """The default configuration a router boots with (Fig. 5, step 60)."""

    authorized_keys: list[str]  # provider public key files
    storage: str  # where services are cached and installed
    site: SiteAccess | None = None
    cpu: float = 1.0
    memory_mb: int = 512
    pids: int = 128
    policy: dict[str, Any] = field(default_factory=dict)
    #: What all of this router's VMs together may take (cores, MiB): what it offers when
    #: another router looks for room for a duplicate (Fig. 12, steps 210-212).
    capacity_cpu: float = 2.0
    capacity_memory_mb: int = 2048

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "VmBaseline":
        site = SiteAccess(**data["site"]) if data.get("site") else None
        return cls(**{**data, "site": site})


@dataclass
class VirtualMachine:
    """One provisioned VM and the service it runs."""

    name: str
    kind: str
    service: str
    address: str  # "0.0.0.0" for a virtual service
    interface: str | None
    port: int
    cpu: float
    memory_mb: int
    pids: int
    egress_kbit: int | None
    authorized: list[str]
    policy: dict[str, Any]
    version: str = ""
    installed: str = ""
    objects: dict[str, Any] = field(default_factory=dict)  # name -> ObjectSandbox
    steps: list[tuple[str, float]] = field(default_factory=list)
    running_since: float | None = None
    shaper_key: int | None = None
    last_update_check: float = 0.0
    #: Manifest objects that are *mobile objects*: object name -> its registration client
    #: configuration (agent.core.config.ObjectConfig as JSON). They serve on their home address,
    #: register with their home object agent and can migrate; the others serve on the VM's
    #: address.
    mobile: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Run only these objects of the manifest (a part of the service); empty: all of them.
    only: list[str] = field(default_factory=list)
    #: Its objects serve only requests with a valid service credential (Fig. 10, 164).
    leased: bool = False
    #: Tells this VM from an earlier one of the same name on this router: credentials name
    #: the instance, and one issued for a removed VM must not be honoured by its successor.
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    #: The share of the service (percent) this VM's instance offers the broker.
    share: float = MAX_SHARE
    #: What this VM's instance is of its service (Fig. 6): "primary", "duplicate" or
    #: "secondary" (a part of it, whose home agent is the primary object's router).
    part: str = "primary"
    #: Parts of the service that run here beside the primary object, on addresses of its
    #: mobile network prefix, without registering (they are at home: NEMO).
    at_home: list[str] = field(default_factory=list)
    #: Parts that run elsewhere as secondaries: part -> the router that runs them.
    moved: dict[str, str] = field(default_factory=dict)
    #: A secondary's: the address of the primary object's router (where the part goes back).
    parent_router: str = ""
    #: Whether its instance may be offered to the broker yet: a duplicate or secondary only
    #: once it is registered with its home agent (before, a failed start would take the
    #: leases the broker moved to it down with it).
    ready: bool = True
    #: A secondary's: the primary's instance id (credentials issued for the part there, before
    #: it moved, are honoured here: only this instance receives the part's address).
    parent_instance: str = ""

    def describe(self) -> dict[str, Any]:
        hidden = ("objects", "mobile")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}
        # Never the credentials: `moat show vm` is for the operator's screen.
        d["mobile"] = {o: {k: c.get(k) for k in ("name", "home_address", "home_agent")}
                       for o, c in self.mobile.items()}
        d["objects"] = {}
        for name, proc in self.objects.items():
            d["objects"][name] = {"pid": proc.pid, "usage": proc.usage(), "exit": proc.exit_info(),
                                  "address": proc.address, "mobile": name in self.mobile}
        return d

    def provision_body(self) -> dict[str, Any]:
        """A PROVISION body that configures the same VM elsewhere (for a migration)."""
        resources: dict[str, Any] = {"cpu": self.cpu, "memory_mb": self.memory_mb, "pids": self.pids}
        if self.egress_kbit:
            resources["egress_kbit"] = self.egress_kbit
        body = {"vm": self.name, "kind": "service", "service": self.service, "port": self.port,
                "resources": resources, "policy": dict(self.policy),
                "credentials": list(self.authorized), "running_since": self.running_since}
        if self.leased:
            body["leased"] = True
        if self.share != MAX_SHARE:
            body["share"] = self.share
        if self.part != "primary":
            body["part"] = self.part
        if self.parent_router:
            body.update(parent_router=self.parent_router, parent_instance=self.parent_instance)
        return body

    def primary_object(self) -> tuple[str, dict[str, Any]] | None:
        """(manifest name, registration config) of the VM's own mobile object — not a part
        of it running at home or as a secondary — or None."""
        own = [(o, c) for o, c in self.mobile.items() if c.get("part", "primary") != "secondary"]
        return own[0] if len(own) == 1 else None


class ObjectHost(Protocol):
    """What the VM needs from its agent daemon to run mobile objects: host one (its
    registration client, its home address) and stop hosting it (deregistering)."""

    async def host_object(self, config: Any, process: Any, *, warm: bool, state: Any,
                          vm: tuple[str, str] | None, register: bool = True) -> dict[str, Any]: ...

    async def cmd_object_stop(self, name: str, deregister: bool = True) -> dict[str, Any]: ...

    def hosted_process(self, name: str) -> Any: ...

    def replace_process(self, name: str, process: Any) -> None: ...
