"""Who may send an in-band control message, to whom: authenticators inside the JSON body.

The patent configures a router's VM only "if remote site 24 is authorized to access" it, and a
router hands a running object (its state, the code to run) only to another router of the
same network. TCP 4340 is reachable from every host, so both are checked per message:

* **PROVISION** is signed with the service provider's Ed25519 key (the key that signs the
  services; the routers' baseline already lists the authorized ones), so only an authorized
  provider's site can configure a VM.
* **Router to router** messages (MIGRATE, STATE_TRANSFER, VM_NEGOTIATE, ...) carry an
  HMAC-SHA-256 under the run's router key (every agent's configuration has it, like the
  Foreign-Home keys of registration); a CO's broker messages one under the CO's own key.

The authenticator is ``body["auth"]``: ``alg``, ``key_id``, ``to`` (the receiver: the address
the sender sends it to), ``issued_at`` (Unix time), ``nonce`` and ``sig`` (base64). It covers
the message type, the transaction id, the body without ``sig``, canonical JSON (sorted keys,
no spaces), so a signed message cannot be replayed as another type, with another body or to
another receiver (issue 12: one signed MIGRATE was accepted by a third router). A receiver
refuses one not addressed to it, one issued outside its clock window and one its
:class:`ReplayCache` refuses: a nonce seen, or issued at or before the cache's floor (the
process's start, then the newest message it forgot), so neither a restart nor a flood of
other messages makes a replay acceptable again.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import json
import os
import time
from typing import Any, Collection, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core.errors import AgentError

WINDOW_S = 300.0  # accepted clock difference, seconds
MAX_REMEMBERED = 4096
#: When this process started: the first floor of every replay cache, so a message issued
#: before a restart is refused after it. Set at import and again in every forked child: an
#: agent forked from the run's pre-imported zygote (or forked again by its supervisor after a
#: crash) imported this module long before it started, and the import's time would let a
#: message accepted by the agent it replaces be accepted again.
STARTED_AT = time.time()


def _restarted_at_fork() -> None:
    global STARTED_AT
    STARTED_AT = time.time()


os.register_at_fork(after_in_child=_restarted_at_fork)


class MessageAuthError(AgentError):
    """A control message without a valid authenticator from an authorized sender, for this
    receiver."""


def _signed_bytes(ctype: int, txid: int, body: Mapping[str, Any]) -> bytes:
    auth = {k: v for k, v in body.get("auth", {}).items() if k != "sig"}
    rest = {k: v for k, v in body.items() if k != "auth"}
    return json.dumps({"type": int(ctype), "txid": int(txid), "body": rest, "auth": auth},
                      sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _auth_header(alg: str, key_id: str, to: str, now: float | None) -> dict[str, Any]:
    if not isinstance(to, str) or not to:
        raise ValueError("a message is signed for a receiver: `to` must name it")
    return {"alg": alg, "key_id": key_id, "to": to,
            "issued_at": round(time.time() if now is None else now, 3),
            "nonce": base64.b64encode(os.urandom(12)).decode()}


def sign_ed25519(ctype: int, txid: int, body: Mapping[str, Any], key: Ed25519PrivateKey,
                 key_id: str, now: float | None = None, *, to: str) -> dict[str, Any]:
    """``body`` with an Ed25519 authenticator (a provider's PROVISION) for receiver ``to``."""
    out = dict(body, auth=_auth_header("ed25519", key_id, to, now))
    out["auth"]["sig"] = base64.b64encode(key.sign(_signed_bytes(ctype, txid, out))).decode()
    return out


def sign_hmac(ctype: int, txid: int, body: Mapping[str, Any], key: bytes, key_id: str = "routers",
              now: float | None = None, *, to: str) -> dict[str, Any]:
    """``body`` with an HMAC-SHA-256 authenticator (router to router, CO and broker) for
    receiver ``to``."""
    out = dict(body, auth=_auth_header("hmac-sha256", key_id, to, now))
    mac = hmac.new(key, _signed_bytes(ctype, txid, out), hashlib.sha256).digest()
    out["auth"]["sig"] = base64.b64encode(mac).decode()
    return out


class ReplayCache:
    """Which authenticated messages a receiver has accepted, bounded in memory.

    Entries are nonces ordered by ``issued_at``. The cache keeps a *floor*: a message issued at
    or before it is refused whatever its nonce. The floor starts at ``floor`` (default: when
    this process started, so a restart forgets nothing that matters: everything accepted
    before it is older than the floor) and rises to the ``issued_at`` of every entry the cache
    forgets, whether it left the clock window or was pushed out by ``size`` newer ones: a
    flood of other messages cannot make an old one acceptable again, it can only make
    messages older than the ones it remembers late (refused, to be sent again).
    """

    def __init__(self, window: float = WINDOW_S, size: int = MAX_REMEMBERED,
                 floor: float | None = None) -> None:
        if size < 1:
            raise ValueError("a replay cache remembers at least one message")
        self.window = window
        self.size = size
        self.floor = STARTED_AT if floor is None else float(floor)
        self._seen: dict[str, float] = {}
        self._order: list[tuple[float, str]] = []  # heap of (issued_at, nonce)

    def __len__(self) -> int:
        return len(self._seen)

    def _forget_oldest(self) -> None:
        issued, nonce = heapq.heappop(self._order)
        del self._seen[nonce]
        self.floor = max(self.floor, issued)

    def check_and_add(self, nonce: str, issued: float, now: float) -> None:
        """Accept a message (nonce, issued_at) once; :class:`MessageAuthError` else."""
        while self._order and self._order[0][0] < now - self.window:
            self._forget_oldest()
        if issued <= self.floor:
            raise MessageAuthError(
                f"issued at {issued:.3f}, not after {self.floor:.3f} (this receiver's start or "
                "the newest message it no longer remembers): refused as a possible replay")
        if nonce in self._seen:
            raise MessageAuthError("replayed message (its nonce was seen)")
        self._seen[nonce] = issued
        heapq.heappush(self._order, (issued, nonce))
        while len(self._seen) > self.size:
            self._forget_oldest()


def _header(body: Mapping[str, Any], alg: str, cache: ReplayCache, now: float | None
            ) -> tuple[dict[str, Any], bytes, float, float]:
    auth = body.get("auth")
    if not isinstance(auth, dict):
        raise MessageAuthError("no authenticator")
    if auth.get("alg") != alg:
        raise MessageAuthError(f"authenticator must be {alg}, not {auth.get('alg')!r}")
    try:
        issued = auth["issued_at"]
        if isinstance(issued, bool) or not isinstance(issued, (int, float)):
            raise TypeError(f"issued_at {issued!r} is not a number")
        issued = float(issued)
        sig = base64.b64decode(str(auth["sig"]), validate=True)
        if not isinstance(auth["nonce"], str) or not isinstance(auth["to"], str):
            raise TypeError("nonce and to must be strings")
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageAuthError(f"malformed authenticator: {exc!r}") from None
    now = time.time() if now is None else now
    if not abs(now - issued) <= cache.window:  # also refuses NaN
        raise MessageAuthError(f"issued {now - issued:+.0f} s from now, outside the {cache.window:.0f} s window")
    return auth, sig, issued, now


def _for_receiver(auth: Mapping[str, Any], to: Collection[str]) -> None:
    if auth["to"] not in to:
        raise MessageAuthError(f"signed for {str(auth['to'])[:64]!r}, not for this receiver "
                               f"({', '.join(sorted(to)) or 'none'})")


def verify_ed25519(ctype: int, txid: int, body: Mapping[str, Any],
                   keys: Mapping[str, Ed25519PublicKey], cache: ReplayCache,
                   now: float | None = None, *, to: Collection[str]) -> str:
    """The key id of the authorized key that signed ``body`` for one of the receiver
    identities ``to``; :class:`MessageAuthError` else."""
    auth, sig, issued, now = _header(body, "ed25519", cache, now)
    key = keys.get(str(auth.get("key_id")))
    if key is None:
        raise MessageAuthError(f"signer {auth.get('key_id')!r} is not authorized here")
    try:
        key.verify(sig, _signed_bytes(ctype, txid, body))
    except InvalidSignature:
        raise MessageAuthError("bad signature") from None
    _for_receiver(auth, to)
    cache.check_and_add(auth["nonce"], issued, now)
    return str(auth["key_id"])


def verify_hmac(ctype: int, txid: int, body: Mapping[str, Any], key: bytes, cache: ReplayCache,
                now: float | None = None, *, to: Collection[str]) -> None:
    """Accept ``body`` only if it carries an HMAC under ``key`` for one of the receiver
    identities ``to``, fresh and not seen before; :class:`MessageAuthError` else."""
    if not key:
        raise MessageAuthError("no key to check it with")
    auth, sig, issued, now = _header(body, "hmac-sha256", cache, now)
    mac = hmac.new(key, _signed_bytes(ctype, txid, body), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, sig):
        raise MessageAuthError("bad authenticator (not a router of this network)")
    _for_receiver(auth, to)
    cache.check_and_add(auth["nonce"], issued, now)


def strip(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without its authenticator (what the handlers act on)."""
    return {k: v for k, v in body.items() if k != "auth"}
