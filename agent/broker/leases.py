"""Leases with Jini's semantics (net.jini.core.lease, River's FixedLeasePeriodPolicy).

Patent Fig. 12: the broker creates a lease for a corresponding object (CO) "based on the
percentage of the desired service available and the processing resources needed" (step 206),
and when the CO has finished, the resources are released (step 230). Jini gives that a
precise shape, which this module follows:

* a request names the duration it wants, or ``"any"``; the landlord's policy grants
  ``default`` for ``"any"`` and otherwise ``min(asked, maximum)`` — never longer than asked,
  never longer than the maximum (``FixedLeasePeriodPolicy.calculateDuration``);
* when the instance's lifecycle policy says how long it stays (``max_duration_s`` since it
  started running), no lease outlives it: the grant is also clipped to that remaining lifetime
  (step 206, "how long the service may be found at its present location");
* ``renew`` sets the expiration to *now* + the newly granted duration (which may be shorter
  than what was left); renewing an expired or cancelled lease is ``UnknownLease``;
* ``cancel`` ends a lease early; :meth:`LeaseTable.expire` (housekeeping) ends the leases
  that ran out. Every ending goes through one place that calls ``on_end``, so the broker's
  admission frees the share and CPU exactly once (step 230).

Lease ids are unguessable (128 random bits) and bound to the holder, the CO's credential id:
another holder's id is answered exactly like an unknown one. Pure logic on an injected clock.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Literal, Union

from agent.broker import wire
from agent.broker.errors import LeaseDenied, UnknownLease
from agent.broker.goals import Goal

log = logging.getLogger(__name__)

Clock = Callable[[], float]
#: Jini's ``Lease.ANY``: "grant whatever you see fit" (the policy's default).
ANY: Literal["any"] = "any"
Duration = Union[float, Literal["any"]]
#: Why a lease ended, as passed to ``on_end`` and shown by ``moat show leases``.
EndReason = Literal["cancelled", "expired", "instance_removed", "rolled_back"]

MAX_SHARE = 100.0
MAX_CPU = 1024.0
#: Longest duration a request may even name (a year); the policy clips far below this.
MAX_REQUEST_S = 365 * 86400.0


def check_duration(value: Any, what: str = "duration") -> Duration:
    """A requested duration from the wire: ``"any"`` or a finite number of seconds > 0."""
    if value == ANY and isinstance(value, str):
        return ANY
    return wire.check_number(value, what, gt=0, le=MAX_REQUEST_S)


@dataclass(frozen=True)
class LeasePolicy:
    """River's ``FixedLeasePeriodPolicy`` plus a cap on leases per holder.

    ``default_s`` is granted for ``"any"``; ``max_s`` bounds every grant and renewal;
    ``max_leases_per_holder`` keeps one CO from holding the whole table (``policy`` denial).
    """

    default_s: float = 60.0
    max_s: float = 300.0
    max_leases_per_holder: int = 64

    def __post_init__(self) -> None:
        wire.check_number(self.max_s, "max_s", gt=0)
        wire.check_number(self.default_s, "default_s", gt=0, le=self.max_s)
        if self.max_leases_per_holder < 1:
            raise ValueError("max_leases_per_holder must be >= 1")

    def grant(self, requested: Duration, limit_s: float | None = None) -> float:
        """The duration granted for ``requested``: default for ANY, else min(asked, max),
        and never beyond ``limit_s`` (the instance's remaining lifetime) when given.

        Raises ``LeaseDenied("policy")`` when that lifetime is already over.
        """
        granted = self.default_s if requested == ANY else min(float(requested), self.max_s)
        if limit_s is not None:
            if limit_s <= 0:
                raise LeaseDenied("policy", "the instance's lifecycle policy has run out")
            granted = min(granted, limit_s)
        return granted


@dataclass(frozen=True)
class LeaseRequest:
    """What a CO asks for (patent step 202/206): a service or a goal, a share of it (percent,
    0 < share <= 100), the CPU behind that share (cores, > 0) and a duration or ``"any"``."""

    target: str
    share: float
    cpu: float
    duration: Duration = ANY

    def __post_init__(self) -> None:
        if Goal.is_goal(self.target):
            Goal.parse(self.target)
        else:
            wire.check_name(self.target, "service")
        wire.check_number(self.share, "share", gt=0, le=MAX_SHARE)
        wire.check_number(self.cpu, "cpu", gt=0, le=MAX_CPU)
        check_duration(self.duration)

    @property
    def goal(self) -> Goal | None:
        """The goal when the target is one ("text -> rtf"), else None (a plain service)."""
        return Goal.parse(self.target) if Goal.is_goal(self.target) else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> "LeaseRequest":
        doc = wire.as_mapping(doc, "lease request")
        wire.only_keys(doc, {"target", "share", "cpu", "duration"}, "lease request")
        return cls(
            target=wire.text(doc, "target", "lease request", max_len=260),
            share=wire.number(doc, "share", "lease request", gt=0, le=MAX_SHARE),
            cpu=wire.number(doc, "cpu", "lease request", gt=0, le=MAX_CPU),
            duration=check_duration(doc.get("duration", ANY), "lease request.duration"),
        )


@dataclass
class Lease:
    """One granted lease: who holds what share and CPU of which instance, until when.

    Times are on the broker's clock (monotonic); the CO sees durations, never these instants.
    ``group`` ties the per-hop leases of one path grant together (for display).
    """

    lease_id: str
    holder: str
    service: str
    instance: str
    share: float
    cpu: float
    granted_s: float
    granted_at: float
    expires_at: float
    group: str = ""
    #: The LAN prefix the CO asked from (""; unknown): a CO on a network where an instance
    #: runs reaches only that instance, so a duplicate started there takes its leases over.
    co_network: str = ""
    #: What the CO asked for (a service or one of its objects): the hop goes to its address.
    target: str = ""

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at - now)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        d = asdict(self)
        if now is not None:
            d["remaining"] = round(self.remaining(now), 3)
        return d


class LeaseTable:
    """The landlord: grants, renews, cancels and expires leases (Jini ``Landlord``).

    ``on_end(lease, why)`` is called once for every lease that ends, whatever the cause;
    the broker frees admission there. ``new_id`` makes the unguessable ids (tests may inject).
    """

    def __init__(
        self,
        policy: LeasePolicy | None = None,
        clock: Clock = time.monotonic,
        on_end: Callable[[Lease, EndReason], None] | None = None,
        new_id: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self.policy = policy or LeasePolicy()
        self._clock = clock
        self._on_end = on_end
        self._new_id = new_id
        self._leases: dict[str, Lease] = {}

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._leases.values()))

    def __len__(self) -> int:
        return len(self._leases)

    def held_by(self, holder: str) -> list[Lease]:
        return [lease for lease in self._leases.values() if lease.holder == holder]

    def on_instance(self, instance: str) -> list[Lease]:
        return [lease for lease in self._leases.values() if lease.instance == instance]

    def grant(self, holder: str, service: str, instance: str, share: float, cpu: float,
              requested: Duration, limit_s: float | None = None, group: str = "",
              co_network: str = "", target: str = "") -> Lease:
        """A new lease for ``holder`` on ``instance`` (capacity is admission's business)."""
        if not holder:
            raise LeaseDenied("bad_credentials", "the request names no holder")
        if len(self.held_by(holder)) >= self.policy.max_leases_per_holder:
            raise LeaseDenied("policy", f"holder has {self.policy.max_leases_per_holder} "
                                        "leases already")
        granted = self.policy.grant(check_duration(requested), limit_s)
        now = self._clock()
        lease_id = self._new_id()
        if lease_id in self._leases:  # 128 random bits: only a broken new_id gets here
            raise RuntimeError("lease id collision")
        lease = Lease(lease_id, holder, service, instance, share, cpu, granted, now,
                      now + granted, group, co_network, target)
        self._leases[lease_id] = lease
        log.debug("granted %s on %s to %s for %.1fs", service, instance, holder, granted)
        return lease

    def get(self, lease_id: str, holder: str) -> Lease:
        """The live lease ``lease_id`` of ``holder``; UnknownLease otherwise.

        A lease found past its expiration (housekeeping has not run yet) is ended here, so
        it is released now and never renewed back to life.
        """
        lease = self._leases.get(lease_id) if isinstance(lease_id, str) else None
        if lease is None or lease.holder != holder:
            raise UnknownLease()
        if lease.expires_at <= self._clock():
            self._end(lease, "expired")
            raise UnknownLease()
        return lease

    def renew(self, lease_id: str, holder: str, requested: Duration = ANY,
              limit_s: float | None = None) -> Lease:
        """Jini ``Lease.renew``: expiration = now + the newly granted duration."""
        lease = self.get(lease_id, holder)
        granted = self.policy.grant(check_duration(requested), limit_s)
        now = self._clock()
        lease.granted_s, lease.granted_at, lease.expires_at = granted, now, now + granted
        return lease

    def cancel(self, lease_id: str, holder: str) -> Lease:
        """Jini ``Lease.cancel``: end the lease now and release what it held."""
        lease = self.get(lease_id, holder)
        self._end(lease, "cancelled")
        return lease

    def end(self, lease_id: str, why: EndReason) -> Lease | None:
        """End a lease on the landlord's own initiative (its instance left); None if gone."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            self._end(lease, why)
        return lease

    def expire(self, now: float | None = None) -> list[Lease]:
        """End and return every lease whose expiration has passed (call from housekeeping)."""
        now = self._clock() if now is None else now
        gone = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in gone:
            self._end(lease, "expired")
        return gone

    def on_instance_from(self, service: str, co_network: str, other_than: str) -> list[Lease]:
        """Live leases of ``service`` asked from ``co_network`` on another instance than
        ``other_than``."""
        return [lease for lease in self._leases.values() if lease.service == service
                and lease.co_network == co_network and lease.instance != other_than]

    def reassign(self, lease_id: str, instance: str) -> None:
        """The lease is served by ``instance`` from now on (its renewals name it)."""
        self._leases[lease_id].instance = instance

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [lease.as_dict(now) for lease in self._leases.values()]

    def _end(self, lease: Lease, why: EndReason) -> None:
        if self._leases.pop(lease.lease_id, None) is None:
            return
        log.debug("lease %s… of %s on %s %s", lease.lease_id[:6], lease.holder,
                  lease.instance, why)
        if self._on_end is not None:
            self._on_end(lease, why)

