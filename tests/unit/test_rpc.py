"""agent.core.rpc: JSON lines with request ids, both sides, and ObjectProcess on top of it.

The client and server tests run both ends in one event loop over a socketpair, one end driven
by hand (raw lines) so that the tests can send what a correct peer never would. The
ObjectProcess tests run a real child process (a few lines of Python, or the real object runner)
on the other end of the socketpair, without the sandbox (no root needed): what matters here is
the channel and that ``stop()`` ends the process whatever the channel's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from agent.core import rpc
from agent.core.errors import AgentError
from agent.hosting import runtime
from agent.hosting.runtime import ObjectProcessError
from plain_object import PlainSandbox, fake_child, object_on

TEST_TIMEOUT = 30.0


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main()`` in a fresh loop, bounded so a broken channel fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


class RawPeer:
    """The far end of a socketpair, written and read line by line by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, sock: socket.socket) -> RawPeer:
        return cls(*await asyncio.open_connection(sock=sock, limit=rpc.CHECKPOINT_LINE_LIMIT))

    async def request(self) -> dict[str, Any]:
        return json.loads(await self.reader.readline())

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")
        await self.writer.drain()

    async def answer(self, req: dict[str, Any], result: Any) -> None:
        await self.send({"id": req["id"], "ok": True, "result": result})


async def client_and_peer(limit: int = rpc.CHECKPOINT_LINE_LIMIT) -> tuple[rpc.RpcClient, RawPeer]:
    mine, theirs = socket.socketpair()
    client = await rpc.RpcClient.over_socket(mine, name="test peer", limit=limit)
    return client, await RawPeer.open(theirs)


def in_background(coro: Awaitable[Any]) -> asyncio.Task:
    return asyncio.ensure_future(coro)


# --- the async client -----------------------------------------------------------------------


def test_every_request_carries_a_new_id_and_answers_echo_it() -> None:
    async def main() -> tuple[list[dict], list[Any]]:
        client, peer = await client_and_peer()
        seen, results = [], []
        for n in range(3):
            call = in_background(client.call("echo", {"n": n}, timeout=5))
            req = await peer.request()
            seen.append(req)
            await peer.answer(req, req["args"])
            results.append(await call)
        await client.close()
        return seen, results

    seen, results = run(main)
    assert [r["id"] for r in seen] == [1, 2, 3]
    assert seen[0] == {"id": 1, "cmd": "echo", "args": {"n": 0}}
    assert results == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_a_late_answer_is_discarded_not_taken_for_the_next_call(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.core.rpc")

    async def main() -> Any:
        client, peer = await client_and_peer()
        with pytest.raises(rpc.RpcTimeout):
            await client.call("slow", timeout=0.2)
        late = await peer.request()
        call = in_background(client.call("fast", timeout=5))
        fast = await peer.request()
        await peer.answer(late, "answer to slow")  # arrives while "fast" waits
        await peer.answer(fast, "answer to fast")
        result = await call
        await client.close()
        return result

    assert run(main) == "answer to fast"
    assert "late answer to call 1 (slow) discarded" in caplog.text


def test_an_answer_with_an_unknown_id_is_discarded_and_logged(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.core.rpc")

    async def main() -> Any:
        client, peer = await client_and_peer()
        call = in_background(client.call("x", timeout=5))
        req = await peer.request()
        await peer.send({"id": 99, "ok": True, "result": "not yours"})
        await peer.answer(req, "yours")
        result = await call
        await client.close()
        return result

    assert run(main) == "yours"
    assert "unknown id 99 discarded" in caplog.text


@pytest.mark.parametrize("garbage,error", [
    (b"this is not json\n", "not JSON"),
    (b'{"ok": true, "result": 1}\n', "without an id"),
    (b'{"id": 1, "result": 1}\n', "neither ok nor an error"),
    (b"[1, 2]\n", "without an id"),
])
def test_a_garbled_answer_fails_that_call_only_and_the_channel_stays_usable(garbage: bytes, error: str) -> None:
    async def main() -> Any:
        client, peer = await client_and_peer()
        call = in_background(client.call("first", timeout=5))
        await peer.request()
        await peer.send(garbage)
        with pytest.raises(rpc.RpcProtocolError, match=error):
            await call
        call = in_background(client.call("second", timeout=5))
        await peer.answer(await peer.request(), "fine")
        result = await call
        await client.close()
        return result

    assert run(main) == "fine"


def test_an_over_long_answer_fails_that_call_and_is_skipped_to_its_end() -> None:
    async def main() -> Any:
        client, peer = await client_and_peer(limit=1024)
        call = in_background(client.call("big", timeout=5))
        req = await peer.request()
        await peer.send({"id": req["id"], "ok": True, "result": "x" * 5000})
        with pytest.raises(rpc.RpcLineTooLong):
            await call
        call = in_background(client.call("small", timeout=5))
        await peer.answer(await peer.request(), "small")
        result = await call
        await client.close()
        return result

    assert run(main) == "small"


def test_an_over_long_request_is_refused_before_it_is_sent() -> None:
    async def main() -> None:
        client, peer = await client_and_peer(limit=1024)
        with pytest.raises(rpc.RpcLineTooLong):
            await client.call("big", {"pad": "x" * 5000}, timeout=5)
        call = in_background(client.call("small", timeout=5))
        req = await peer.request()  # the first line the peer sees
        assert req["cmd"] == "small"
        await peer.answer(req, None)
        await call
        await client.close()

    run(main)


def test_a_refusal_is_a_remote_error() -> None:
    async def main() -> None:
        client, peer = await client_and_peer()
        call = in_background(client.call("nope", timeout=5))
        req = await peer.request()
        await peer.send({"id": req["id"], "ok": False, "error": "unknown command 'nope'"})
        with pytest.raises(rpc.RpcRemoteError, match="unknown command 'nope'") as info:
            await call
        assert isinstance(info.value, AgentError) and info.value.cmd == "nope"
        await client.close()

    run(main)


def test_a_closed_channel_fails_the_waiting_call_and_every_later_one() -> None:
    async def main() -> None:
        client, peer = await client_and_peer()
        call = in_background(client.call("x", timeout=5))
        await peer.request()
        peer.writer.close()
        with pytest.raises(rpc.RpcClosed):
            await call
        assert client.broken
        with pytest.raises(rpc.RpcClosed):
            await client.call("y", timeout=5)
        await client.close()

    run(main)


# --- the server -----------------------------------------------------------------------------


async def server_and_peer(handler: rpc.Handler, limit: int = rpc.CHECKPOINT_LINE_LIMIT,
                          until: asyncio.Event | None = None) -> tuple[asyncio.Task, RawPeer]:
    mine, theirs = socket.socketpair()
    server = rpc.RpcServer(handler, request_limit=limit, answer_limit=limit)
    task = in_background(server.serve_socket(mine, until=until))
    return task, await RawPeer.open(theirs)


def table(stop: asyncio.Event | None = None) -> rpc.Handler:
    def crash(_args: dict) -> Any:
        raise RuntimeError("kaboom")

    def stop_now(_args: dict) -> str:
        assert stop is not None
        stop.set()
        return "stopping"

    return rpc.command_table({"echo": lambda args: args, "crash": crash, "stop": stop_now,
                              "big": lambda args: "x" * args["n"]})


def test_server_unknown_command_and_handler_crash_are_answered_and_serving_goes_on() -> None:
    async def main() -> list[dict]:
        task, peer = await server_and_peer(table())
        answers = []
        for req in ({"id": 1, "cmd": "nope"}, {"id": 2, "cmd": "crash"},
                    {"id": 3, "cmd": "echo", "args": {"a": 1}}):
            await peer.send(req)
            answers.append(json.loads(await peer.reader.readline()))
        peer.writer.close()
        await task  # end of stream ends serving
        return answers

    nope, crash, echo = run(main)
    assert nope == {"id": 1, "ok": False, "error": "unknown command 'nope'"}
    assert crash["id"] == 2 and crash["ok"] is False and "internal error" in crash["error"]
    assert "kaboom" in crash["error"]
    assert echo == {"id": 3, "ok": True, "result": {"a": 1}}


def test_server_skips_an_over_long_request_and_serves_the_next_line() -> None:
    async def main() -> list[dict]:
        task, peer = await server_and_peer(table(), limit=1024)
        await peer.send({"id": 1, "cmd": "echo", "args": {"pad": "x" * 5000}})
        await peer.send({"id": 2, "cmd": "echo", "args": {"k": 2}})
        answers = [json.loads(await peer.reader.readline()) for _ in range(2)]
        peer.writer.close()
        await task
        return answers

    too_long, after = run(main)
    assert too_long == {"id": None, "ok": False, "error": "request line too long"}
    assert after == {"id": 2, "ok": True, "result": {"k": 2}}


def test_server_refuses_to_send_an_answer_over_the_limit() -> None:
    async def main() -> dict:
        task, peer = await server_and_peer(table(), limit=1024)
        await peer.send({"id": 5, "cmd": "big", "args": {"n": 5000}})
        answer = json.loads(await peer.reader.readline())
        peer.writer.close()
        await task
        return answer

    answer = run(main)
    assert answer["id"] == 5 and answer["ok"] is False and "line limit" in answer["error"]


def test_server_answers_the_command_that_stops_it_then_returns() -> None:
    async def main() -> dict:
        stop = asyncio.Event()
        task, peer = await server_and_peer(table(stop), until=stop)
        await peer.send({"id": 1, "cmd": "stop"})
        answer = json.loads(await peer.reader.readline())
        await task  # returns without the peer closing
        assert await peer.reader.read() == b""  # and closed its end
        return answer

    assert run(main) == {"id": 1, "ok": True, "result": "stopping"}


def test_client_and_server_together() -> None:
    async def main() -> list[Any]:
        mine, theirs = socket.socketpair()
        server = rpc.RpcServer(table(), request_limit=4096)
        task = in_background(server.serve_socket(theirs))
        client = await rpc.RpcClient.over_socket(mine, name="server", limit=4096)
        out = [await client.call("echo", {"i": i}, timeout=5) for i in range(3)]
        with pytest.raises(rpc.RpcRemoteError, match="unknown command"):
            await client.call("nope", timeout=5)
        out.append(await client.call("echo", timeout=5))
        await client.close()
        await task
        return out

    assert run(main) == [{"i": 0}, {"i": 1}, {"i": 2}, {}]


# --- ObjectProcess over a real child process ------------------------------------------------


LATE_CHILD = fake_child("""
    def send(req, result):
        f.write(json.dumps({"id": req.get("id"), "ok": True, "result": result}).encode() + b"\\n")
        f.flush()
    first = json.loads(f.readline())
    second = json.loads(f.readline())  # the first call has timed out by now
    send(first, "answer to first")
    send(second, "answer to second")
    for line in f:  # then answer each command with its name, until end of stream
        req = json.loads(line)
        send(req, req["cmd"])
""")

GARBLED_CHILD = fake_child("""
    f.readline()
    f.write(b"Traceback (most recent call last): not an answer\\n")
    f.flush()
    signal.pause()  # hung from here on: only a kill ends it
""")


def test_object_process_never_takes_a_late_answer_for_the_next_call(tmp_path: Path) -> None:
    async def main() -> tuple[Any, Any, Any]:
        obj = await object_on(tmp_path, LATE_CHILD)
        with pytest.raises(ObjectProcessError, match="did not answer first") as info:
            await obj.call("first", timeout=0.3)
        assert isinstance(info.value.__cause__, rpc.RpcTimeout)
        second = await obj.call("second")
        third = await obj.call("third")
        final = await obj.stop()
        return second, third, final

    second, third, final = run(main)
    assert (second, third, final) == ("answer to second", "third", "stop")


def test_a_garbled_object_answer_fails_the_call_and_stop_still_kills_the_object(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "STOP_TIMEOUT", 0.3)

    async def main() -> tuple[Any, PlainSandbox]:
        obj = await object_on(tmp_path, GARBLED_CHILD)
        with pytest.raises(ObjectProcessError, match="did not answer stats") as info:
            await obj.call("stats")
        assert isinstance(info.value.__cause__, rpc.RpcProtocolError)
        sandbox = obj.sandbox
        state = await obj.stop()
        return state, sandbox

    state, sandbox = run(main)
    assert state is None
    assert sandbox.killed and sandbox.proc.returncode == -9


def test_object_process_and_the_real_runner(tmp_path: Path) -> None:
    """ObjectProcess and agent.hosting.runner agree on the protocol: commands, state both ways,
    a refusal, and a stop that returns the final checkpoint and ends the process."""
    argv = [sys.executable, "-m", "agent.hosting.runner", "--spec", "agent.objects.counter:Counter",
            "--name", "counter", "--address", "127.0.0.1", "--port", "0", "--control-fd", "{fd}"]

    async def main() -> tuple[Any, ...]:
        obj = await object_on(tmp_path, argv)
        stats = await obj.call("stats", timeout=20)  # the first answer waits for imports
        state = await obj.call("get_state")
        state["object"] = dict(state["object"], count=41)
        replayed = await obj.call("set_state", state=state)
        with pytest.raises(ObjectProcessError, match="refused frobnicate: unknown command") as info:
            await obj.call("frobnicate")
        assert isinstance(info.value.__cause__, rpc.RpcRemoteError)
        held = await obj.call("hold")
        sandbox = obj.sandbox
        final = await obj.stop()
        return stats, replayed, held, final, sandbox

    stats, replayed, held, final, sandbox = run(main)
    assert stats["served"] == 0 and stats["pid"] == sandbox.pid
    assert replayed == {"replayed": 0} and held == {"queued": 0}
    assert final["object"]["count"] == 41
    assert sandbox.proc.returncode == 0 and not sandbox.killed


def test_a_server_that_closes_without_answering_is_reported_as_gone(tmp_path) -> None:
    """A crash mid-call (end of stream, no line) says the agent went away, not 'bad JSON'."""
    import socket as _socket
    import threading

    path = tmp_path / "dies.sock"
    server = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def accept_and_close() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=accept_and_close)
    thread.start()
    try:
        with pytest.raises(rpc.RpcClosed, match="closed the connection before answering migrate"):
            rpc.call_unix(path, "migrate", {}, timeout=5)
    finally:
        thread.join(5)
        server.close()
