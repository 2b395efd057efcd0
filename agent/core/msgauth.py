"""Who may send an in-band control message: authenticators inside the JSON body.

The patent configures a router's VM only "if remote site 24 is authorized to access" it, and a
router hands a running object (its state, the code to run) only to another router of the
same network. TCP 4340 is reachable from every host, so both are checked per message:

* **PROVISION** is signed with the service provider's Ed25519 key (the key that signs the
  services; the routers' baseline already lists the authorized ones), so only an authorized
  provider's site can configure a VM.
* **MIGRATE** and **STATE_TRANSFER** carry an HMAC-SHA-256 under the run's router key (every
  agent's configuration has it, like the Foreign-Home keys of registration).

The authenticator is ``body["auth"]``: ``alg``, ``key_id``, ``issued_at`` (Unix time),
``nonce`` and ``sig`` (base64). It covers the message type, the transaction id, the body
without ``sig``, canonical JSON (sorted keys, no spaces), so a signed message cannot be
replayed as another type or with another body. A receiver refuses one issued outside its
clock window and, within the window, one whose nonce it has seen (:class:`ReplayCache`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections import OrderedDict
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core.errors import AgentError

WINDOW_S = 300.0  # accepted clock difference, seconds
MAX_REMEMBERED = 4096


class MessageAuthError(AgentError):
    """A control message without a valid authenticator from an authorized sender."""


def _signed_bytes(ctype: int, txid: int, body: Mapping[str, Any]) -> bytes:
    auth = {k: v for k, v in body.get("auth", {}).items() if k != "sig"}
    rest = {k: v for k, v in body.items() if k != "auth"}
    return json.dumps({"type": int(ctype), "txid": int(txid), "body": rest, "auth": auth},
                      sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _auth_header(alg: str, key_id: str, now: float | None) -> dict[str, Any]:
    return {"alg": alg, "key_id": key_id, "issued_at": round(time.time() if now is None else now, 3),
            "nonce": base64.b64encode(os.urandom(12)).decode()}


def sign_ed25519(ctype: int, txid: int, body: Mapping[str, Any], key: Ed25519PrivateKey,
                 key_id: str, now: float | None = None) -> dict[str, Any]:
    """``body`` with an Ed25519 authenticator (a provider's PROVISION)."""
    out = dict(body, auth=_auth_header("ed25519", key_id, now))
    out["auth"]["sig"] = base64.b64encode(key.sign(_signed_bytes(ctype, txid, out))).decode()
    return out


def sign_hmac(ctype: int, txid: int, body: Mapping[str, Any], key: bytes, key_id: str = "routers",
              now: float | None = None) -> dict[str, Any]:
    """``body`` with an HMAC-SHA-256 authenticator (router to router)."""
    out = dict(body, auth=_auth_header("hmac-sha256", key_id, now))
    mac = hmac.new(key, _signed_bytes(ctype, txid, out), hashlib.sha256).digest()
    out["auth"]["sig"] = base64.b64encode(mac).decode()
    return out


class ReplayCache:
    """Nonces seen within the window, oldest dropped first (bounded memory)."""

    def __init__(self, window: float = WINDOW_S, size: int = MAX_REMEMBERED) -> None:
        self.window = window
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_add(self, nonce: str, now: float) -> None:
        while self._seen and (len(self._seen) >= self.size
                              or next(iter(self._seen.values())) < now - self.window):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise MessageAuthError("replayed message (its nonce was seen)")
        self._seen[nonce] = now


def _header(body: Mapping[str, Any], alg: str, cache: ReplayCache, now: float | None
            ) -> tuple[dict[str, Any], bytes, float]:
    auth = body.get("auth")
    if not isinstance(auth, dict):
        raise MessageAuthError("no authenticator")
    if auth.get("alg") != alg:
        raise MessageAuthError(f"authenticator must be {alg}, not {auth.get('alg')!r}")
    try:
        issued = float(auth["issued_at"])
        sig = base64.b64decode(str(auth["sig"]), validate=True)
        str(auth["nonce"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageAuthError(f"malformed authenticator: {exc!r}") from None
    now = time.time() if now is None else now
    if abs(now - issued) > cache.window:
        raise MessageAuthError(f"issued {now - issued:+.0f} s from now, outside the {cache.window:.0f} s window")
    return auth, sig, now


def verify_ed25519(ctype: int, txid: int, body: Mapping[str, Any],
                   keys: Mapping[str, Ed25519PublicKey], cache: ReplayCache,
                   now: float | None = None) -> str:
    """The key id of the authorized key that signed ``body``; :class:`MessageAuthError` else."""
    auth, sig, now = _header(body, "ed25519", cache, now)
    key = keys.get(str(auth.get("key_id")))
    if key is None:
        raise MessageAuthError(f"signer {auth.get('key_id')!r} is not authorized here")
    try:
        key.verify(sig, _signed_bytes(ctype, txid, body))
    except InvalidSignature:
        raise MessageAuthError("bad signature") from None
    cache.check_and_add(str(auth["nonce"]), now)
    return str(auth["key_id"])


def verify_hmac(ctype: int, txid: int, body: Mapping[str, Any], key: bytes, cache: ReplayCache,
                now: float | None = None) -> None:
    auth, sig, now = _header(body, "hmac-sha256", cache, now)
    mac = hmac.new(key, _signed_bytes(ctype, txid, body), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, sig):
        raise MessageAuthError("bad authenticator (not a router of this network)")
    cache.check_and_add(str(auth["nonce"]), now)


def strip(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without its authenticator (what the handlers act on)."""
    return {k: v for k, v in body.items() if k != "auth"}
