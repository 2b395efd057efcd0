"""The service directory (patent Fig. 10: service name list 160, service address list 162).

The broker finds a desired service (Fig. 12, step 204) by comparing the name a CO gives with
the names of services and of their mobile objects, and answers with the address where an
instance runs. A service may run as several instances (a duplicate or secondary object on
another router's VM, steps 218/222), so the directory holds *instances*: each registers with
its service, objects, home address and port, the router/VM it runs on, its capacity (the
share of the service it can serve, percent, and the CPU behind it, cores), its lifecycle
policy (how long it stays, step 206) and the formats it consumes and produces (for dynamic
service paths). Instances leave when their VM is retired or they move.

Pure data; what is *used* of each capacity is :mod:`agent.broker.admission`'s business.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from agent.broker import wire
from agent.broker.errors import BadRequest
from agent.broker.leases import MAX_CPU, MAX_SHARE

log = logging.getLogger(__name__)

MAX_PROCESSING_COST = 1e6
#: What an instance may be of its service (Fig. 6): the mobile object, a full copy of it, a
#: part of it on another router (whose home agent is the mobile object).
PARTS = ("primary", "duplicate", "secondary")


@dataclass(frozen=True)
class Lifecycle:
    """The part of the lifecycle policy (:class:`agent.vm.manifest.LifecyclePolicy`) that
    bounds leases: ``max_duration_s`` since ``running_since`` (broker clock), or unlimited."""

    max_duration_s: float | None = None
    running_since: float | None = None

    def __post_init__(self) -> None:
        if self.max_duration_s is not None:
            wire.check_number(self.max_duration_s, "max_duration_s", gt=0)
            if self.running_since is None:
                raise BadRequest("a time-limited lifecycle needs running_since")

    def remaining(self, now: float) -> float | None:
        """Seconds the instance still stays (may be <= 0), or None when unlimited."""
        if self.max_duration_s is None or self.running_since is None:
            return None
        return self.running_since + self.max_duration_s - now

    def as_dict(self, now: float) -> dict[str, Any]:
        remaining = self.remaining(now)
        uptime = None if self.running_since is None else max(0.0, now - self.running_since)
        return {"max_duration_s": self.max_duration_s,
                "uptime_s": None if uptime is None else round(uptime, 3),
                "remaining_s": None if remaining is None else round(max(0.0, remaining), 3)}

    @classmethod
    def from_dict(cls, doc: Any, now: float) -> "Lifecycle":
        """From the wire: ``max_duration_s`` (or null) and ``uptime_s``, the instance's age,
        turned into an instant on this broker's clock (the two hosts' clocks differ)."""
        doc = wire.as_mapping(doc, "lifecycle")
        wire.only_keys(doc, {"max_duration_s", "uptime_s", "remaining_s"}, "lifecycle")
        max_s = wire.number(doc, "max_duration_s", "lifecycle", default=None, gt=0)
        uptime = wire.number(doc, "uptime_s", "lifecycle", default=0.0, ge=0)
        return cls(max_s, now - uptime)


@dataclass(frozen=True)
class Instance:
    """One running instance of a service, as registered (service address list 162)."""

    service: str
    instance_id: str
    address: str
    port: int
    router: str
    share: float = MAX_SHARE
    cpu: float = 1.0
    objects: tuple[str, ...] = ()
    consumes: str = ""
    produces: str = ""
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    processing_cost: float = 1.0
    #: What the instance is of its service (Fig. 6): "primary" or "duplicate".
    part: str = "primary"
    #: Where its router takes in-band messages; given only by an instance whose service is a
    #: mobile object, which can grow (a duplicate) and be released when it holds no lease.
    router_address: str = ""
    #: The LAN prefix of its router: COs on that network reach this instance only (their
    #: foreign agent delivers the home address here); "" when not given.
    network: str = ""
    #: Whether its router is its network's foreign agent: when two instances of one object
    #: run on a network, the COs there reach the one on the FOA (it answers locally).
    gateway: bool = False
    #: Objects that answer on an address of their own (the parts of a mobile object, on its
    #: mobile network prefix): a lease naming one goes there.
    object_addresses: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("service", "instance_id", "router"):
            wire.check_name(getattr(self, attr), attr)
        for obj in self.objects:
            wire.check_name(obj, "object")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise BadRequest(f"instance address {self.address!r} is not an IP address") from None
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise BadRequest(f"port {self.port!r} must be an integer in [1, 65535]")
        wire.check_number(self.share, "share", gt=0, le=MAX_SHARE)
        wire.check_number(self.cpu, "cpu", gt=0, le=MAX_CPU)
        wire.check_number(self.processing_cost, "processing_cost", ge=0, le=MAX_PROCESSING_COST)
        if self.part not in PARTS:
            raise BadRequest(f"part must be one of {PARTS}, not {self.part!r}")
        if self.router_address:
            try:
                ipaddress.ip_address(self.router_address)
            except ValueError:
                raise BadRequest(f"router address {self.router_address!r} is not an IP "
                                 "address") from None
        if len(self.object_addresses) > 64:
            raise BadRequest("at most 64 object addresses")
        for obj, address in self.object_addresses.items():
            wire.check_name(obj, "object")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise BadRequest(f"address of {obj} {address!r} is not an IP address") from None
        if self.network:
            try:
                ipaddress.ip_network(self.network)
            except ValueError:
                raise BadRequest(f"network {self.network!r} is not an IP prefix") from None
        if bool(self.consumes) != bool(self.produces):
            raise BadRequest("an instance declares both consumes and produces, or neither")
        for fmt in (self.consumes, self.produces):
            if fmt:
                wire.check_name(fmt, "format")

    @property
    def converts(self) -> bool:
        """Whether the instance can be a hop of a service path (consumes -> produces)."""
        return bool(self.consumes)

    def names(self) -> set[str]:
        """The names a CO may ask for to reach this instance (step 204)."""
        return {self.service, *self.objects}

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"service": self.service, "instance_id": self.instance_id,
                "address": self.address, "port": self.port, "router": self.router,
                "share": self.share, "cpu": self.cpu, "objects": list(self.objects),
                "consumes": self.consumes, "produces": self.produces,
                "lifecycle": self.lifecycle.as_dict(now),
                "processing_cost": self.processing_cost, "part": self.part,
                "router_address": self.router_address, "network": self.network,
                "gateway": self.gateway,
                "object_addresses": dict(self.object_addresses)}

    def address_of(self, target: str) -> str:
        """Where a lease for ``target`` (the service or one of its objects) is served."""
        return self.object_addresses.get(target, self.address)

    @property
    def movable(self) -> bool:
        """Whether the broker may ask its router to grow the service (a mobile primary)."""
        return self.part == "primary" and bool(self.router_address)

    @classmethod
    def from_dict(cls, doc: Any, now: float) -> "Instance":
        """A registration from the wire, every field checked; ``now`` on the broker clock."""
        what = "instance"
        doc = wire.as_mapping(doc, what)
        wire.only_keys(doc, {"service", "instance_id", "address", "port", "router", "share",
                             "cpu", "objects", "consumes", "produces", "lifecycle",
                             "processing_cost", "part", "router_address", "network",
                             "object_addresses", "gateway"}, what)
        return cls(
            service=wire.name(doc, "service", what),
            instance_id=wire.name(doc, "instance_id", what),
            address=wire.text(doc, "address", what, max_len=64),
            port=wire.integer(doc, "port", what, lo=1, hi=65535),
            router=wire.name(doc, "router", what),
            share=wire.number(doc, "share", what, default=MAX_SHARE, gt=0, le=MAX_SHARE),
            cpu=wire.number(doc, "cpu", what, default=1.0, gt=0, le=MAX_CPU),
            objects=wire.names(doc, "objects", what, default=()),
            consumes=wire.text(doc, "consumes", what, default="", max_len=128),
            produces=wire.text(doc, "produces", what, default="", max_len=128),
            lifecycle=Lifecycle.from_dict(doc.get("lifecycle", {}), now),
            processing_cost=wire.number(doc, "processing_cost", what, default=1.0, ge=0,
                                        le=MAX_PROCESSING_COST),
            part=wire.text(doc, "part", what, default="primary", max_len=16),
            router_address=wire.text(doc, "router_address", what, default="", max_len=64),
            network=wire.text(doc, "network", what, default="", max_len=64),
            object_addresses=_addresses(doc.get("object_addresses", {})),
            gateway=doc.get("gateway", False) is True,
        )


def _addresses(doc: Any) -> dict[str, str]:
    doc = wire.as_mapping(doc, "object_addresses")
    return {str(k): str(v) for k, v in doc.items()}


class ServiceDirectory:
    """Instances by id; lookups by service or object name and by formats."""

    def __init__(self) -> None:
        self._instances: dict[str, Instance] = {}

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._instances.values()))

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._instances

    def register(self, instance: Instance) -> Instance | None:
        """Add an instance, or replace the one with the same id (it re-registered, e.g. with
        a new capacity); return the replaced one."""
        old = self._instances.get(instance.instance_id)
        if old is not None and old.service != instance.service:
            raise BadRequest(f"instance {instance.instance_id} already serves {old.service}")
        self._instances[instance.instance_id] = instance
        log.info("instance %s of %s at %s:%d on %s", instance.instance_id, instance.service,
                 instance.address, instance.port, instance.router)
        return old

    def remove(self, instance_id: str) -> Instance | None:
        """An instance leaves (its VM retired, or it moved); None if it was not here."""
        return self._instances.pop(instance_id, None)

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def lookup(self, name: str) -> list[Instance]:
        """Instances whose service or one of whose objects is called ``name`` (step 204)."""
        return [i for i in self._instances.values() if name in i.names()]

    def converters(self) -> list[Instance]:
        """Instances that can be hops of a service path."""
        return [i for i in self._instances.values() if i.converts]

    def services(self) -> dict[str, list[Instance]]:
        """Service name list 160: each service with its instances."""
        by_service: dict[str, list[Instance]] = {}
        for instance in self._instances.values():
            by_service.setdefault(instance.service, []).append(instance)
        return by_service

    def describe(self, now: float) -> list[dict[str, Any]]:
        """For ``moat show services --json``: services sorted by name, with their instances."""
        return [{"service": name, "instances": [i.as_dict(now) for i in sorted(
                    instances, key=lambda i: i.instance_id)]}
                for name, instances in sorted(self.services().items())]
