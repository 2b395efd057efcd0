"""The object's at-most-once memory under attack (issue 12): one spoofed request cannot
silence a client, 100,000 fake client ids stay within the bounds and the checkpoint still fits
a migration, and a checkpoint's memory is checked before it is used."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent.hosting import at_most_once
from agent.hosting.at_most_once import (MAX_BYTES, MAX_CLIENTS, SEQ_AHEAD, SERVED_MEMORY,
                                        RequestMemory, Verdict)
from agent.hosting.runner import CheckpointError, ObjectServer, control_commands
from agent.objects.counter import Counter
from agent.sdk import MobileObject
from packets import ControlMessage, ControlType
from packets.control import MAX_BODY

ADDR = ("10.14.0.30", 5000)
SPOOFER = ("10.12.0.66", 5000)


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[dict, tuple]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append((ControlMessage.decode(data).body, addr))


def server(obj: MobileObject | None = None, warm: bool = False) -> tuple[ObjectServer, FakeTransport]:
    s = ObjectServer(obj or Counter(), "counter", "r18b", warm)
    t = FakeTransport()
    s.connection_made(t)  # type: ignore[arg-type]
    return s, t


def request(seq: int, client: str = "co14", **extra) -> bytes:
    body = {"client": client, "seq": seq, "op": "incr", **extra}
    return ControlMessage(ControlType.SERVICE_REQUEST, seq & 0xFFFFFFFF, body).encode()


def replies_to(t: FakeTransport, addr: tuple) -> list[dict]:
    return [body for body, a in t.sent if a == addr]


@pytest.mark.parametrize("jump", [SEQ_AHEAD + 1, 10**15, SEQ_AHEAD, 5])
def test_one_spoofed_request_ahead_does_not_silence_the_client(jump: int) -> None:
    """Far ahead: refused and not remembered. Within the window: served (a spoofer can use
    an open service as anyone), but the real client's next requests are still served."""
    s, t = server()
    for seq in (1, 2, 3):
        s.datagram_received(request(seq), ADDR)
    s.datagram_received(request(3 + jump), SPOOFER)
    for seq in (4, 5, 6):
        s.datagram_received(request(seq), ADDR)
    mine = replies_to(t, ADDR)
    assert [(b["seq"], b["ok"]) for b in mine] == [(1, True), (2, True), (3, True),
                                                   (4, True), (5, True), (6, True)]
    spoofed = replies_to(t, SPOOFER)[0]
    if jump > SEQ_AHEAD:
        assert spoofed["ok"] is False and spoofed["seq_error"] == "ahead"
        assert s.stats["seq_refused"] == 1 and s.obj.count == 6
        assert 3 + jump not in s.seen.get("co14").served
    else:
        assert spoofed["ok"] is True and s.obj.count == 7
    # ... and the poisoned entry, if any, does not poison the next instance either.
    new, t2 = server(warm=True)
    new.restore(s.checkpoint())
    new.serve()
    new.datagram_received(request(6), ADDR)  # a duplicate of the last: answered from memory
    new.datagram_received(request(7), ADDR)
    assert [(b["seq"], b["result"]["count"]) for b in replies_to(t2, ADDR)] == \
        [(6, s.obj.count), (7, s.obj.count + 1)]


def test_a_client_id_used_first_by_a_spoofer_is_still_served() -> None:
    s, t = server()
    s.datagram_received(request(10**9, client="co14-new"), SPOOFER)
    for seq in (1, 2):
        s.datagram_received(request(seq, client="co14-new"), ADDR)
    assert [b["ok"] for b in replies_to(t, ADDR)] == [True, True]


def test_up_to_served_memory_spoofed_requests_do_not_stop_in_order_requests() -> None:
    s, t = server()
    s.datagram_received(request(1), ADDR)
    for k in range(1, SERVED_MEMORY):  # with the real client's 1: the whole memory
        s.datagram_received(request(1 + k * SEQ_AHEAD // 2), SPOOFER)
    for seq in (2, 3, 4):
        s.datagram_received(request(seq), ADDR)
    assert [b["seq"] for b in replies_to(t, ADDR) if b["ok"]] == [1, 2, 3, 4]


def test_duplicates_and_reordering_are_still_handled_once() -> None:
    s, t = server()
    for seq in (1, 3, 2, 3, 2, 1):
        s.datagram_received(request(seq), ADDR)
    # 3 then 2 (reordered): both served; the repeat of the last (2) answered again;
    # the repeats of 3 and 1 dropped.
    assert [b["seq"] for b in replies_to(t, ADDR)] == [1, 3, 2, 2]
    assert s.obj.count == 3 and s.stats["duplicates"] == 1 and s.stats["stale"] == 2


def test_100000_fake_client_ids_stay_within_the_bounds_and_the_checkpoint_migrates() -> None:
    s, t = server()
    s.datagram_received(request(1), ADDR)
    started = time.monotonic()
    for i in range(100_000):
        s.datagram_received(request(1, client=f"fake-{i:06d}-" + "x" * 100), SPOOFER)
    elapsed = time.monotonic() - started
    assert len(s.seen) <= MAX_CLIENTS and s.seen.nbytes <= MAX_BYTES
    assert s.seen.evicted >= 100_000 + 1 - MAX_CLIENTS
    stats = control_commands(s, asyncio.Event())["stats"]({})
    assert stats["at_most_once"] == {"clients": len(s.seen), "bytes": s.seen.nbytes,
                                     "evicted": s.seen.evicted}
    assert len(json.dumps(s.seen.to_json(), separators=(",", ":"))) <= s.seen.nbytes
    size = len(json.dumps(s.checkpoint(), separators=(",", ":")))
    assert size <= MAX_BYTES + 4096 < MAX_BODY, size  # fits a STATE_TRANSFER body
    assert elapsed < 60, elapsed
    # The real client was evicted (least recently served) and is simply served again.
    s.datagram_received(request(2), ADDR)
    assert replies_to(t, ADDR)[-1]["ok"] is True


def test_the_bytes_of_remembered_replies_are_bounded() -> None:
    class Echo(MobileObject):
        def handle(self, request: dict) -> dict:
            return {"pad": request["pad"]}

    s, t = server(Echo())
    for i in range(40):  # 40 x 60 KB replies: more than the budget
        s.datagram_received(request(1, client=f"c{i}", pad="p" * 60_000), ADDR)
    assert s.seen.nbytes <= MAX_BYTES and "c39" in s.seen and "c0" not in s.seen
    assert all(b["ok"] for b in replies_to(t, ADDR))


def test_a_reply_too_large_to_remember_is_never_run_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    class Echo(MobileObject):
        calls = 0

        def handle(self, request: dict) -> dict:
            Echo.calls += 1
            return {"pad": request["pad"]}

    s, t = server(Echo())
    s.seen.reply_limit = 10_000
    s.datagram_received(request(1, pad="p" * 20_000), ADDR)
    s.datagram_received(request(1, pad="p" * 20_000), ADDR)
    first, again = replies_to(t, ADDR)
    assert first["ok"] is True and len(first["result"]["pad"]) == 20_000
    assert again["ok"] is False and "too large to remember" in again["error"]
    assert Echo.calls == 1


@pytest.mark.parametrize("body", [
    {"client": "co14", "seq": -1}, {"client": "co14", "seq": True}, {"client": "co14", "seq": "3"},
    {"client": "co14", "seq": 1.5}, {"client": "", "seq": 1}, {"client": 14, "seq": 1},
    {"client": "x" * 129, "seq": 1}, {"client": "co14", "seq": 1 << 63},
])
def test_bad_client_or_seq_is_malformed_and_remembers_nothing(body: dict) -> None:
    s, t = server()
    s.datagram_received(ControlMessage(ControlType.SERVICE_REQUEST, 1, body).encode(), ADDR)
    assert s.stats["malformed"] == 1 and t.sent == [] and len(s.seen) == 0


@pytest.mark.parametrize("seen", [
    {"co14": {"floor": "x", "served": [], "last": 1, "reply": {}}},
    {"co14": {"floor": 5, "served": [3], "last": 5, "reply": {}}},
    {"co14": {"floor": 1, "served": list(range(2, 3 + SERVED_MEMORY)), "last": 5, "reply": {}}},
    {"co14": {"floor": 1, "served": [], "last": 1, "reply": "not an object"}},
    {"co14": [1]}, {"": [1, {}]}, [["co14", 1]],
])
def test_a_checkpoint_with_bad_memory_is_refused_and_changes_nothing(seen) -> None:
    s, _ = server()
    s.datagram_received(request(1), ADDR)
    before = s.checkpoint()
    with pytest.raises(ValueError, match="checkpoint"):
        s.restore({"object": {"count": 99}, "seen": seen, "served": 5})
    assert s.checkpoint() == before and s.obj.count == 1


def test_a_checkpoint_of_the_old_form_still_loads() -> None:
    s, t = server()
    s.restore({"object": {"count": 41}, "seen": {"co14": [41, {"ok": True, "result": {"count": 41},
                                                               "client": "co14", "seq": 41}]}})
    for seq in (41, 40, 42):
        s.datagram_received(request(seq), ADDR)
    assert [(b["seq"], b["result"]["count"]) for b in replies_to(t, ADDR)] == [(41, 41), (42, 42)]


class NaNState(Counter):
    def get_state(self):
        return {"count": self.count, "ratio": float("nan")}


class NaNReply(Counter):
    def handle(self, request: dict) -> dict:
        return {"ratio": float("inf")}


def test_an_object_whose_state_is_nan_cannot_checkpoint_and_keeps_serving() -> None:
    s, t = server(NaNState())
    s.datagram_received(request(1), ADDR)
    with pytest.raises(CheckpointError, match="not strict JSON"):
        s.checkpoint()
    s.datagram_received(request(2), ADDR)
    assert [b["ok"] for b in replies_to(t, ADDR)] == [True, True]


def test_a_reply_that_is_not_json_is_remembered_as_an_error_and_checkpoints() -> None:
    s, t = server(NaNReply())
    s.datagram_received(request(1), ADDR)
    s.datagram_received(request(1), ADDR)
    assert [b["ok"] for b in replies_to(t, ADDR)] == [False, False]
    assert "not JSON" in replies_to(t, ADDR)[0]["error"]
    json.dumps(s.checkpoint(), allow_nan=False)  # strict JSON: it can migrate


def test_memory_merge_keeps_everything_either_served() -> None:
    a, b = RequestMemory(), RequestMemory()
    for seq in (1, 2, 3):
        a.remember("co", seq, {"seq": seq}, 10)
    for seq in (2, 5):
        b.remember("co", seq, {"seq": seq}, 10)
    a.merge(b.to_json())
    assert [a.check("co", s)[0] for s in (1, 2, 3, 4, 5)] == \
        [Verdict.STALE, Verdict.STALE, Verdict.STALE, Verdict.NEW, Verdict.DUPLICATE]


def test_the_floor_never_passes_a_seq_that_was_not_served() -> None:
    memory = RequestMemory()
    for seq in [1, 2, 3] + list(range(5, 5 + SERVED_MEMORY)):
        memory.remember("co", seq, {}, 10)
    # 4 was never served: the floor stays below it until more than SERVED_MEMORY higher seqs
    # (here exactly SERVED_MEMORY) were served.
    assert memory.check("co", 4)[0] is Verdict.NEW
    assert at_most_once.SERVED_MEMORY == len(memory.get("co").served)


def test_a_request_read_after_the_stop_is_not_answered_beyond_the_final_state() -> None:
    """The stop's checkpoint is final: a request the object's loop still reads before the
    process ends is queued (and carried as pending), never answered with a count that the
    instance starting from that checkpoint would give again."""
    s, t = server()
    s.datagram_received(request(1), ADDR)
    final = control_commands(s, asyncio.Event())["stop"]({})
    s.datagram_received(request(2), ADDR)  # still read by the loop before it ends
    assert [b["seq"] for b in replies_to(t, ADDR)] == [1]
    assert s.obj.count == 1 and final["pending"] == []
    assert [m.body["seq"] for m, _ in s.queue] == [2]  # queued: never answered here
