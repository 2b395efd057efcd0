"""Sealed boxes for the receiving router (agent.core.sealing): only it opens them, and only as
part of the message they were sealed in."""

from __future__ import annotations

import base64
import json

import pytest

from agent.core.sealing import (SEALED, SealError, generate_keypair, open_body, open_sealed,
                                public_of, seal, seal_body, secret_fields)
from packets import ControlMessage, ControlType

MIGRATE = ControlType.MIGRATE
CONFIG = {"name": "counter", "mobile_home": {"spi": 256, "key": "aa" * 32},
          "mobile_foreign": {"spi": 1000, "key": "bb" * 32}}


@pytest.fixture
def receiver() -> tuple[bytes, bytes]:
    return generate_keypair()


def test_a_sealed_document_opens_for_its_receiver_only(receiver) -> None:
    private, public = receiver
    assert public_of(private) == public and len(private) == len(public) == 32
    box = seal(CONFIG, public, ctype=MIGRATE, txid=7, to="10.14.0.1")
    assert "aa" * 32 not in json.dumps(box)  # the key is not in the box in clear
    assert open_sealed(box, private, ctype=MIGRATE, txid=7, to="10.14.0.1") == CONFIG
    other, _ = generate_keypair()
    with pytest.raises(SealError, match="does not open"):
        open_sealed(box, other, ctype=MIGRATE, txid=7, to="10.14.0.1")


@pytest.mark.parametrize("change", ["type", "txid", "to"])
def test_the_box_is_bound_to_its_message_type_txid_and_receiver(receiver, change: str) -> None:
    private, public = receiver
    box = seal(CONFIG, public, ctype=MIGRATE, txid=7, to="10.14.0.1")
    where = {"ctype": MIGRATE, "txid": 7, "to": "10.14.0.1"}
    where.update({"type": {"ctype": ControlType.STATE_TRANSFER}, "txid": {"txid": 8},
                  "to": {"to": "10.20.0.1"}}[change])
    with pytest.raises(SealError, match="does not open"):
        open_sealed(box, private, **where)


@pytest.mark.parametrize("part", ["ct", "nonce", "epk"])
def test_a_tampered_box_is_refused(receiver, part: str) -> None:
    private, public = receiver
    box = seal(CONFIG, public, ctype=MIGRATE, txid=7, to="10.14.0.1")
    raw = bytearray(base64.b64decode(box[part]))
    raw[len(raw) // 2] ^= 0x01
    box[part] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(SealError):
        open_sealed(box, private, ctype=MIGRATE, txid=7, to="10.14.0.1")


@pytest.mark.parametrize("box", [None, "x", {}, {"alg": "none"},
                                 {"alg": "x25519-hkdf-sha256-chacha20poly1305", "epk": "!",
                                  "nonce": "AA==", "ct": "AA=="}])
def test_a_malformed_box_is_refused_with_a_clear_error(receiver, box) -> None:
    with pytest.raises(SealError):
        open_sealed(box, receiver[0], ctype=MIGRATE, txid=7, to="10.14.0.1")


def test_the_secret_fields_of_each_message() -> None:
    start = {"action": "start", "spec": "x", "warm": True, "config": CONFIG, "state": {"n": 1},
             "vm": {"mobile": {}}}
    assert secret_fields(MIGRATE, start) == ["config", "state", "vm"]
    assert secret_fields(MIGRATE, {"action": "cancel", "name": "counter"}) == []
    assert secret_fields(ControlType.STATE_TRANSFER, {"name": "c", "state": None}) == ["state"]
    assert secret_fields(ControlType.PROVISION, {"vm": "v", "mobile": {}}) == ["mobile"]
    # VM_NEGOTIATE's vm is a VM description (with keys) in start, a name in cancel.
    assert secret_fields(ControlType.VM_NEGOTIATE, {"action": "start", "vm": {"a": 1},
                                                     "state": 1}) == ["state", "vm"]
    assert secret_fields(ControlType.VM_NEGOTIATE, {"action": "cancel", "vm": "v-d1"}) == []
    assert secret_fields(ControlType.LEASE_REQUEST, {"state": 1, "config": 2}) == []


def test_a_body_round_trips_with_its_public_fields_readable(receiver) -> None:
    private, public = receiver
    body = {"action": "start", "spec": "agent.objects.counter:Counter", "warm": True,
            "config": CONFIG}
    sealed = seal_body(body, public, ctype=MIGRATE, txid=3, to="10.14.0.1")
    assert set(sealed) == {"action", "spec", "warm", SEALED}
    wire = ControlMessage.decode(ControlMessage(MIGRATE, 3, sealed).encode())
    assert b"aa" * 32 not in ControlMessage(MIGRATE, 3, sealed).encode()
    assert open_body(wire.body, private, ctype=MIGRATE, txid=3, to="10.14.0.1") == body
    # nothing secret: nothing sealed, the body as it is
    cancel = {"action": "cancel", "name": "counter"}
    assert seal_body(cancel, None, ctype=MIGRATE, txid=3, to="x") == cancel
    assert open_body(cancel, None, ctype=MIGRATE, txid=3, to="x") == cancel


def test_secrets_never_go_in_clear_and_are_never_taken_in_clear(receiver) -> None:
    private, public = receiver
    body = {"action": "start", "config": CONFIG}
    with pytest.raises(SealError, match="no public key"):  # the sender refuses to send
        seal_body(body, None, ctype=MIGRATE, txid=3, to="10.14.0.1")
    with pytest.raises(SealError, match="must be sealed"):  # the receiver refuses to take
        open_body(body, private, ctype=MIGRATE, txid=3, to="10.14.0.1")
    sealed = seal_body(body, public, ctype=MIGRATE, txid=3, to="10.14.0.1")
    with pytest.raises(SealError, match="no sealing key"):
        open_body(sealed, None, ctype=MIGRATE, txid=3, to="10.14.0.1")
    with pytest.raises(SealError, match="both sealed and in clear"):  # which one counts?
        vmn = ControlType.VM_NEGOTIATE
        clash = {"action": "cancel", "vm": "v-d1",
                 SEALED: seal({"vm": {"x": 1}}, public, ctype=vmn, txid=3, to="t")}
        open_body(clash, private, ctype=vmn, txid=3, to="t")
    with pytest.raises(SealError, match="not secret fields"):
        odd = {"action": "start", SEALED: seal({"action": "cancel"}, public, ctype=MIGRATE,
                                               txid=3, to="t")}
        open_body(odd, private, ctype=MIGRATE, txid=3, to="t")
    with pytest.raises(SealError, match="nothing of this message type"):
        other = {SEALED: seal({"x": 1}, public, ctype=ControlType.LEASE_REQUEST, txid=3, to="t")}
        open_body(other, private, ctype=ControlType.LEASE_REQUEST, txid=3, to="t")


def test_a_low_order_ephemeral_key_is_a_seal_error_not_a_crash(receiver) -> None:
    """An all-zero X25519 point gives no shared secret: refused as malformed, typed."""
    private, public = receiver
    box = seal({"k": 1}, public, ctype=ControlType.MIGRATE, txid=1, to="10.0.0.1")
    box["epk"] = base64.b64encode(bytes(32)).decode()
    with pytest.raises(SealError, match="malformed|does not open"):
        open_sealed(box, private, ctype=ControlType.MIGRATE, txid=1, to="10.0.0.1")
