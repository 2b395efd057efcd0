"""Admission control: which instance can take a lease, and what each has granted so far.

Patent Fig. 12, steps 206-208: the broker decides whether the desired service "may be used
by corresponding object 116 based on the lease constraints" — the share of the service and
the CPU a request needs against what each instance offers (its registered capacity) minus
what its live leases hold. Every lease that ends gives its share and CPU back (step 230) via
:meth:`Admission.release`.

When nothing fits, the patent does not simply refuse: the mobile object finds another VM and
moves all or part of the service there (steps 210-222). That decision is the one seam here,
:class:`AdmissionPolicy`: its default refuses; :class:`GrowthPolicy` (the broker role's)
decides to grow the service from its primary, which :mod:`agent.distribution` carries out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from agent.broker.directory import Instance, ServiceDirectory
from agent.broker.errors import LeaseDenied, NeedsGrowth
from agent.broker.leases import LeaseRequest

log = logging.getLogger(__name__)

Clock = Callable[[], float]
#: Lower is better: the broker passes the measured cost from the CO's network (paths too).
CostFn = Callable[[Instance], float]
#: Tolerance of share/CPU sums, so 3 × 33.333… % fits in 100 %.
EPS = 1e-9


@dataclass(frozen=True)
class Capacity:
    """A share of a service (percent) and the CPU behind it (cores)."""

    share: float
    cpu: float

    def covers(self, share: float, cpu: float) -> bool:
        return self.share + EPS >= share and self.cpu + EPS >= cpu


@dataclass(frozen=True)
class Held:
    """What one lease holds of one instance."""

    instance_id: str
    share: float
    cpu: float


@dataclass(frozen=True)
class Decision:
    """What :meth:`AdmissionPolicy.on_refusal` decided: admit on ``instance``, refuse, or
    grow the service from ``grow_from`` (its primary) and ask again."""

    instance: Optional[Instance] = None
    reason: str = "no_capacity"
    detail: str = ""
    grow_from: Optional[Instance] = None

    @classmethod
    def refuse(cls, reason: str = "no_capacity", detail: str = "") -> "Decision":
        return cls(None, reason, detail)

    @classmethod
    def admit(cls, instance: Instance) -> "Decision":
        return cls(instance, "", "")

    @classmethod
    def grow(cls, primary: Instance, detail: str = "") -> "Decision":
        return cls(None, "no_capacity", detail, primary)


class AdmissionPolicy:
    """What to do when no registered instance can take a request (step 208 → 210).

    This is the seam for moving a service. A policy may admit on an instance it names
    (:class:`Admission` checks again that it fits, so a policy cannot over-commit), refuse,
    or decide to grow the service (``Decision.grow``): placing a duplicate takes the network,
    so :meth:`Admission.admit` raises :class:`NeedsGrowth` and the broker role does it
    (:mod:`agent.distribution`) before asking again. The default refuses with the reason it
    is given.
    """

    def on_refusal(self, request: LeaseRequest, directory: ServiceDirectory,
                   admission: "Admission", reason: str, detail: str) -> Decision:
        return Decision.refuse(reason, detail)


class GrowthPolicy(AdmissionPolicy):
    """Move all of the service (patent Fig. 12, steps 208 → 210-222) rather than refuse.

    The rule: when no instance has room because every live one is full (not because the
    service's lifecycle is over), and the service has a *movable* primary (a mobile object
    whose router the broker can reach), and fewer than ``max_instances`` instances, and the
    request would fit a fresh instance of it, then grow from that primary. Otherwise refuse.
    """

    def __init__(self, max_instances: int = 3) -> None:
        self.max_instances = max_instances

    def on_refusal(self, request: LeaseRequest, directory: ServiceDirectory,
                   admission: "Admission", reason: str, detail: str) -> Decision:
        if reason != "no_capacity":
            return Decision.refuse(reason, detail)
        instances = directory.lookup(request.target)
        primaries = [i for i in instances if i.movable and admission.alive(i)]
        if not primaries:
            return Decision.refuse(reason, detail + " (and it cannot grow: no mobile primary)")
        if len({i.instance_id for i in directory.lookup(primaries[0].service)}) \
                >= self.max_instances:
            return Decision.refuse(reason, detail + f" (and it already runs "
                                               f"{self.max_instances} instances)")
        primary = min(primaries, key=lambda i: i.instance_id)
        if not Capacity(primary.share, primary.cpu).covers(request.share, request.cpu):
            return Decision.refuse(reason, detail + " (more than one whole instance offers)")
        return Decision.grow(primary, detail)


class Admission:
    """Per instance, the share and CPU granted so far; picks an instance for a request."""

    def __init__(self, directory: ServiceDirectory, policy: AdmissionPolicy | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.directory = directory
        self.policy = policy or AdmissionPolicy()
        self._clock = clock
        self._held: dict[str, Held] = {}  # by lease id

    def used(self, instance_id: str) -> Capacity:
        held = [h for h in self._held.values() if h.instance_id == instance_id]
        return Capacity(sum(h.share for h in held), sum(h.cpu for h in held))

    def free(self, instance: Instance) -> Capacity:
        """Registered capacity minus what live leases hold (never below zero)."""
        used = self.used(instance.instance_id)
        return Capacity(max(0.0, instance.share - used.share), max(0.0, instance.cpu - used.cpu))

    def alive(self, instance: Instance, now: float | None = None) -> bool:
        """Whether the instance's lifecycle policy still lets it serve (step 206)."""
        remaining = instance.lifecycle.remaining(self._clock() if now is None else now)
        return remaining is None or remaining > 0

    def fits(self, instance: Instance, share: float, cpu: float) -> bool:
        """Whether ``instance`` is alive and has ``share`` and ``cpu`` free."""
        return self.alive(instance) and self.free(instance).covers(share, cpu)

    def admit(self, request: LeaseRequest, cost: CostFn | None = None,
              reachable: Callable[[Instance], bool] | None = None,
              pinned: bool = False) -> Instance:
        """The instance that should serve ``request`` (a service, not a goal), or LeaseDenied.

        Only instances the CO ``reachable`` are considered. Among those that fit, the
        cheapest by ``cost`` wins when given, else the one with the most free share (then
        CPU). Nothing is reserved: :meth:`hold` does, once the lease exists. When nothing
        fits, :attr:`policy` decides (the move-service seam) — unless the CO is ``pinned``:
        it reaches only a full instance on its own network, which no new instance elsewhere
        would change.
        """
        if request.goal is not None:
            raise ValueError("admit() takes a service request; goals go through paths")
        # A secondary serves its part only, never the whole service.
        every = [i for i in self.directory.lookup(request.target)
                 if i.part != "secondary" or request.target in i.objects]
        if not every:
            raise LeaseDenied("unknown_service", f"no instance offers {request.target!r}")
        candidates = [i for i in every if reachable is None or reachable(i)]
        if pinned and not any(self.fits(i, request.share, request.cpu) for i in candidates):
            raise LeaseDenied("no_capacity", f"the instance of {request.target!r} on the CO's "
                              "own network is full, and the CO reaches no other")
        fitting = [i for i in candidates if self.fits(i, request.share, request.cpu)]
        if fitting:
            return min(fitting, key=self._ranking(cost))
        reason, detail = self._why_not(request, candidates)
        decision = self.policy.on_refusal(request, self.directory, self, reason, detail)
        if decision.grow_from is not None:
            raise NeedsGrowth(decision.grow_from, decision.detail or detail)
        if decision.instance is not None and self.fits(decision.instance, request.share,
                                                        request.cpu):
            log.info("policy placed %s on %s", request.target, decision.instance.instance_id)
            return decision.instance
        raise LeaseDenied(decision.reason or reason, decision.detail or detail)

    def hold(self, lease_id: str, instance: Instance, share: float, cpu: float) -> None:
        """Reserve ``share`` and ``cpu`` of ``instance`` for ``lease_id`` (checked again)."""
        if lease_id in self._held:
            raise ValueError(f"lease {lease_id[:6]}… already holds resources")
        if not self.fits(instance, share, cpu):
            raise LeaseDenied("no_capacity", f"{instance.instance_id} no longer has "
                                             f"{share:g}% and {cpu:g} CPU free")
        self._held[lease_id] = Held(instance.instance_id, share, cpu)

    def move(self, lease_id: str, instance: Instance) -> None:
        """What ``lease_id`` holds moves to ``instance`` (a duplicate took it over), even
        beyond its capacity: the lease exists and its CO now reaches only that instance."""
        held = self._held.get(lease_id)
        if held is not None:
            self._held[lease_id] = Held(instance.instance_id, held.share, held.cpu)

    def release(self, lease_id: str) -> Held | None:
        """Give back what ``lease_id`` held (step 230); idempotent, None if nothing was held."""
        return self._held.pop(lease_id, None)

    def leases_on(self, instance_id: str) -> list[str]:
        return [lid for lid, h in self._held.items() if h.instance_id == instance_id]

    def snapshot(self) -> list[dict[str, Any]]:
        """Per instance: capacity, used and free share and CPU, alive."""
        rows = []
        for instance in sorted(self.directory, key=lambda i: i.instance_id):
            used, free = self.used(instance.instance_id), self.free(instance)
            rows.append({"instance_id": instance.instance_id, "service": instance.service,
                         "share": instance.share, "cpu": instance.cpu,
                         "used_share": round(used.share, 6), "used_cpu": round(used.cpu, 6),
                         "free_share": round(free.share, 6), "free_cpu": round(free.cpu, 6),
                         "alive": self.alive(instance)})
        return rows

    def _ranking(self, cost: CostFn | None) -> Callable[[Instance], tuple]:
        def most_free(instance: Instance) -> tuple:
            free = self.free(instance)
            return (-free.share, -free.cpu, instance.instance_id)

        if cost is None:
            return most_free
        return lambda instance: (cost(instance), *most_free(instance))

    def _why_not(self, request: LeaseRequest, candidates: list[Instance]) -> tuple[str, str]:
        alive = [i for i in candidates if self.alive(i)]
        if not alive:
            return "policy", f"every instance of {request.target!r} has reached the end of " \
                             "its lifecycle policy"
        best = max(alive, key=lambda i: (self.free(i).share, self.free(i).cpu))
        free = self.free(best)
        return "no_capacity", (f"no instance of {request.target!r} has {request.share:g}% and "
                               f"{request.cpu:g} CPU free (most free: {best.instance_id} with "
                               f"{free.share:g}% and {free.cpu:g} CPU)")
