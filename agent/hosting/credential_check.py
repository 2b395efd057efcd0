"""The object's own check of service credentials (patent Fig. 10, 164).

A leased object (its VM's PROVISION said ``"leased": true``) serves only requests carrying a
credential the broker issued with a lease; :mod:`agent.hosting.runner` asks this module on
every request. The key comes from the router over the object channel, never on the wire.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from typing import Any, Callable

#: What an instance may be of its service (patent Fig. 6).
PARTS = ("primary", "duplicate", "secondary")
#: Key lengths accepted for a service key (a derived key is 32 bytes: HMAC-SHA-256).
MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 64


class CredentialCheck:
    """The object's check of service credentials (patent Fig. 10, 164; Fig. 12 step 210).

    One service key and instance, set by the router (``credentials``), and the revocation
    list the broker's LEASE_REVOKEs feed (``revoke``). Without a key every credential reads
    ``forged``: a leased object never serves before its router has configured it.
    The broker's credential module is imported only here, so an open object does not load it.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        from agent.broker.credentials import RevocationList, Verifier

        self.service = ""
        self.instance = ""
        self.part = "primary"
        #: The LANs of this instance's router: a CO there reaches this instance only.
        self.networks: list[Any] = []
        self.aliases: set[str] = set()
        self.local_siblings = 0
        self.revocations = RevocationList()
        self.verifier = Verifier({}, self.revocations, clock=clock)
        self.refused: Counter[str] = Counter()
        self.accepted = 0

    def configure(self, service: Any, instance: Any, key_hex: Any, part: Any = "primary",
                  networks: Any = (), aliases: Any = ()) -> None:
        """Take the service key (hex) for ``service`` and this ``instance`` (a ``part`` of
        the service: primary, duplicate or secondary) on a router whose LANs are
        ``networks``; ValueError (the RPC's refusal) for anything malformed."""
        from agent.broker import wire

        wire.check_name(service, "service")
        wire.check_name(instance, "instance")
        if not isinstance(key_hex, str) or not MIN_KEY_BYTES * 2 <= len(key_hex) <= MAX_KEY_BYTES * 2:
            raise ValueError(f"key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes in hex")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}")
        if not isinstance(networks, (list, tuple)) or len(networks) > 16:
            raise ValueError("networks must be a list of at most 16 prefixes")
        self.networks = [ipaddress.ip_network(str(n)) for n in networks]
        if not isinstance(aliases, (list, tuple)) or len(aliases) > 4:
            raise ValueError("aliases must be a list of at most 4 instance ids")
        for alias in aliases:
            wire.check_name(alias, "alias")
        self.aliases = set(aliases)
        key = bytes.fromhex(key_hex)
        self.service, self.instance, self.part = service, instance, part
        self.verifier.keys = {service: key}

    def revoke(self, doc: Any) -> int:
        """Add cancelled leases (``{"revoked": [{"lease_id", "until"}]}``, checked), forget
        those past their credentials' expiry; return how many are held."""
        from agent.broker.credentials import RevocationList

        self.revocations.merge(RevocationList.from_dict(doc))
        self.revocations.prune(time.time())
        return len(self.revocations)

    def refusal(self, token: Any, source: str | None = None) -> str | None:
        """None if ``token`` is a valid credential for this service and instance, else the
        reason (:class:`agent.broker.errors.CredentialError`).

        A valid credential naming another instance of the service is honoured when the
        request comes from this router's own network (``source``): a CO there reaches only
        this instance (its foreign agent delivers the home address here), so it is this
        instance's to answer — the broker moved that lease here when this instance started.
        From anywhere else it came through the HOA's bicast, and the named sibling answers."""
        from agent.broker.errors import CredentialError

        try:
            self.verifier.verify(token, self.service or "-", instance=self.instance or None)
        except CredentialError as exc:
            if exc.reason != "wrong_instance":
                return exc.reason
            try:
                verified = self.verifier.verify(token, self.service or "-")
            except CredentialError as again:
                return again.reason
            if verified.instance not in self.aliases:
                if not self._local(source):
                    return exc.reason
                self.local_siblings += 1
        self.accepted += 1
        return None

    def _local(self, source: str | None) -> bool:
        if not source or not self.networks:
            return False
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def silent(self, reason: str) -> bool:
        """Whether a refusal for ``reason`` goes unanswered, so that a CO gets exactly one
        answer when the HOA bicasts its request to every instance of the service (patent:
        duplicates 108/110 share the home address). A credential for a sibling instance is
        that sibling's to answer; a duplicate leaves every other refusal to the primary (a
        secondary answers its own: it alone receives its part's address)."""
        return reason == "wrong_instance" or self.part == "duplicate"

    def describe(self) -> dict[str, Any]:
        """For ``stats`` (never the key)."""
        return {"service": self.service, "instance": self.instance, "part": self.part,
                "networks": [str(n) for n in self.networks], "local_siblings": self.local_siblings,
                "configured": bool(self.verifier.keys), "accepted": self.accepted,
                "refused": dict(self.refused), "revocations": len(self.revocations)}
