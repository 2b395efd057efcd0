"""Service credentials (patent Fig. 10, 164): the broker vouches for a CO to an object.

With each service address the broker returns a credential that the CO must present with every
request; the object — another process, often on another router — verifies it without asking
the broker. Design:

* a per-service secret key (:class:`ServiceKeys`) that the broker shares with the instances of
  that service (the network role pushes it when an instance registers);
* a token = ``base64url(claims) "." base64url(HMAC-SHA-256(key, claims))`` where the claims
  are the lease id, service, instance, expiry (wall-clock seconds: the object's monotonic
  clock is not the broker's) and holder. The expiry is inside the MAC, so a CO can neither
  forge a credential nor extend one: a renewal gets a new credential from the broker;
* the MAC is compared in constant time (:func:`hmac.compare_digest`);
* a :class:`RevocationList` of leases cancelled before their expiry, so a cancelled lease
  stops being served. The network role pushes it to the objects (within a second); entries
  are pruned once the credential would have expired anyway, which keeps the list small.

Verification order: well-formed and authentic (``forged`` otherwise: the MAC is checked
before any claim is believed), then service, instance, expiry and revocation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from agent.broker import wire
from agent.broker.errors import BadRequest, CredentialError

log = logging.getLogger(__name__)

Clock = Callable[[], float]
VERSION = 1
KEY_BYTES = 32
#: A token longer than this is not even parsed.
MAX_TOKEN = 1024
MAX_REVOCATIONS = 100_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Claims:
    """What a credential says: this holder may use this instance under this lease until
    ``expires_at`` (wall clock, whole milliseconds)."""

    lease_id: str
    service: str
    instance: str
    expires_at: float
    holder: str

    def encode(self) -> bytes:
        """Canonical bytes the MAC covers (sorted keys, no spaces, expiry in ms)."""
        return json.dumps({"v": VERSION, "l": self.lease_id, "s": self.service,
                           "i": self.instance, "e": int(math.floor(self.expires_at * 1000)),
                           "h": self.holder}, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Claims":
        doc = json.loads(data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("v") != VERSION or set(doc) != {
                "v", "l", "s", "i", "e", "h"}:
            raise ValueError("not version-1 claims")
        e = doc["e"]
        if not isinstance(e, int) or isinstance(e, bool) or e < 0:
            raise ValueError("bad expiry")
        if not all(isinstance(doc[k], str) for k in "lsih"):
            raise ValueError("bad claim types")
        return cls(doc["l"], doc["s"], doc["i"], e / 1000, doc["h"])


def derive_service_key(master: bytes, service: str) -> bytes:
    """The credential key of ``service`` under the run's router key (see ServiceKeys.derived)."""
    return hmac.new(master, b"moat service credential|" + service.encode(), hashlib.sha256).digest()


class ServiceKeys:
    """The broker's per-service secrets (shared with that service's instances only)."""

    def __init__(self, new_key: Callable[[], bytes] = lambda: secrets.token_bytes(KEY_BYTES),
                 derive: Callable[[str], bytes] | None = None):
        self._new_key = new_key
        self._derive = derive
        self._keys: dict[str, bytes] = {}

    @classmethod
    def derived(cls, master: bytes) -> "ServiceKeys":
        """Keys derived from the run's router key: HMAC(master, label | service).

        The broker and every router hold the router key, so an instance's router computes its
        service's key itself and no key ever crosses the wire (the broker never sends one)."""
        if len(master) < 16:
            raise ValueError("the master key must be at least 16 bytes")
        return cls(new_key=lambda: b"", derive=lambda service: derive_service_key(master, service))

    def key(self, service: str) -> bytes:
        """The key of ``service``, made (or derived) on first use."""
        if service not in self._keys:
            self._keys[service] = self._derive(service) if self._derive else self._new_key()
        return self._keys[service]

    def rotate(self, service: str) -> bytes:
        """A new key for ``service``: every credential issued under the old one is void."""
        if self._derive is not None:
            raise ValueError("derived service keys change only with the run's router key")
        self._keys[service] = self._new_key()
        return self._keys[service]

    def __contains__(self, service: object) -> bool:
        return service in self._keys


def issue(claims: Claims, key: bytes) -> str:
    """The token for ``claims`` under the service's ``key``."""
    body = claims.encode()
    mac = hmac.new(key, body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(mac)}"


class RevocationList:
    """Lease ids cancelled before their credentials expired, each kept until that expiry.

    Wall-clock times, like the credentials. ``as_dict``/``from_dict`` carry it to objects.
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._until

    def revoke(self, lease_id: str, until: float) -> None:
        if len(self._until) >= MAX_REVOCATIONS and lease_id not in self._until:
            raise OverflowError("revocation list full")
        self._until[lease_id] = max(until, self._until.get(lease_id, until))

    def revoked(self, lease_id: str, now: float) -> bool:
        until = self._until.get(lease_id)
        return until is not None and now <= until

    def prune(self, now: float) -> int:
        """Forget entries whose credentials have expired anyway; return how many."""
        gone = [lid for lid, until in self._until.items() if until < now]
        for lid in gone:
            del self._until[lid]
        return len(gone)

    def merge(self, other: "RevocationList") -> None:
        for lid, until in other._until.items():
            self.revoke(lid, until)

    def as_dict(self) -> dict[str, Any]:
        return {"revoked": [{"lease_id": lid, "until": until}
                            for lid, until in sorted(self._until.items())]}

    @classmethod
    def from_dict(cls, doc: Any) -> "RevocationList":
        doc = wire.as_mapping(doc, "revocations")
        wire.only_keys(doc, {"revoked"}, "revocations")
        entries = doc.get("revoked", [])
        if not isinstance(entries, list) or len(entries) > MAX_REVOCATIONS:
            raise BadRequest(f"revocations.revoked must be a list of at most "
                                  f"{MAX_REVOCATIONS} entries")
        result = cls()
        for entry in entries:
            entry = wire.as_mapping(entry, "revocation")
            wire.only_keys(entry, {"lease_id", "until"}, "revocation")
            result.revoke(wire.text(entry, "lease_id", "revocation", max_len=128),
                          wire.number(entry, "until", "revocation", ge=0))
        return result


@dataclass(frozen=True)
class Verified:
    """A credential that checked out: the lease it stands for, and until when."""

    lease_id: str
    expires_at: float
    holder: str
    instance: str


class Verifier:
    """The object's side: checks every request's credential for the service(s) it serves.

    ``keys`` maps service -> key (pushed by the broker); ``leeway_s`` tolerates clock skew
    between the broker's and the object's wall clocks (0 by default: fail closed).
    """

    def __init__(self, keys: Mapping[str, bytes], revocations: RevocationList | None = None,
                 clock: Clock = time.time, leeway_s: float = 0.0) -> None:
        self.keys = dict(keys)
        self.revocations = revocations if revocations is not None else RevocationList()
        self._clock = clock
        self.leeway_s = leeway_s

    def verify(self, token: Any, service: str, now: float | None = None,
               instance: str | None = None) -> Verified:
        """The lease id and expiry ``token`` stands for, or CredentialError(reason)."""
        if not token:
            raise CredentialError("missing", "no credential presented")
        claims = self._authentic(token, service)
        if claims.service != service:
            raise CredentialError("wrong_service", f"credential is for {claims.service!r}")
        if instance is not None and claims.instance != instance:
            raise CredentialError("wrong_instance", "credential is for another instance")
        now = self._clock() if now is None else now
        if claims.expires_at + self.leeway_s <= now:
            raise CredentialError("expired", "the lease behind this credential has expired")
        if self.revocations.revoked(claims.lease_id, now):
            raise CredentialError("revoked", "the lease behind this credential was cancelled")
        return Verified(claims.lease_id, claims.expires_at, claims.holder, claims.instance)

    def _authentic(self, token: Any, service: str) -> Claims:
        """The claims of a well-formed token whose MAC verifies, else ``forged``.

        The key is the one of the service the claims name if this verifier has it (so an
        authentic token for a sibling service reads ``wrong_service``), else the key of the
        service being served (so an unknown service in the claims reads ``forged``).
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
            raise CredentialError("forged", "malformed credential")
        body_b64, mac_b64 = token.split(".")
        try:
            body, mac = _unb64(body_b64), _unb64(mac_b64)
            claimed = Claims.decode(body)
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise CredentialError("forged", "malformed credential") from None
        key = self.keys.get(claimed.service) or self.keys.get(service)
        if key is None:
            raise CredentialError("forged", f"no key for service {service!r}")
        expected = hmac.new(key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise CredentialError("forged", "credential does not verify")
        return claimed
