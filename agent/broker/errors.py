"""Typed errors of the service broker, each with a machine-readable ``reason`` code.

The network role turns any of these into an answer with :meth:`BrokerError.as_dict`, so a
corresponding object (CO) learns *why* it was refused (patent Fig. 12, step 208) without
parsing prose. ``detail`` is for people and logs; ``reason`` is the contract.
"""

from __future__ import annotations

from typing import ClassVar


class BrokerError(Exception):
    """Base class: a ``reason`` from :attr:`REASONS` and a human ``detail``."""

    REASONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"{type(self).__name__}: unknown reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def as_dict(self) -> dict[str, str]:
        """The error as it goes on the wire."""
        return {"error": type(self).__name__, "reason": self.reason, "detail": self.detail}


class BadRequest(BrokerError, ValueError):
    """A message from the wire whose fields have the wrong type or range."""

    REASONS = frozenset({"bad_request"})

    def __init__(self, detail: str) -> None:
        super().__init__("bad_request", detail)


class LeaseDenied(BrokerError):
    """The broker will not grant (or move) a lease (patent Fig. 12, steps 206-208).

    ``no_capacity``: no instance has the share and CPU asked for; ``unknown_service``: no
    instance offers the service, or no chain of services reaches the goal; ``bad_credentials``:
    the holder is not identified; ``policy``: the lease or lifecycle policy forbids it (the
    instance's lifetime is over, the holder has too many leases).
    """

    REASONS = frozenset({"no_capacity", "unknown_service", "bad_credentials", "policy"})


class UnknownLease(BrokerError):
    """Jini's ``UnknownLeaseException``: no live lease with this id *for this holder*.

    Raised alike for an id never issued, a lease that expired or was cancelled, and another
    holder's lease, so the answer tells a prober nothing (no oracle).
    """

    REASONS = frozenset({"unknown_lease"})

    def __init__(self, detail: str = "no such lease") -> None:
        super().__init__("unknown_lease", detail)


class CredentialError(BrokerError):
    """A service credential (patent Fig. 10, 164) that an object must not honour.

    ``missing``: no token; ``forged``: malformed, or the MAC does not verify (including any
    tampered field such as the expiry); ``expired``; ``revoked``: its lease was cancelled;
    ``wrong_service`` / ``wrong_instance``: issued for another service or instance.
    """

    REASONS = frozenset({"missing", "forged", "expired", "revoked", "wrong_service",
                         "wrong_instance"})


class NeedsGrowth(LeaseDenied):
    """No instance can take the lease, and the admission policy chose to grow the service
    from :attr:`instance` (its primary, Fig. 12 step 208 → 210). The network role asks that
    instance's router to place a duplicate, then asks admission again; if it cannot, the CO
    is refused ``no_capacity`` with why."""

    def __init__(self, instance: object, detail: str = "") -> None:
        super().__init__("no_capacity", detail)
        self.instance = instance
