"""Secrets in in-band messages, sealed for the receiving router (issue 12, item 1).

A MIGRATE carries the moving object's registration configuration (its Mobile-Home and
Mobile-Foreign keys) and checkpoint, a STATE_TRANSFER the checkpoint, PROVISION's ``mobile``
part the objects' keys, VM_NEGOTIATE's ``start`` a duplicate's or part's VM with its keys.
Everything on TCP 4340 is readable by whoever captures it, so those fields travel *sealed*
for the one router that receives the message: :func:`secret_fields` says which fields of
which message are secret, :func:`seal_body` moves them into ``body["sealed"]`` and
:func:`open_body` puts them back on the receiver, before the handler sees the body. The rest
of the body stays readable in captures (Wireshark's JSON tree shows ``action``, ``name``,
``spec``, ...).

The box is an ECIES-style sealed box: every router has a static X25519 key pair (the run's
Keyring makes it; the private key is in the router's root-only agent configuration, every
router's public key in every configuration and in the provider's directory). The sender
makes an ephemeral X25519 key, derives a box key with HKDF-SHA256 from the shared secret
(salt: both public keys; info: the message type and the receiver), and encrypts the secret
fields' canonical JSON with ChaCha20-Poly1305 under a random 96-bit nonce, whose associated
data binds the message type, transaction id and receiver. So only that receiver can open it,
and a box moved to another message, type or receiver fails to open. A sealed body is also
signed (the authenticator covers the box), so a box cannot be swapped without the router key
either.

The key agreement is the expensive part (about 0.3 ms to make an ephemeral key and agree, and
0.7 ms to parse a raw private key, on the test machine, per message: the largest fixed cost of
a MIGRATE commit, issue 14). So a sender reuses one ephemeral key and its box key per
(receiver, message type) for :data:`EPHEMERAL_REUSE_S` (random nonces keep every box distinct;
a box still opens only for its message), and a receiver keeps its parsed private key and the
box keys of the ephemeral keys it saw last (bounded): the wire format is unchanged.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.core.errors import AgentError
from packets import ControlType

ALG = "x25519-hkdf-sha256-chacha20poly1305"
SEALED = "sealed"
KEY_BYTES = 32
NONCE_BYTES = 12
#: Seconds a sender seals with one ephemeral key per (receiver, message type): 96-bit random
#: nonces under one key stay far from a collision at any rate a router sends.
EPHEMERAL_REUSE_S = 60.0
#: Box keys a sender (per receiver and type) and a receiver (per ephemeral key) keep.
MAX_BOX_KEYS = 64
#: The fields of each message type that are secret (always sealed) ...
_ALWAYS: dict[int, tuple[str, ...]] = {
    ControlType.MIGRATE: ("config", "state", "vm"),
    ControlType.STATE_TRANSFER: ("state",),
    ControlType.VM_NEGOTIATE: ("state",),
    ControlType.PROVISION: ("mobile",),
}
#: ... and those secret when they hold a document rather than a name (VM_NEGOTIATE's ``vm``
#: is a VM description with its objects' keys in ``start``, a VM's name in ``cancel``).
_WHEN_DOCUMENT: dict[int, tuple[str, ...]] = {ControlType.VM_NEGOTIATE: ("vm",)}


class SealError(AgentError):
    """A sealed part that cannot be made or opened, or a secret sent in clear."""


def secret_fields(ctype: int, body: Mapping[str, Any]) -> list[str]:
    """The fields of ``body`` (a message of type ``ctype``) that must not cross the wire in
    clear, in a fixed order."""
    names = [n for n in _ALWAYS.get(int(ctype), ()) if n in body]
    names += [n for n in _WHEN_DOCUMENT.get(int(ctype), ()) if isinstance(body.get(n), dict)]
    return sorted(names)


def may_seal(ctype: int) -> bool:
    """Whether a message of type ``ctype`` may carry a sealed part at all."""
    return int(ctype) in _ALWAYS or int(ctype) in _WHEN_DOCUMENT


def generate_keypair() -> tuple[bytes, bytes]:
    """A new static X25519 key pair, (private, public), 32 raw bytes each."""
    private = X25519PrivateKey.generate()
    return _raw_private(private), _raw_public(private.public_key())


def public_of(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    return _raw_public(_private(private).public_key())


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _private(raw: bytes) -> X25519PrivateKey:
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise SealError("an X25519 private key is 32 bytes")
    return _parsed_private(raw)[0]


@functools.lru_cache(maxsize=8)
def _parsed_private(raw: bytes) -> tuple[X25519PrivateKey, bytes]:
    """A router's private key parsed once, with its raw public key (parsing costs ~0.7 ms)."""
    key = X25519PrivateKey.from_private_bytes(raw)
    return key, _raw_public(key.public_key())


def _public(raw: bytes) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise SealError("an X25519 public key is 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


class _BoxKeys:
    """A bounded, thread-safe map to box keys; entries older than ``max_age`` are made
    again (``None``: they never age)."""

    def __init__(self, size: int = MAX_BOX_KEYS, max_age: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.max_age, self.clock = size, max_age, clock
        self._keys: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._lock:
            hit = self._keys.get(key)
            if hit is not None and (self.max_age is None or now - hit[0] < self.max_age):
                self._keys.move_to_end(key)
                return hit[1]
        value = make()  # outside the lock: a key agreement, may raise
        with self._lock:
            self._keys[key] = (now, value)
            self._keys.move_to_end(key)
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


#: Sender: (receiver's public key, type, receiver) -> (ephemeral public key, box key).
_SENDING = _BoxKeys(max_age=EPHEMERAL_REUSE_S)
#: Receiver: (own public key, ephemeral public key, type, receiver) -> box key.
_OPENING = _BoxKeys()


def _forget_keys_at_fork() -> None:
    """A forked child (agents fork from a zygote) makes its own ephemeral keys."""
    _SENDING._keys.clear()
    _SENDING._lock = threading.Lock()
    _OPENING._keys.clear()
    _OPENING._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_keys_at_fork)


def _sending_key(rpk: bytes, ctype: int, to: str) -> tuple[bytes, bytes]:
    def make() -> tuple[bytes, bytes]:
        ephemeral = X25519PrivateKey.generate()
        epk = _raw_public(ephemeral.public_key())
        return epk, _box_key(ephemeral.exchange(_public(rpk)), epk, rpk, ctype, to)

    return _SENDING.get((rpk, int(ctype), to), make)


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _box_key(shared: bytes, epk: bytes, rpk: bytes, ctype: int, to: str) -> bytes:
    info = b"moat sealed v1|" + _canonical({"type": int(ctype), "to": to})
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=epk + rpk, info=info).derive(shared)


def _aad(ctype: int, txid: int, to: str) -> bytes:
    return _canonical({"v": 1, "type": int(ctype), "txid": int(txid), "to": to})


def seal(doc: Any, public: bytes, *, ctype: int, txid: int, to: str) -> dict[str, str]:
    """``doc`` (JSON) sealed for the holder of X25519 ``public``, receiver ``to`` of a
    message of type ``ctype`` with transaction id ``txid``."""
    rpk = _raw_public(_public(public))
    epk, key = _sending_key(rpk, ctype, to)
    nonce = os.urandom(NONCE_BYTES)
    try:
        plain = _canonical(doc)
    except (TypeError, ValueError) as exc:
        raise SealError(f"cannot seal a value that is not JSON: {exc}") from None
    ct = ChaCha20Poly1305(key).encrypt(nonce, plain, _aad(ctype, txid, to))
    return {"alg": ALG, "epk": _b64(epk), "nonce": _b64(nonce), "ct": _b64(ct)}


def open_sealed(box: Any, private: bytes, *, ctype: int, txid: int, to: str) -> Any:
    """What :func:`seal` sealed, if ``private`` is the receiver's key and the box belongs to
    this message (type, txid, receiver); :class:`SealError` else."""
    if not isinstance(box, dict) or box.get("alg") != ALG:
        raise SealError(f"a sealed part must be {{'alg': {ALG!r}, 'epk', 'nonce', 'ct'}}")
    try:
        epk, nonce, ct = (_unb64(box[k]) for k in ("epk", "nonce", "ct"))
    except (KeyError, TypeError, ValueError) as exc:
        raise SealError(f"malformed sealed part: {exc!r}") from None
    if len(nonce) != NONCE_BYTES:
        raise SealError("malformed sealed part: the nonce is 12 bytes")
    own = _private(private)
    own_public = _parsed_private(private)[1]

    def make() -> bytes:
        try:
            shared = own.exchange(_public(epk))
        except ValueError:  # a low-order point: no shared secret to derive from
            raise SealError("malformed sealed part: its ephemeral key is not usable") from None
        return _box_key(shared, epk, own_public, ctype, to)

    key = _OPENING.get((own_public, epk, int(ctype), to), make)
    try:
        plain = ChaCha20Poly1305(key).decrypt(nonce, ct, _aad(ctype, txid, to))
    except InvalidTag:
        raise SealError("the sealed part does not open: sealed for another receiver or "
                        "message, or changed on the way") from None
    try:
        return json.loads(plain)
    except ValueError as exc:
        raise SealError(f"the sealed part is not JSON: {exc}") from None


_WARMED: set[bytes] = set()


def warm(private: bytes) -> None:
    """Parse this router's key and run one seal and open through the whole box, once per
    process: done at the agent's start, not by the first sealed message it receives (a
    move's MIGRATE start: its authentication took 10 ms in a handoff, most of the target's
    delay before it started the object, issue 14). Errors are the caller's (SealError)."""
    if private in _WARMED:
        return
    _private(private)  # checked, parsed and kept
    public = _parsed_private(private)[1]
    box = seal({"warm": True}, public, ctype=0, txid=0, to="warm-up")
    open_sealed(box, private, ctype=0, txid=0, to="warm-up")
    _WARMED.add(private)


def seal_body(body: Mapping[str, Any], public: bytes | None, *, ctype: int, txid: int,
              to: str) -> dict[str, Any]:
    """``body`` with its secret fields (:func:`secret_fields`) moved into ``body["sealed"]``
    for the receiver; unchanged when it has none. Without the receiver's ``public`` key a
    body with secrets is a :class:`SealError`: it is never sent in clear."""
    secrets = secret_fields(ctype, body)
    if not secrets:
        return dict(body)
    if SEALED in body:
        raise SealError(f"the body already has a {SEALED!r} field")
    if public is None:
        raise SealError(f"no public key for receiver {to}: its {', '.join(secrets)} "
                        "would cross the wire in clear")
    out = {k: v for k, v in body.items() if k not in secrets}
    out[SEALED] = seal({k: body[k] for k in secrets}, public, ctype=ctype, txid=txid, to=to)
    return out


def open_body(body: Mapping[str, Any], private: bytes | None, *, ctype: int, txid: int,
              to: str) -> dict[str, Any]:
    """The receiver's view of ``body``: the sealed fields opened and put back. Refuses
    (:class:`SealError`) a secret field sent in clear, a sealed part it cannot open, and
    sealed fields that are not secret fields of this message or that clash with clear
    ones."""
    clear = {k: v for k, v in body.items() if k != SEALED}
    exposed = secret_fields(ctype, clear)
    if exposed:
        raise SealError(f"{', '.join(exposed)} must be sealed for the receiver, not sent in clear")
    if SEALED not in body:
        return clear
    if not may_seal(ctype):
        raise SealError("nothing of this message type is sealed")
    if private is None:
        raise SealError("this router has no sealing key to open the message with")
    opened = open_sealed(body[SEALED], private, ctype=ctype, txid=txid, to=to)
    if not isinstance(opened, dict) or not opened:
        raise SealError("the sealed part must be a non-empty object of fields")
    allowed = set(_ALWAYS.get(int(ctype), ())) | set(_WHEN_DOCUMENT.get(int(ctype), ()))
    odd = sorted(set(opened) - allowed)
    if odd:
        raise SealError(f"sealed fields {odd[:4]} are not secret fields of this message")
    clash = sorted(set(opened) & set(clear))
    if clash:
        raise SealError(f"fields {clash} are both sealed and in clear")
    return {**clear, **opened}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("not a base64 string")
    return base64.b64decode(text, validate=True)
