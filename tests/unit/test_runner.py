"""The object runtime's request filter, warm-up queue and checkpoints (no network), then
the same server on real loopback sockets: UDP and TCP on one port, replies too large for UDP
fetched again over TCP, and the probe that does so."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Awaitable, Callable

import pytest

from agent.core.wait import async_wait_until

from agent.objects.counter import Counter
from agent.hosting.runner import UDP_REPLY_LIMIT, ObjectServer, load_object, start_service
from packets.control import MAX_BODY
from agent.sdk import MobileObject
from nodetools import probes
from packets import ControlMessage, ControlType
from packets.control import HEADER, frame_length


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


# --- real sockets: UDP and TCP on one loopback port ----------------------------------------

LOOPBACK = "127.0.0.1"
BIG = 200_000  # characters of blob: the encoded reply is about 200 KB, three times UDP's limit
WAIT = 10.0  # seconds any single network step may take before the test fails


def blob(seq: int, size: int) -> str:
    """What the Big object answers: depends on the request, so a test cannot pass on a
    reply meant for another request."""
    unit = f"{seq:06d}:"
    return (unit * (size // len(unit) + 1))[:size]


class Big(MobileObject):
    """Replies with ``size`` characters; counts how often ``handle`` actually ran."""

    def __init__(self) -> None:
        self.calls = 0

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"blob": blob(int(request["seq"]), int(request.get("size", 10))), "calls": self.calls}


def encoded(seq: int, client: str = "co", txid: int | None = None, **body: Any) -> bytes:
    return ControlMessage(ControlType.SERVICE_REQUEST, seq if txid is None else txid,
                          {"client": client, "seq": seq, **body}).encode()


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a condition the server reaches on its own (it shares this event loop)."""
    await async_wait_until(predicate, WAIT, interval=0.005, what=what)


async def udp_call(port: int, data: bytes) -> dict:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, addr: tuple) -> None:
            if not got.done():
                got.set_result(reply)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(LOOPBACK, port))
    try:
        transport.sendto(data)
        return ControlMessage.decode(await asyncio.wait_for(got, WAIT)).body
    finally:
        transport.close()


async def read_reply(reader: asyncio.StreamReader) -> ControlMessage:
    head = await asyncio.wait_for(reader.readexactly(HEADER.size), WAIT)
    rest = await asyncio.wait_for(reader.readexactly(frame_length(head) - HEADER.size), WAIT)
    return ControlMessage.decode(head + rest)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server ends the connection (FIN or RST) without sending anything."""
    try:
        return await asyncio.wait_for(reader.read(), WAIT) == b""
    except ConnectionResetError:
        return True


def with_server(obj: MobileObject, scenario: Callable[[ObjectServer, int], Awaitable[None]],
                warm: bool = False) -> ObjectServer:
    """Run ``scenario(server, port)`` against a real ObjectServer on a loopback port."""
    server = ObjectServer(obj, "big", "lo", warm)

    async def main() -> None:
        transport, tcp = await start_service(server, LOOPBACK, 0)
        assert tcp is not None
        port = transport.get_extra_info("sockname")[1]
        assert tcp.sockets[0].getsockname()[1] == port, "UDP and TCP share the port"
        try:
            await scenario(server, port)
        finally:
            tcp.close()
            transport.close()

    asyncio.run(main())
    return server


def test_udp_reply_too_large_is_answered_once_over_tcp() -> None:
    async def scenario(server: ObjectServer, port: int) -> None:
        notice = await udp_call(port, encoded(1, size=BIG))
        assert notice["ok"] is False and (notice["client"], notice["seq"]) == ("co", 1)
        assert notice["too_large"] > BIG and "ask again over TCP" in notice["error"]
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(encoded(1, txid=77, size=BIG))  # the same client and seq
        reply = await read_reply(reader)
        writer.close()
        assert reply.type == ControlType.SERVICE_REPLY and reply.txid == 77
        assert reply.body["ok"] is True and reply.body["result"]["blob"] == blob(1, BIG)
        assert abs(len(reply.encode()) - notice["too_large"]) < 32  # ("at" differs)
        small = await udp_call(port, encoded(2, size=10))  # small replies still go over UDP
        assert small["ok"] is True and small["result"] == {"blob": blob(2, 10), "calls": 2}

    server = with_server(Big(), scenario)
    assert server.obj.calls == 2, "the TCP retry must not run the request again"
    assert server.stats["served"] == 2 and server.stats["duplicates"] == 1
    assert server.stats["too_large"] == 1 and server.stats["malformed"] == 0


def test_tcp_requests_wait_in_the_warm_up_queue_until_serve() -> None:
    async def scenario(server: ObjectServer, port: int) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(encoded(1, client="tcp") + encoded(2, client="tcp"))  # back to back
        udp = asyncio.ensure_future(udp_call(port, encoded(1, client="both", size=BIG)))
        await until(lambda: server.stats["queued"] == 3, "3 requests queued")
        writer.write(encoded(1, client="both", size=BIG))  # the retry, while still warm
        await until(lambda: server.stats["queued"] == 4, "the retry queued")
        first = asyncio.ensure_future(read_reply(reader))
        await asyncio.sleep(0)  # let the read start: nothing to read yet
        assert not first.done() and not udp.done() and server.obj.calls == 0
        assert server.serve() == 4
        replies = [await first, await read_reply(reader), await read_reply(reader)]
        writer.close()
        # One connection, replies in the order served (by seq, clients interleaved).
        by_request = {(m.body["client"], m.body["seq"]): m.body for m in replies}
        assert sorted(by_request) == [("both", 1), ("tcp", 1), ("tcp", 2)]
        assert [by_request["tcp", n]["result"]["blob"] for n in (1, 2)] == [blob(1, 10), blob(2, 10)]
        assert by_request["tcp", 1]["result"]["calls"] < by_request["tcp", 2]["result"]["calls"]
        assert (await udp)["too_large"] > BIG
        assert by_request["both", 1]["result"]["blob"] == blob(1, BIG)

    server = with_server(Big(), scenario, warm=True)
    assert server.obj.calls == 3 and server.stats["duplicates"] == 1
    assert server.stats["stale"] == 0 and not server.streams


def test_malformed_tcp_frames_close_that_connection_only() -> None:
    async def scenario(server: ObjectServer, port: int) -> None:
        bad = [
            b"XX" + bytes(10),  # bad magic
            HEADER.pack(b"MO", 1, int(ControlType.SERVICE_REQUEST), 1, MAX_BODY + 1),  # too long
            ControlMessage(ControlType.LEASE_REQUEST, 1, {}).encode(),  # not a service request
            encoded(1)[:-1] + b"!",  # body not JSON
            ControlMessage(ControlType.SERVICE_REQUEST, 1, {"seq": 1}).encode(),  # no client
        ]
        keep_r, keep_w = await asyncio.open_connection(LOOPBACK, port)  # a good client, open throughout
        for n, frame in enumerate(bad, 1):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(frame)
            assert await closed_by_server(reader), frame
            writer.close()
            assert server.stats["malformed"] == n
        keep_w.write(encoded(1, size=10))
        assert (await read_reply(keep_r)).body["result"]["calls"] == 1
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(encoded(1, client="new", size=10)[:5])  # cut within the header
        writer.write_eof()
        assert await closed_by_server(reader)
        writer.close()
        assert server.stats["malformed"] == len(bad) + 1
        assert (await udp_call(port, encoded(2, size=10)))["result"]["calls"] == 2
        keep_w.close()

    server = with_server(Big(), scenario)
    assert server.obj.calls == 2


def test_tcp_connections_are_bounded_and_idle_ones_closed() -> None:
    async def scenario(server: ObjectServer, port: int) -> None:
        server.max_streams = 2
        server.idle_timeout = 0.3
        opened = [await asyncio.open_connection(LOOPBACK, port) for _ in range(2)]
        await until(lambda: len(server.streams) == 2, "two connections served")
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        assert await closed_by_server(reader)
        writer.close()
        assert server.stats["tcp_refused"] == 1
        for reader, writer in opened:  # sent nothing: closed after idle_timeout
            assert await closed_by_server(reader)
            writer.close()
        await until(lambda: not server.streams, "idle connections forgotten")
        reader, writer = await asyncio.open_connection(LOOPBACK, port)  # room again
        writer.write(encoded(1, size=10))
        assert (await read_reply(reader)).body["ok"] is True
        writer.close()

    with_server(Big(), scenario)


def test_a_half_closing_tcp_client_still_gets_its_queued_reply() -> None:
    async def scenario(server: ObjectServer, port: int) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(encoded(1, size=10))
        writer.write_eof()  # done sending; waits for the answer
        await until(lambda: server.stats["queued"] == 1, "the request queued")
        server.serve()
        assert (await read_reply(reader)).body["result"]["blob"] == blob(1, 10)
        assert await closed_by_server(reader)
        writer.close()

    with_server(Big(), scenario, warm=True)


def test_a_reply_too_large_for_any_transport_is_an_error_reply() -> None:
    s = ObjectServer(Big(), "big", "r18b", False)
    t = FakeTransport()
    s.connection_made(t)  # type: ignore[arg-type]
    s.datagram_received(encoded(1, size=MAX_BODY + 10), ADDR)
    s.datagram_received(encoded(1, size=MAX_BODY + 10), ADDR)  # its duplicate: same answer
    assert [b["ok"] for b, _ in t.sent] == [False, False]
    assert "cannot be sent" in t.sent[0][0]["error"] and "too_large" not in t.sent[0][0]
    assert s.obj.calls == 1 and s.stats["duplicates"] == 1


def test_the_udp_limit_is_on_the_encoded_reply() -> None:
    s = ObjectServer(Big(), "big", "r18b", False)
    t = FakeTransport()
    s.connection_made(t)  # type: ignore[arg-type]
    s.datagram_received(encoded(1, size=UDP_REPLY_LIMIT - 1000), ADDR)
    s.datagram_received(encoded(2, size=UDP_REPLY_LIMIT), ADDR)
    assert t.sent[0][0]["ok"] is True and t.sent[1][0]["too_large"] > UDP_REPLY_LIMIT


def test_probe_service_falls_back_to_tcp() -> None:
    results: dict[str, dict] = {}

    async def scenario(server: ObjectServer, port: int) -> None:
        call = probes.service
        results["udp"] = await asyncio.to_thread(call, LOOPBACK, port, {"seq": 5, "size": BIG}, WAIT)
        assert server.stats["too_large"] == 1 and server.stats["duplicates"] == 1
        results["tcp"] = await asyncio.to_thread(call, LOOPBACK, port, {"seq": 6, "size": BIG}, WAIT, True)
        results["small"] = await asyncio.to_thread(call, LOOPBACK, port, {"seq": 7}, WAIT)
        # a request that does not fit in a datagram goes over TCP by itself
        results["big_request"] = await asyncio.to_thread(
            call, LOOPBACK, port, {"seq": 8, "pad": "p" * 70_000}, WAIT)

    server = with_server(Big(), scenario)
    assert results["udp"]["ok"] is True and results["udp"]["result"]["blob"] == blob(5, BIG)
    assert results["tcp"]["ok"] is True and results["tcp"]["result"]["blob"] == blob(6, BIG)
    assert results["small"]["result"]["blob"] == blob(7, 10)
    assert results["big_request"]["result"]["blob"] == blob(8, 10)
    assert server.obj.calls == 4, "one execution per request, fallback included"
    assert server.stats["too_large"] == 1 and server.stats["duplicates"] == 1


def test_probe_service_command_line_takes_tcp(capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario(server: ObjectServer, port: int) -> None:
        code = await asyncio.to_thread(
            probes.main, ["service", LOOPBACK, str(port), json.dumps({"size": BIG}), "--tcp"])
        assert code == 0

    server = with_server(Big(), scenario)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ok"] is True and out["result"]["blob"] == blob(1, BIG)
    assert server.stats["too_large"] == 0 and server.obj.calls == 1


def test_an_object_without_tcp_still_serves_udp(caplog: pytest.LogCaptureFixture) -> None:
    """A port whose TCP side is taken: the object starts anyway and says why TCP is missing."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind((LOOPBACK, 0))
    taken.listen()
    port = taken.getsockname()[1]
    server = ObjectServer(Big(), "big", "lo", False)

    async def main() -> dict:
        transport, tcp = await start_service(server, LOOPBACK, port)
        try:
            assert tcp is None
            return await udp_call(port, encoded(1, size=10))
        finally:
            transport.close()

    try:
        with caplog.at_level("WARNING", logger="agent.hosting.runner"):
            assert asyncio.run(main())["ok"] is True
    finally:
        taken.close()
    assert "no TCP" in caplog.text
