"""The service broker (patent Fig. 12): directory, admission, leases, credentials and paths.

A facade with no I/O: the network role (next issue) decodes messages, calls these methods
and encodes what they return or raise. The flow of one request (steps 202-208):

1. the target is a service (looked up by service or object name, step 204) or a goal
   ``"text -> rtf"`` met by a dynamic service path (step 202, :mod:`agent.broker.paths`);
2. admission picks an instance with the share and CPU free (step 208), or the path hides the
   hops that cannot fit;
3. per hop a lease (clipped by the lease policy and the instance's lifecycle, step 206), the
   share and CPU held for it, and a service credential (Fig. 10, 164) for the object.

**One lease per hop**, not one lease for the whole path: each hop is a different instance,
often on a different router, with its own capacity to free (step 230), its own lifecycle
limit (so the hops' granted durations may differ), and its own object verifying credentials
under its own service's key. Leases of one request share a ``group`` id; the grant's useful
duration is the shortest hop's. Renewing and cancelling are per lease, as in Jini, and the
CO's :class:`~agent.broker.renewal.LeaseRenewalManager` renews them side by side.

Every ending (cancel, expiry, instance removed) goes through one callback that frees
admission; an early one (cancel, removal) also revokes the lease's credential until it
would have expired, and :attr:`Broker.revocations` is what the role pushes to objects.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

from agent.broker import wire
from agent.broker.admission import Admission, AdmissionPolicy
from agent.broker.credentials import Claims, RevocationList, ServiceKeys, issue
from agent.broker.directory import Instance, ServiceDirectory
from agent.broker.errors import BadRequest, BrokerError, LeaseDenied, NeedsGrowth, UnknownLease
from agent.broker.leases import ANY, Duration, EndReason, Lease, LeasePolicy, LeaseRequest, \
    LeaseTable
from agent.broker.paths import plan

log = logging.getLogger(__name__)

Clock = Callable[[], float]
#: The measured cost between a CO's network (None: unknown) and an instance.
NetworkCost = Callable[[str | None, Instance], float]
#: Revocations outlive the credential by this much, for the rounding of expiry to ms.
REVOKE_MARGIN_S = 1.0
#: A duplicate that has held no lease for this long since it started is released.
IDLE_DUPLICATE_S = 20.0


@dataclass(frozen=True)
class HopGrant:
    """One hop of a grant as the CO receives it: where the instance is, the credential to
    present there, and the lease behind it (duration; ``expires_at`` on the wall clock)."""

    service: str
    instance: str
    address: str
    port: int
    credential: str
    lease_id: str
    granted_s: float
    expires_at: float
    consumes: str = ""
    produces: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Any) -> "HopGrant":
        what = "hop"
        doc = wire.as_mapping(doc, what)
        wire.only_keys(doc, set(cls.__dataclass_fields__), what)
        return cls(
            service=wire.name(doc, "service", what),
            instance=wire.name(doc, "instance", what),
            address=wire.text(doc, "address", what, max_len=64),
            port=wire.integer(doc, "port", what, lo=1, hi=65535),
            credential=wire.text(doc, "credential", what, max_len=1024),
            lease_id=wire.text(doc, "lease_id", what, max_len=128),
            granted_s=wire.number(doc, "granted_s", what, gt=0),
            expires_at=wire.number(doc, "expires_at", what, ge=0),
            consumes=wire.text(doc, "consumes", what, default="", max_len=128),
            produces=wire.text(doc, "produces", what, default="", max_len=128),
        )


@dataclass(frozen=True)
class Grant:
    """The answer to a request: the hops in order (one for a plain service)."""

    target: str
    group: str
    hops: tuple[HopGrant, ...]

    @property
    def granted_s(self) -> float:
        """How long the whole grant is good for: its shortest lease."""
        return min(h.granted_s for h in self.hops)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "group": self.group,
                "hops": [h.as_dict() for h in self.hops]}

    @classmethod
    def from_dict(cls, doc: Any) -> "Grant":
        doc = wire.as_mapping(doc, "grant")
        wire.only_keys(doc, {"target", "group", "hops"}, "grant")
        hops = doc.get("hops")
        if not isinstance(hops, list) or not 1 <= len(hops) <= 32:
            raise BadRequest("grant.hops must be a list of 1 to 32 hops")
        return cls(wire.text(doc, "target", "grant", max_len=260),
                   wire.text(doc, "group", "grant", max_len=64),
                   tuple(HopGrant.from_dict(h) for h in hops))


class Broker:
    """Directory + admission + leases + credentials + paths, on injected clocks.

    ``clock`` (monotonic) times leases; ``wall_clock`` dates credentials, which objects on
    other hosts check against their own wall clocks.
    """

    def __init__(
        self,
        lease_policy: LeasePolicy | None = None,
        admission_policy: AdmissionPolicy | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        network_cost: NetworkCost | None = None,
        network_of: Callable[[str | None], str] | None = None,
        keys: ServiceKeys | None = None,
        new_id: Callable[[], str] = lambda: secrets.token_hex(16),
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._network_cost = network_cost or (lambda co_network, instance: 0.0)
        #: A CO's address -> its LAN prefix ("" unknown), for reachability and adoption.
        self._network_of = network_of or (lambda address: "")
        self.directory = ServiceDirectory()
        self.admission = Admission(self.directory, admission_policy, clock)
        self.table = LeaseTable(lease_policy, clock, self._on_end, new_id)
        self.keys = keys or ServiceKeys()
        self.revocations = RevocationList()
        #: Revocations not yet told to the instances' routers (see :meth:`take_revocations`).
        self._outbox: list[dict[str, Any]] = []
        #: Duplicates left without a lease, not yet told to their routers (step 230).
        self._releases: list[dict[str, Any]] = []
        #: When each instance joined the directory (broker clock), for idle duplicates.
        self._joined: dict[str, float] = {}
        self.stats: Counter[str] = Counter()

    # --- instances ------------------------------------------------------------------------

    def register_instance(self, instance: Instance) -> bytes:
        """Add (or update) an instance; return its service's key, for the role to give it.

        A new instance on a network takes over the leases its service granted to COs on
        that network (their foreign agent now delivers the home address to it, so only it
        receives their requests): their share and CPU move to it and their renewals name it.
        """
        old = self.directory.register(instance)
        self._joined.setdefault(instance.instance_id, self._clock())
        if old is None and instance.network and instance.part == "duplicate" \
                and (instance.gateway or not self._gateway_on(instance)):
            self._adopt(instance)
        return self.keys.key(instance.service)

    def register_from(self, doc: Any) -> bytes:
        """:meth:`register_instance` for a registration from the wire."""
        return self.register_instance(Instance.from_dict(doc, self._clock()))

    def remove_instance(self, instance_id: str) -> list[Lease]:
        """An instance leaves (VM retired, moved): end and revoke its leases, return them."""
        ended = [lease for lease in self.table.on_instance(instance_id)
                 if self.table.end(lease.lease_id, "instance_removed") is not None]
        self.directory.remove(instance_id)
        self._joined.pop(instance_id, None)
        return ended

    def service_key(self, service: str) -> bytes:
        return self.keys.key(service)

    # --- leases ---------------------------------------------------------------------------

    def request(self, holder: str, target: str, share: float, cpu: float,
                duration: Duration = ANY, co_network: str | None = None) -> Grant:
        """Grant ``holder`` ``share`` % and ``cpu`` cores of a service or goal, or raise
        LeaseDenied (BadRequest for malformed arguments)."""
        try:
            self._check_holder(holder)
            req = LeaseRequest(target, share, cpu, duration)
            instances = self._place(req, co_network)
            grant = self._lease_all(holder, req, instances, self._network_of(co_network))
        except NeedsGrowth:
            raise  # not a refusal yet: the role grows the service and asks again
        except LeaseDenied as exc:
            self.stats[f"denied_{exc.reason}"] += 1
            raise
        self.stats["granted"] += 1
        return grant

    def request_from(self, holder: str, doc: Any, co_network: str | None = None) -> Grant:
        """:meth:`request` for a request from the wire (:meth:`LeaseRequest.from_dict`)."""
        req = LeaseRequest.from_dict(doc)
        return self.request(holder, req.target, req.share, req.cpu, req.duration, co_network)

    def renew(self, lease_id: str, holder: str, duration: Duration = ANY) -> HopGrant:
        """Jini renew: expiration = now + newly granted (clipped by policy and lifecycle);
        a new credential carries the new expiry. UnknownLease if not live for ``holder``."""
        lease = self.table.get(lease_id, holder)
        instance = self.directory.get(lease.instance)
        if instance is None:  # cannot happen: removal ends its leases; fail closed anyway
            raise UnknownLease()
        self.table.renew(lease_id, holder, duration, instance.lifecycle.remaining(self._clock()))
        self.stats["renewed"] += 1
        return self._hop(lease, instance)

    def cancel(self, lease_id: str, holder: str) -> Lease:
        """End a lease now; its share and CPU are free again and its credential revoked."""
        return self.table.cancel(lease_id, holder)

    def expire(self, now: float | None = None) -> list[Lease]:
        """Housekeeping: end leases that ran out, prune revocations past their expiry, and
        release duplicates that no lease has reached for :data:`IDLE_DUPLICATE_S` (one
        placed near the traffic before any lease wanted it)."""
        ended = self.table.expire(now)
        self.revocations.prune(self._wall())
        now = self._clock() if now is None else now
        for instance in list(self.directory):
            since = self._joined.get(instance.instance_id)
            if instance.part != "primary" and since is not None \
                    and now - since >= IDLE_DUPLICATE_S:
                self._release_if_idle(instance.instance_id)
        return ended

    def take_releases(self) -> list[dict[str, Any]]:
        """Duplicates whose last lease ended since the last call (``instance_id``,
        ``router_address``): already out of the directory; the network role tells their
        routers to stop them, which deletes their bindings (Fig. 12, step 230)."""
        out, self._releases = self._releases, []
        return out

    def take_revocations(self) -> list[dict[str, Any]]:
        """Leases cancelled since the last call, each with its instance's service and address:
        what the network role tells the instances' routers (an instance that left needs no
        telling)."""
        out, self._outbox = self._outbox, []
        return out

    # --- snapshots ------------------------------------------------------------------------

    def leases(self) -> list[dict[str, Any]]:
        """For ``moat show leases --json``."""
        return sorted(self.table.snapshot(), key=lambda d: (d["instance"], d["expires_at"]))

    def services(self) -> list[dict[str, Any]]:
        """For ``moat show services --json``: the directory with each instance's usage."""
        usage = {row["instance_id"]: row for row in self.admission.snapshot()}
        described = self.directory.describe(self._clock())
        for service in described:
            for inst in service["instances"]:
                row = usage[inst["instance_id"]]
                inst.update({k: row[k] for k in ("used_share", "used_cpu", "free_share",
                                                 "free_cpu", "alive")})
                inst["leases"] = len(self.admission.leases_on(inst["instance_id"]))
        return described

    # --- internals ------------------------------------------------------------------------

    @staticmethod
    def _check_holder(holder: Any) -> None:
        if not isinstance(holder, str) or not wire.NAME_RE.fullmatch(holder):
            raise LeaseDenied("bad_credentials", "the request carries no valid holder id")

    def _place(self, req: LeaseRequest, co_network: str | None) -> list[Instance]:
        """The instances that will serve ``req``: one, or one per hop of a path."""
        def cost(instance: Instance) -> float:
            return self._network_cost(co_network, instance)

        goal = req.goal
        if goal is None:
            reachable, pinned = self.reachable(co_network, req.target)
            return [self.admission.admit(req, cost, reachable, pinned)]
        return plan(goal, self.directory.converters(),
                    lambda i: self.admission.fits(i, req.share, req.cpu), cost)

    def _lease_all(self, holder: str, req: LeaseRequest, instances: list[Instance],
                   co_network: str = "") -> Grant:
        """A lease, a reservation and a credential per instance; all or nothing."""
        group = secrets.token_hex(8)
        granted: list[Lease] = []
        try:
            hops = []
            for instance in instances:
                limit = instance.lifecycle.remaining(self._clock())
                lease = self.table.grant(holder, instance.service, instance.instance_id,
                                         req.share, req.cpu, req.duration, limit, group,
                                         co_network, req.target if req.goal is None else "")
                granted.append(lease)
                self.admission.hold(lease.lease_id, instance, req.share, req.cpu)
                hops.append(self._hop(lease, instance))
        except BrokerError:
            for lease in granted:
                self.table.end(lease.lease_id, "rolled_back")
            raise
        return Grant(req.target, group, tuple(hops))

    def _hop(self, lease: Lease, instance: Instance) -> HopGrant:
        expires = self._wall() + lease.granted_s
        claims = Claims(lease.lease_id, instance.service, instance.instance_id, expires,
                        lease.holder)
        return HopGrant(instance.service, instance.instance_id, instance.address_of(lease.target),
                        instance.port, issue(claims, self.keys.key(instance.service)),
                        lease.lease_id, lease.granted_s, expires, instance.consumes,
                        instance.produces)

    def _on_end(self, lease: Lease, why: EndReason) -> None:
        """Every ending frees admission (step 230); an early one revokes the credential."""
        self.admission.release(lease.lease_id)
        self.stats[why] += 1
        remaining = lease.remaining(self._clock())
        if why in ("cancelled", "instance_removed") and remaining > 0:
            until = self._wall() + remaining + REVOKE_MARGIN_S
            self.revocations.revoke(lease.lease_id, until)
            instance = self.directory.get(lease.instance)
            if why == "cancelled" and instance is not None:
                self._outbox.append({"lease_id": lease.lease_id, "until": until,
                                     "service": instance.service,
                                     # its router, not a home address all instances share
                                     "address": instance.router_address or instance.address})
        log.info("lease %s… of %s on %s ended: %s", lease.lease_id[:6], lease.holder,
                 lease.instance, why)
        if why != "instance_removed":  # the CO finished with it (steps 220-226)
            self._release_if_idle(lease.instance)

    def _gateway_on(self, instance: Instance) -> bool:
        """Whether another instance on ``instance``'s network, at the same address, runs on
        that network's FOA (it, not ``instance``, receives the network's requests)."""
        return any(i.gateway for i in self.directory.lookup(instance.service)
                   if i.instance_id != instance.instance_id and i.network == instance.network
                   and i.address == instance.address)

    def _adopt(self, instance: Instance) -> None:
        same_address = {i.instance_id for i in self.directory.lookup(instance.service)
                        if i.address == instance.address}
        for lease in self.table.on_instance_from(instance.service, instance.network,
                                                 instance.instance_id):
            if lease.instance not in same_address:
                continue
            self.admission.move(lease.lease_id, instance)
            log.info("lease %s… of %s (on %s) moves to %s on its network", lease.lease_id[:6],
                     lease.holder, lease.instance, instance.instance_id)
            self.table.reassign(lease.lease_id, instance.instance_id)
            self.stats["adopted"] += 1

    def reachable(self, co_address: str | None,
                  service: str) -> tuple[Callable[[Instance], bool] | None, bool]:
        """Which instances of ``service`` a CO at ``co_address`` reaches: the one on its own
        network if there is one (its foreign agent delivers the home address there), else
        every instance (its requests reach the home network, where the HOA bicasts): None.
        And whether the CO is *pinned*: an instance on its network answers on the movable
        primary's own address, so no new instance elsewhere would reach it."""
        network = self._network_of(co_address)
        instances = self.directory.lookup(service)
        local = [i for i in instances if network and i.network == network]
        if not local:
            return None, False
        # What the CO sends to: the target's address (a part's own, or the object's).
        address = {i.instance_id: i.address_of(service) for i in instances}
        # Per address that an instance on the CO's network answers on, the instance(s) the
        # network delivers it to: the one on its FOA's own router if there is one.
        reached: dict[str, set[str]] = {}
        for a in {address[i.instance_id] for i in local}:
            here = [i for i in local if address[i.instance_id] == a]
            reached[a] = {i.instance_id for i in [i for i in here if i.gateway] or here}

        def reaches(instance: Instance) -> bool:
            a = address.get(instance.instance_id, instance.address)
            return a not in reached or instance.instance_id in reached[a]

        # Pinned: the CO's network delivers the object's home address itself (no duplicate
        # elsewhere would reach it). A part's address is the object's router's to forward.
        movable = {i.address for i in instances if i.movable}
        return reaches, bool(set(reached) & movable)

    def _release_if_idle(self, instance_id: str) -> None:
        """A duplicate exists for its leases only: with none left it leaves the directory
        (no new lease lands on it) and goes into the release outbox. The primary stays."""
        instance = self.directory.get(instance_id)
        if instance is None or instance.part == "primary" or not instance.router_address:
            return
        if self.admission.leases_on(instance_id):
            return
        self.directory.remove(instance_id)
        self._joined.pop(instance_id, None)
        self._releases.append({"instance_id": instance_id,
                               "router_address": instance.router_address})
        self.stats["released"] += 1
        log.info("duplicate %s holds no lease: released", instance_id)
