"""The sealing keys a router keeps between messages (issue 14): one ephemeral key per
receiver and message type for a bounded time, every box still distinct and bound to its
message; a receiver's cached keys never open a box that is not its own."""

from __future__ import annotations

import base64
import os

import pytest

from agent.core import sealing
from agent.core.sealing import SealError, generate_keypair, open_sealed, seal
from packets import ControlType

from tests.unit.fakeclock import FakeClock

MIGRATE = ControlType.MIGRATE
DOC = {"state": {"n": 41}}


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock(1000.0)
    monkeypatch.setattr(sealing, "_SENDING", sealing._BoxKeys(max_age=sealing.EPHEMERAL_REUSE_S,
                                                               clock=clock))
    monkeypatch.setattr(sealing, "_OPENING", sealing._BoxKeys())
    return clock


def test_a_sender_reuses_its_ephemeral_key_per_receiver_and_type_within_the_window(clock) -> None:
    private, public = generate_keypair()
    first = seal(DOC, public, ctype=MIGRATE, txid=1, to="10.14.0.1")
    second = seal(DOC, public, ctype=MIGRATE, txid=2, to="10.14.0.1")
    assert first["epk"] == second["epk"]
    assert first["nonce"] != second["nonce"] and first["ct"] != second["ct"]  # distinct boxes
    # another type or receiver name: another ephemeral key
    assert seal(DOC, public, ctype=ControlType.STATE_TRANSFER, txid=1, to="10.14.0.1")["epk"] != first["epk"]
    assert seal(DOC, public, ctype=MIGRATE, txid=1, to="10.14.0.2")["epk"] != first["epk"]
    # another receiver's key: another ephemeral key
    _, other = generate_keypair()
    assert seal(DOC, other, ctype=MIGRATE, txid=1, to="10.14.0.1")["epk"] != first["epk"]
    clock.advance(sealing.EPHEMERAL_REUSE_S)
    third = seal(DOC, public, ctype=MIGRATE, txid=3, to="10.14.0.1")
    assert third["epk"] != first["epk"]
    for txid, box in ((1, first), (2, second), (3, third)):
        assert open_sealed(box, private, ctype=MIGRATE, txid=txid, to="10.14.0.1") == DOC


def test_a_box_under_a_reused_key_still_opens_only_for_its_message(clock) -> None:
    private, public = generate_keypair()
    box = seal(DOC, public, ctype=MIGRATE, txid=7, to="10.14.0.1")
    assert open_sealed(box, private, ctype=MIGRATE, txid=7, to="10.14.0.1") == DOC  # key cached
    with pytest.raises(SealError, match="does not open"):
        open_sealed(box, private, ctype=MIGRATE, txid=8, to="10.14.0.1")
    other_private, _ = generate_keypair()
    with pytest.raises(SealError, match="does not open"):  # another receiver, same epk
        open_sealed(box, other_private, ctype=MIGRATE, txid=7, to="10.14.0.1")
    box["nonce"] = base64.b64encode(os.urandom(12)).decode()
    with pytest.raises(SealError, match="does not open"):
        open_sealed(box, private, ctype=MIGRATE, txid=7, to="10.14.0.1")


def test_the_key_caches_are_bounded() -> None:
    keys = sealing._BoxKeys(size=3)
    made: list[int] = []
    for i in range(5):
        keys.get(i, lambda i=i: made.append(i) or i)
    assert len(keys._keys) == 3
    assert keys.get(4, lambda: -1) == 4 and keys.get(0, lambda: -1) == -1  # 0 was forgotten
    with pytest.raises(SealError):  # a failed agreement is not kept
        keys.get("bad", lambda: (_ for _ in ()).throw(SealError("no")))
    assert "bad" not in keys._keys


def test_a_low_order_ephemeral_key_is_refused_every_time(clock) -> None:
    private, public = generate_keypair()
    box = seal(DOC, public, ctype=MIGRATE, txid=1, to="10.0.0.1")
    box["epk"] = base64.b64encode(bytes(32)).decode()
    for _ in range(2):
        with pytest.raises(SealError, match="malformed|does not open"):
            open_sealed(box, private, ctype=MIGRATE, txid=1, to="10.0.0.1")


def test_warming_runs_the_whole_box_once_per_key_and_refuses_a_bad_key(clock, monkeypatch) -> None:
    """At the agent's start, not at the first sealed message it receives: the key parsed
    and one box sealed and opened; a second call does nothing; a key that is not one is a
    SealError (the caller logs it)."""
    monkeypatch.setattr(sealing, "_WARMED", set())
    opened: list[str] = []
    real_open = sealing.open_sealed
    monkeypatch.setattr(sealing, "open_sealed",
                        lambda box, private, **kw: opened.append(kw["to"]) or real_open(box, private, **kw))
    private, _public = generate_keypair()
    sealing.warm(private)
    sealing.warm(private)
    assert opened == ["warm-up"] and private in sealing._WARMED
    with pytest.raises(SealError):
        sealing.warm(b"short")
