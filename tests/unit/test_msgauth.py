"""Authenticators of in-band control messages (agent.core.msgauth): what they cover, and what a
receiver refuses."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.msgauth import (MessageAuthError, ReplayCache, sign_ed25519, sign_hmac, strip,
                           verify_ed25519, verify_hmac)
from packets import ControlMessage, ControlType

NOW = 1_800_000_000.0
BODY = {"vm": "v1", "kind": "service", "service": "counter-svc", "resources": {"cpu": 0.5}}


def wire(ctype: ControlType, txid: int, body: dict) -> ControlMessage:
    """Through the codec, as the receiver sees it."""
    return ControlMessage.decode(ControlMessage(ctype, txid, body).encode())


@pytest.fixture
def provider():
    key = Ed25519PrivateKey.generate()
    return key, {"acme": key.public_key()}


def test_a_signed_provision_verifies_once(provider) -> None:
    key, keys = provider
    msg = wire(ControlType.PROVISION, 7, sign_ed25519(ControlType.PROVISION, 7, BODY, key, "acme", NOW))
    cache = ReplayCache()
    assert verify_ed25519(msg.type, msg.txid, msg.body, keys, cache, NOW + 1) == "acme"
    assert strip(msg.body) == BODY
    with pytest.raises(MessageAuthError, match="replayed"):
        verify_ed25519(msg.type, msg.txid, msg.body, keys, cache, NOW + 2)


@pytest.mark.parametrize("change", ["body", "nested", "type", "txid", "issued", "nonce", "sig"])
def test_every_covered_part_breaks_the_signature(provider, change: str) -> None:
    key, keys = provider
    body = sign_ed25519(ControlType.PROVISION, 7, BODY, key, "acme", NOW)
    ctype, txid = ControlType.PROVISION, 7
    if change == "body":
        body["service"] = "other-svc"
    elif change == "nested":
        body["resources"] = {"cpu": 4.0}
    elif change == "type":
        ctype = ControlType.MIGRATE
    elif change == "txid":
        txid = 8
    elif change == "issued":
        body["auth"]["issued_at"] += 1
    elif change == "nonce":
        body["auth"]["nonce"] = "AAAAAAAAAAAAAAAA"
    else:
        body["auth"]["sig"] = body["auth"]["sig"][::-1]
    with pytest.raises(MessageAuthError):
        verify_ed25519(ctype, txid, body, keys, ReplayCache(), NOW)


def test_unknown_signer_missing_or_stale_authenticators_are_refused(provider) -> None:
    key, keys = provider
    stranger = Ed25519PrivateKey.generate()
    cases = [
        (sign_ed25519(ControlType.PROVISION, 0, BODY, stranger, "acme", NOW), "bad signature"),
        (sign_ed25519(ControlType.PROVISION, 0, BODY, stranger, "evil", NOW), "not authorized"),
        (dict(BODY), "no authenticator"),
        (dict(BODY, auth="x"), "no authenticator"),
        (dict(BODY, auth={"alg": "ed25519"}), "malformed"),
        (sign_hmac(ControlType.PROVISION, 0, BODY, b"k" * 32, now=NOW), "must be ed25519"),
        (sign_ed25519(ControlType.PROVISION, 0, BODY, key, "acme", NOW - 301), "window"),
        (sign_ed25519(ControlType.PROVISION, 0, BODY, key, "acme", NOW + 301), "window"),
    ]
    for body, reason in cases:
        with pytest.raises(MessageAuthError, match=reason):
            verify_ed25519(ControlType.PROVISION, 0, body, keys, ReplayCache(), NOW)


def test_router_messages_need_the_run_key() -> None:
    key = b"r" * 32
    body = {"action": "cancel", "name": "counter"}
    signed = wire(ControlType.MIGRATE, 3, sign_hmac(ControlType.MIGRATE, 3, body, key, now=NOW)).body
    cache = ReplayCache()
    verify_hmac(ControlType.MIGRATE, 3, signed, key, cache, NOW)
    with pytest.raises(MessageAuthError, match="replayed"):
        verify_hmac(ControlType.MIGRATE, 3, signed, key, cache, NOW)
    with pytest.raises(MessageAuthError, match="not a router"):
        verify_hmac(ControlType.MIGRATE, 3, signed, b"x" * 32, ReplayCache(), NOW)
    with pytest.raises(MessageAuthError, match="not a router"):
        verify_hmac(ControlType.STATE_TRANSFER, 3, signed, key, ReplayCache(), NOW)


def test_the_replay_cache_forgets_what_left_the_window_and_stays_bounded() -> None:
    cache = ReplayCache(window=10, size=3)
    cache.check_and_add("a", 0)
    cache.check_and_add("a", 11)  # a's first sighting left the window: a stale copy is
    # refused by the window check itself, so only the nonce memory is at stake here
    for n in "bcd":
        cache.check_and_add(n, 12)
    assert len(cache._seen) == 3
