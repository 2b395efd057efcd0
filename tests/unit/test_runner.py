"""The object runtime's request filter, warm-up queue and checkpoints (no network)."""

from __future__ import annotations

import pytest

from agent.objects.counter import Counter
from agent.runner import ObjectServer, load_object
from packets import ControlMessage, ControlType


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[dict, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((ControlMessage.decode(data).body, addr))


def request(seq: int, client: str = "co", op: str = "incr") -> bytes:
    return ControlMessage(ControlType.SERVICE_REQUEST, seq, {"client": client, "seq": seq, "op": op}).encode()


def server(warm: bool = False) -> tuple[ObjectServer, FakeTransport]:
    s = ObjectServer(Counter(), "counter", "r18b", warm)
    t = FakeTransport()
    s.connection_made(t)  # type: ignore[arg-type]
    return s, t


ADDR = ("10.14.0.30", 5000)


def test_each_request_counted_once_and_duplicates_get_the_same_reply() -> None:
    s, t = server()
    for seq in (1, 2, 2, 3, 1):
        s.datagram_received(request(seq), ADDR)
    counts = [body["result"]["count"] for body, _ in t.sent]
    assert counts == [1, 2, 2, 3]  # the duplicate of 2 is answered again, stale 1 is dropped
    assert s.stats["duplicates"] == 1 and s.stats["stale"] == 1 and s.obj.count == 3
    assert all(body["served_by"] == "r18b" for body, _ in t.sent)


def test_malformed_and_foreign_messages_are_counted_not_served() -> None:
    s, t = server()
    s.datagram_received(b"garbage", ADDR)
    s.datagram_received(ControlMessage(ControlType.LEASE_REQUEST, 1, {}).encode(), ADDR)
    s.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 1, {"seq": 1}).encode(), ADDR)
    assert s.stats["malformed"] == 3 and t.sent == [] and s.obj.count == 0


def test_unknown_op_is_an_error_reply_not_a_crash() -> None:
    s, t = server()
    s.datagram_received(request(1, op="explode"), ADDR)
    assert t.sent[0][0]["ok"] is False and "unknown op" in t.sent[0][0]["error"]


def test_warm_instance_replays_only_what_the_checkpoint_has_not_seen() -> None:
    old, _ = server()
    new, t = server(warm=True)
    for seq in (1, 2, 3):  # before bicast: only the old instance
        old.datagram_received(request(seq), ADDR)
    for seq in (4, 5):  # bicast: both get them; the new one queues
        old.datagram_received(request(seq), ADDR)
        new.datagram_received(request(seq), ADDR)
    checkpoint = old.checkpoint()  # taken after 5
    new.datagram_received(request(6), ADDR)  # arrives at the new one before its state
    old.datagram_received(request(6), ADDR)
    new.restore(checkpoint)
    assert new.serve() == 3
    assert new.obj.count == old.obj.count == 6
    assert [b["result"]["count"] for b, _ in t.sent] == [6]  # 4 and 5 already in the checkpoint


def test_load_object_checks_spec() -> None:
    assert isinstance(load_object("agent.objects.counter:Counter"), Counter)
    with pytest.raises(ValueError):
        load_object("agent.objects.counter")
    with pytest.raises(TypeError):
        load_object("collections:OrderedDict")


def test_a_service_that_is_not_extensible_refuses_other_services() -> None:
    s = ObjectServer(Counter(), "counter", "r18b", False, extensible=False)
    t = FakeTransport()
    s.connection_made(t)  # type: ignore[arg-type]
    body = {"client": "co", "seq": 1, "op": "incr", "from_service": "text2html"}
    s.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 1, body).encode(), ADDR)
    s.datagram_received(request(2), ADDR)  # a corresponding object's own request is served
    assert t.sent[0][0]["ok"] is False and "not extensible" in t.sent[0][0]["error"]
    assert t.sent[1][0]["ok"] is True and s.obj.count == 1


def test_a_held_instance_hands_its_unserved_requests_to_the_next_one() -> None:
    """The source holds (its address is about to go), keeps receiving, and stops: what it
    received but did not answer is in its checkpoint, and the next instance answers each
    of those once, merged in order with its own queue (bicast copies included)."""
    old, t_old = server()
    new, t_new = server(warm=True)
    old.datagram_received(request(1), ADDR)
    old.hold()
    old.datagram_received(request(2), ADDR)
    old.datagram_received(request(3, client="other"), ("10.14.0.31", 5000))
    old.datagram_received(request(3), ADDR)
    new.datagram_received(request(3), ADDR)  # a bicast copy the new one queued too
    checkpoint = old.checkpoint()
    assert len(t_old.sent) == 1 and old.obj.count == 1, "a held instance answers nothing"
    assert [p[1]["seq"] for p in checkpoint["pending"]] == [2, 3, 3]
    new.restore(checkpoint)
    new.serve()
    answered = [(b["client"], b["seq"], b["result"]["count"], a) for b, a in t_new.sent]
    assert sorted((c, q) for c, q, _, _ in answered) == [("co", 2), ("co", 3), ("other", 3)]
    assert new.obj.count == 4 and new.stats["served"] == 4  # 1 at the old place, 3 here
    assert ("other", 3) in {(c, q) for c, q, _, a in answered if a == ("10.14.0.31", 5000)}
