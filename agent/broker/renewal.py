"""The CO's side of leasing: Jini's ``LeaseRenewalManager``, as pure logic on a clock.

A CO that wants a service for ten minutes, or until it says stop, must keep renewing leases
the broker grants for at most ``max_s`` each. This module decides *when* and *for how long*;
the caller sends the renewals. It follows net.jini.lease.LeaseRenewalManager:

* ``renew_for`` / ``renew_until`` put a lease under management with a desired expiration
  (``math.inf``: forever) and a renewal duration (``"any"`` or seconds, never asking past the
  desired expiration);
* :meth:`due` lists the leases to renew now: once ``fraction`` (2/3) of the granted duration
  has passed, or less than ``margin_s`` remains, whichever comes first;
* :meth:`renewed` records a grant. The new local expiration counts from when the renewal was
  *sent*, not received, so the CO never believes in a lease the broker has already ended;
* :meth:`failed`: a definite failure (the broker said UnknownLease or denied) drops the lease
  and tells the listener; an indefinite one (timeout, network) retries after ``retry_s``
  until the lease expires — then the listener hears of that;
* a lease whose desired expiration is reached leaves management; :meth:`finished` says which,
  and whether to cancel it (``cancel_at_end``) or let it expire on its own.

:meth:`run` drives all this over injected ``renew``, ``cancel`` and ``sleep`` coroutines.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from agent.broker.errors import BrokerError
from agent.broker.leases import ANY, Duration, check_duration

log = logging.getLogger(__name__)

Clock = Callable[[], float]
FOREVER = math.inf


class LeaseExpired(Exception):
    """A managed lease ran out before its desired expiration (renewals kept failing)."""


@dataclass
class ManagedLease:
    """A lease under management; times on the CO's clock. ``payload`` is the caller's (the
    hop of a grant, say), handed back with every renewal, ending and failure."""

    lease_id: str
    granted_s: float
    granted_at: float
    desired_expiration: float = FOREVER
    renew_duration: Duration = ANY
    cancel_at_end: bool = False
    payload: Any = None
    in_flight: bool = False
    retry_at: Optional[float] = None

    @property
    def expires_at(self) -> float:
        return self.granted_at + self.granted_s

    @property
    def coasting(self) -> bool:
        """The lease already lasts to the desired expiration: no renewal needed."""
        return self.expires_at >= self.desired_expiration

    def renew_at(self, fraction: float, margin_s: float) -> float:
        """When to renew: ``fraction`` of the grant gone or ``margin_s`` left, if earlier."""
        at = min(self.granted_at + fraction * self.granted_s, self.expires_at - margin_s)
        at = max(at, self.granted_at)
        return at if self.retry_at is None else max(at, self.retry_at)


@dataclass(frozen=True)
class Renewal:
    """One renewal for the caller to send: ``lease.renew(duration)``, sent at ``asked_at``."""

    lease: ManagedLease
    duration: Duration
    asked_at: float

    @property
    def lease_id(self) -> str:
        return self.lease.lease_id


@dataclass(frozen=True)
class Ending:
    """A lease leaving management: ``cancel`` it, or let it expire (``cancel`` False)."""

    lease: ManagedLease
    cancel: bool


Listener = Callable[[ManagedLease, BaseException], None]
RenewFn = Callable[[Renewal], Awaitable[float]]
CancelFn = Callable[[ManagedLease], Awaitable[Any]]
SleepFn = Callable[[float], Awaitable[Any]]


class LeaseRenewalManager:
    """Keeps leases alive until their desired expiration; see the module docstring."""

    def __init__(self, clock: Clock = time.monotonic, listener: Listener | None = None,
                 fraction: float = 2 / 3, margin_s: float = 1.0, retry_s: float = 1.0) -> None:
        if not 0 < fraction < 1:
            raise ValueError("fraction must be in (0, 1)")
        if margin_s < 0 or retry_s <= 0:
            raise ValueError("margin_s must be >= 0 and retry_s > 0")
        self._clock = clock
        self.listener = listener
        self.fraction, self.margin_s, self.retry_s = fraction, margin_s, retry_s
        self._leases: dict[str, ManagedLease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def get(self, lease_id: str) -> ManagedLease | None:
        return self._leases.get(lease_id)

    def renew_until(self, lease_id: str, granted_s: float, desired_expiration: float = FOREVER,
                    renew_duration: Duration = ANY, *, granted_at: float | None = None,
                    cancel_at_end: bool = False, payload: Any = None) -> ManagedLease:
        """Manage ``lease_id`` (granted ``granted_s`` at ``granted_at``, default now) until
        ``desired_expiration`` on this manager's clock."""
        if granted_s <= 0 or math.isnan(desired_expiration):
            raise ValueError("granted_s must be > 0 and desired_expiration a time")
        check_duration(renew_duration, "renew_duration")
        now = self._clock() if granted_at is None else granted_at
        lease = ManagedLease(lease_id, granted_s, now, desired_expiration, renew_duration,
                             cancel_at_end, payload)
        self._leases[lease_id] = lease
        return lease

    def renew_for(self, lease_id: str, granted_s: float, desired_duration: float = FOREVER,
                  renew_duration: Duration = ANY, **kwargs: Any) -> ManagedLease:
        """Manage ``lease_id`` for ``desired_duration`` seconds from now (default: forever)."""
        return self.renew_until(lease_id, granted_s, self._clock() + desired_duration,
                                renew_duration, **kwargs)

    def remove(self, lease_id: str) -> ManagedLease | None:
        """Stop managing a lease (the caller cancelled it, say); None if not managed."""
        return self._leases.pop(lease_id, None)

    def due(self, now: float | None = None) -> list[Renewal]:
        """The renewals to send now; each lease is then in flight until renewed/failed."""
        now = self._clock() if now is None else now
        renewals = []
        for lease in self._leases.values():
            if (lease.in_flight or lease.coasting or now >= lease.expires_at
                    or now < lease.renew_at(self.fraction, self.margin_s)):
                continue
            lease.in_flight = True
            renewals.append(Renewal(lease, self._duration(lease, now), now))
        return renewals

    def renewed(self, lease_id: str, granted_s: float, sent_at: float | None = None) -> None:
        """The broker granted ``granted_s`` for the renewal sent at ``sent_at``."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return  # removed meanwhile
        lease.granted_s = granted_s
        lease.granted_at = self._clock() if sent_at is None else sent_at
        lease.in_flight, lease.retry_at = False, None

    def failed(self, lease_id: str, error: BaseException, definite: bool = True) -> None:
        """A renewal failed: drop the lease and tell the listener if ``definite``, else retry
        after ``retry_s`` (the lease may still be alive at the broker)."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        lease.in_flight = False
        if definite:
            del self._leases[lease_id]
            self._tell(lease, error)
        else:
            lease.retry_at = self._clock() + self.retry_s

    def finished(self, now: float | None = None) -> list[Ending]:
        """Remove and return the leases that leave management now: their desired expiration
        is reached (cancel them if asked to), or they expired first (the listener is told)."""
        now = self._clock() if now is None else now
        endings = []
        for lease in list(self._leases.values()):
            if now >= lease.desired_expiration:
                endings.append(Ending(lease, lease.cancel_at_end and now < lease.expires_at))
            elif now >= lease.expires_at:
                endings.append(Ending(lease, False))
                self._tell(lease, LeaseExpired(f"lease {lease.lease_id[:6]}… expired before "
                                               "it could be renewed"))
            else:
                continue
            del self._leases[lease.lease_id]
        return endings

    def next_wakeup(self, now: float | None = None) -> float | None:
        """The next instant at which :meth:`due` or :meth:`finished` may have news."""
        times = []
        for lease in self._leases.values():
            times += [lease.desired_expiration, lease.expires_at]
            if not lease.in_flight and not lease.coasting:
                times.append(lease.renew_at(self.fraction, self.margin_s))
        finite = [t for t in times if math.isfinite(t)]
        return min(finite) if finite else None

    async def run(self, renew: RenewFn, sleep: SleepFn, cancel: CancelFn | None = None,
                  idle_s: float = 1.0, until_empty: bool = True) -> None:
        """Renew until no lease is left (or forever with ``until_empty`` False).

        ``renew(renewal)`` returns the granted duration; a :class:`BrokerError` from it is a
        definite failure, anything else (timeout, OSError) an indefinite one.
        """
        while True:
            for ending in self.finished():
                if ending.cancel and cancel is not None:
                    try:
                        await cancel(ending.lease)
                    except Exception as exc:  # the lease will expire on its own anyway
                        log.info("cancel of %s… failed: %s", ending.lease.lease_id[:6], exc)
            for renewal in self.due():
                try:
                    granted = await renew(renewal)
                except BrokerError as exc:
                    self.failed(renewal.lease_id, exc, definite=True)
                except Exception as exc:
                    self.failed(renewal.lease_id, exc, definite=False)
                else:
                    self.renewed(renewal.lease_id, granted, renewal.asked_at)
            if until_empty and not self._leases:
                return
            now = self._clock()
            wake = self.next_wakeup(now)
            await sleep(idle_s if wake is None else max(0.0, wake - now))

    def _duration(self, lease: ManagedLease, now: float) -> Duration:
        """What to ask for: the renewal duration, never past the desired expiration."""
        if lease.renew_duration == ANY:
            return ANY
        return min(float(lease.renew_duration), lease.desired_expiration - now)

    def _tell(self, lease: ManagedLease, error: BaseException) -> None:
        log.info("lease %s… dropped: %s", lease.lease_id[:6], error)
        if self.listener is not None:
            self.listener(lease, error)
