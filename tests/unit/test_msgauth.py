"""Authenticators of in-band control messages (agent.core.msgauth): what they cover, and what a
receiver refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core import msgauth
from agent.core.msgauth import (MessageAuthError, ReplayCache, sign_ed25519, sign_hmac, strip,
                           verify_ed25519, verify_hmac)
from packets import ControlMessage, ControlType

NOW = 1_800_000_000.0
TO = "10.14.0.1"  # the receiver: the address a message is sent to
ME = {TO, "10.22.0.1"}  # the receiver's own addresses
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
    msg = wire(ControlType.PROVISION, 7, sign_ed25519(ControlType.PROVISION, 7, BODY, key, "acme", NOW, to=TO))
    cache = ReplayCache()
    assert verify_ed25519(msg.type, msg.txid, msg.body, keys, cache, NOW + 1, to=ME) == "acme"
    assert strip(msg.body) == BODY
    with pytest.raises(MessageAuthError, match="replayed"):
        verify_ed25519(msg.type, msg.txid, msg.body, keys, cache, NOW + 2, to=ME)


@pytest.mark.parametrize("change", ["body", "nested", "type", "txid", "issued", "nonce", "sig", "to"])
def test_every_covered_part_breaks_the_signature(provider, change: str) -> None:
    key, keys = provider
    body = sign_ed25519(ControlType.PROVISION, 7, BODY, key, "acme", NOW, to=TO)
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
    elif change == "to":
        body["auth"]["to"] = "10.22.0.1"  # another of the receiver's own addresses
    else:
        body["auth"]["sig"] = body["auth"]["sig"][::-1]
    with pytest.raises(MessageAuthError):
        verify_ed25519(ctype, txid, body, keys, ReplayCache(floor=0), NOW, to=ME)


def test_unknown_signer_missing_or_stale_authenticators_are_refused(provider) -> None:
    key, keys = provider
    stranger = Ed25519PrivateKey.generate()
    cases = [
        (sign_ed25519(ControlType.PROVISION, 0, BODY, stranger, "acme", NOW, to=TO), "bad signature"),
        (sign_ed25519(ControlType.PROVISION, 0, BODY, stranger, "evil", NOW, to=TO), "not authorized"),
        (dict(BODY), "no authenticator"),
        (dict(BODY, auth="x"), "no authenticator"),
        (dict(BODY, auth={"alg": "ed25519"}), "malformed"),
        (sign_hmac(ControlType.PROVISION, 0, BODY, b"k" * 32, now=NOW, to=TO), "must be ed25519"),
        (sign_ed25519(ControlType.PROVISION, 0, BODY, key, "acme", NOW - 301, to=TO), "window"),
        (sign_ed25519(ControlType.PROVISION, 0, BODY, key, "acme", NOW + 301, to=TO), "window"),
        (sign_ed25519(ControlType.PROVISION, 0, BODY, key, "acme", NOW, to="10.12.0.1"),
         "not for this receiver"),
    ]
    for body, reason in cases:
        with pytest.raises(MessageAuthError, match=reason):
            verify_ed25519(ControlType.PROVISION, 0, body, keys, ReplayCache(floor=0), NOW, to=ME)


def test_router_messages_need_the_run_key() -> None:
    key = b"r" * 32
    body = {"action": "cancel", "name": "counter"}
    signed = wire(ControlType.MIGRATE, 3, sign_hmac(ControlType.MIGRATE, 3, body, key, now=NOW,
                                                    to=TO)).body
    cache = ReplayCache(floor=0)
    verify_hmac(ControlType.MIGRATE, 3, signed, key, cache, NOW, to=ME)
    with pytest.raises(MessageAuthError, match="replayed"):
        verify_hmac(ControlType.MIGRATE, 3, signed, key, cache, NOW, to=ME)
    with pytest.raises(MessageAuthError, match="not a router"):
        verify_hmac(ControlType.MIGRATE, 3, signed, b"x" * 32, ReplayCache(floor=0), NOW, to=ME)
    with pytest.raises(MessageAuthError, match="not a router"):
        verify_hmac(ControlType.STATE_TRANSFER, 3, signed, key, ReplayCache(floor=0), NOW, to=ME)
    with pytest.raises(MessageAuthError, match="no key"):  # a missing key fails closed
        verify_hmac(ControlType.MIGRATE, 3, signed, b"", ReplayCache(floor=0), NOW, to=ME)


def test_a_message_signed_for_one_router_is_refused_by_another() -> None:
    """Issue 12: one signed MIGRATE was accepted by a third router. The receiver is signed."""
    key = b"r" * 32
    signed = sign_hmac(ControlType.MIGRATE, 3, {"action": "cancel", "name": "counter"}, key,
                       now=NOW, to="10.14.0.1")
    with pytest.raises(MessageAuthError, match="not for this receiver"):
        verify_hmac(ControlType.MIGRATE, 3, signed, key, ReplayCache(floor=0), NOW,
                    to={"10.20.0.1", "10.22.0.2"})
    with pytest.raises(MessageAuthError, match="not for this receiver"):  # no identity: none
        verify_hmac(ControlType.MIGRATE, 3, signed, key, ReplayCache(floor=0), NOW, to=set())
    verify_hmac(ControlType.MIGRATE, 3, signed, key, ReplayCache(floor=0), NOW, to={"10.14.0.1"})
    with pytest.raises(ValueError):  # nothing can be signed for nobody
        sign_hmac(ControlType.MIGRATE, 3, {}, key, to="")


def test_the_replay_cache_refuses_what_it_forgot_instead_of_accepting_it_again() -> None:
    cache = ReplayCache(window=10, size=3, floor=0)
    cache.check_and_add("a", issued=1, now=1)
    for n, t in zip("bcd", (2, 3, 4)):
        cache.check_and_add(n, issued=t, now=4)
    assert len(cache) == 3 and cache.floor == 1  # "a" pushed out: the floor is its issue time
    with pytest.raises(MessageAuthError, match="not after"):
        cache.check_and_add("a", issued=1, now=5)  # the replay of "a" is still refused
    with pytest.raises(MessageAuthError, match="replayed"):
        cache.check_and_add("c", issued=3, now=5)
    cache.check_and_add("e", issued=4.5, now=20)  # b, c, d left the window: forgotten
    assert len(cache) == 1 and cache.floor == 4
    with pytest.raises(MessageAuthError, match="not after"):
        cache.check_and_add("d", issued=4, now=20)


def test_a_flood_of_other_messages_does_not_make_a_replay_acceptable() -> None:
    """Issue 12: after 4,096 other nonces a replay was accepted again."""
    cache = ReplayCache(floor=0)
    cache.check_and_add("victim", issued=NOW, now=NOW)
    for i in range(2 * cache.size):
        cache.check_and_add(f"flood{i}", issued=NOW + 1 + i / 1e4, now=NOW + 2)
    assert len(cache) == cache.size  # bounded
    with pytest.raises(MessageAuthError):
        cache.check_and_add("victim", issued=NOW, now=NOW + 3)


def test_a_message_issued_before_the_receiver_started_is_refused() -> None:
    """A restart empties the memory but not the floor: it starts at the process's start."""
    key = b"r" * 32
    before = sign_hmac(ControlType.MIGRATE, 3, {"n": 1}, key, now=NOW - 1, to=TO)
    after = sign_hmac(ControlType.MIGRATE, 3, {"n": 2}, key, now=NOW + 1, to=TO)
    restarted = ReplayCache(floor=NOW)  # a receiver that started at NOW
    with pytest.raises(MessageAuthError, match="not after"):
        verify_hmac(ControlType.MIGRATE, 3, before, key, restarted, NOW + 2, to=ME)
    verify_hmac(ControlType.MIGRATE, 3, after, key, restarted, NOW + 2, to=ME)
    assert ReplayCache().floor == msgauth.STARTED_AT


def test_a_fresh_process_refuses_what_was_accepted_before_it_started(tmp_path) -> None:
    """Process level: a message accepted by one process is refused by a new one (an agent
    restarted): its replay cache's floor is its own start."""
    key = b"r" * 32
    signed = sign_hmac(ControlType.MIGRATE, 3, {"action": "cancel", "name": "counter"}, key,
                       to=TO)
    verify_hmac(ControlType.MIGRATE, 3, signed, key, ReplayCache(), to=ME)  # accepted here
    script = (
        "import json, sys\n"
        "from agent.core.msgauth import MessageAuthError, ReplayCache, verify_hmac\n"
        "body = json.load(sys.stdin)\n"
        "try:\n"
        f"    verify_hmac({int(ControlType.MIGRATE)}, 3, body, b'r' * 32, ReplayCache(), to={sorted(ME)!r})\n"
        "    print('accepted')\n"
        "except MessageAuthError as exc:\n"
        "    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(signed), text=True,
                         capture_output=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.startswith("refused:") and "not after" in out.stdout, out
