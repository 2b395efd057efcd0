"""agent.core.control: the control socket (agent.core.rpc's JSON lines with request ids),
served by asyncio, called by the blocking client.

Each test runs a ControlServer on a Unix socket in a short temporary directory (socket paths
are limited to ~107 bytes) and drives it with ControlClient in an executor thread, or with a
raw socket for input the client would never send.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.core.wait import wait_until

from agent.core.control import ControlClient, ControlServer
from agent.core.errors import ConfigError, ControlError

calls: list[tuple[str, dict]] = []
gate: dict[str, asyncio.Event] = {}


async def handler(cmd: str, args: dict[str, Any]) -> Any:
    calls.append((cmd, args))
    if cmd == "echo":
        return args
    if cmd == "wait":  # blocks until some other client sends "release"
        await gate["event"].wait()
        return "released"
    if cmd == "release":
        gate["event"].set()
        return None
    if cmd == "bytes":
        return {"b": b"\x01"}  # not JSON: the server falls back to str()
    if cmd == "crash":
        raise RuntimeError("kaboom")
    if cmd == "config":
        raise ConfigError("bad config value")
    if cmd == "value":
        raise ValueError("value out of range")
    raise ControlError(f"unknown command {cmd!r}")


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="moatctl")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def serve(path: Path, body: Callable[[Path], Any], **server_args: Any) -> Any:
    """Start a server at ``path``, run blocking ``body(path)`` in a thread, stop the server."""

    async def main() -> Any:
        gate["event"] = asyncio.Event()
        server = ControlServer(path, handler, **server_args)
        await server.start()
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, body, path), 20)
        finally:
            await server.stop()

    calls.clear()
    return asyncio.run(main())


def raw_exchange(path: Path, payload: bytes, lines: int = 1) -> list[dict]:
    """Send raw bytes on one connection, read ``lines`` answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        buf = b""
        while buf.count(b"\n") < lines:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_echo_ok(sock_dir: Path) -> None:
    def body(path: Path):
        c = ControlClient(path)
        return c.call("echo", a=1, b=[1, "x"], c={"d": None})

    assert serve(sock_dir / "r1.sock", body) == {"a": 1, "b": [1, "x"], "c": {"d": None}}
    assert calls == [("echo", {"a": 1, "b": [1, "x"], "c": {"d": None}})]


def test_socket_is_private_and_removed_on_stop(sock_dir: Path) -> None:
    path = sock_dir / "sub" / "r1.sock"

    def body(p: Path):
        st = os.stat(p)
        return stat.S_ISSOCK(st.st_mode), stat.S_IMODE(st.st_mode)

    assert serve(path, body) == (True, 0o600)
    assert not path.exists()


def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "r1.sock"
    path.write_text("left over from a killed daemon")
    assert serve(path, lambda p: ControlClient(p).call("echo", x=1)) == {"x": 1}


def test_unknown_command_raises_control_error(sock_dir: Path) -> None:
    def body(path: Path):
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            ControlClient(path).call("nope")
        return ControlClient(path).call("echo", still="alive")

    assert serve(sock_dir / "r1.sock", body) == {"still": "alive"}


@pytest.mark.parametrize("cmd,match", [
    ("crash", "internal error.*kaboom"),
    ("config", "bad config value"),
    ("value", "value out of range"),
])
def test_handler_exceptions_become_errors(sock_dir: Path, cmd: str, match: str) -> None:
    def body(path: Path):
        with pytest.raises(ControlError, match=match):
            ControlClient(path).call(cmd)
        # the server survived and serves the next connection
        return ControlClient(path).call("echo", n=2)

    assert serve(sock_dir / "r1.sock", body) == {"n": 2}


def test_unserialisable_result_does_not_kill_server(sock_dir: Path) -> None:
    def body(path: Path):
        first = ControlClient(path).call("bytes")
        return first, ControlClient(path).call("echo")

    first, second = serve(sock_dir / "r1.sock", body)
    assert isinstance(first["b"], str)
    assert second == {}


@pytest.mark.parametrize("line", [
    b"this is not json\n",
    b"[1, 2, 3]\n",
    b'{"args": {}}\n',
    b'{"cmd": 5}\n',
    b'{"cmd": "echo", "args": [1]}\n',
    b'{"id": "one", "cmd": "echo"}\n',
    b'{"id": 1.5, "cmd": "echo"}\n',
    b"\xff\xfe\n",
])
def test_malformed_request_gets_ok_false_and_server_keeps_serving(sock_dir: Path, line: bytes) -> None:
    def body(path: Path):
        [answer] = raw_exchange(path, line)
        # the next connection is served normally
        return answer, ControlClient(path).call("echo", after=True)

    answer, after = serve(sock_dir / "r1.sock", body)
    assert answer["ok"] is False
    assert "error" in answer and answer["error"]
    assert after == {"after": True}
    assert [c for c, _ in calls] == ["echo"]  # the handler never saw the bad line


def test_bad_line_then_good_line_on_the_same_connection(sock_dir: Path) -> None:
    def body(path: Path):
        good = json.dumps({"id": 7, "cmd": "echo", "args": {"k": 1}}).encode() + b"\n"
        return raw_exchange(path, b"garbage\n" + good, 2)

    first, second = serve(sock_dir / "r1.sock", body)
    assert first["ok"] is False and first["id"] is None  # no id could be read from it
    assert second == {"id": 7, "ok": True, "result": {"k": 1}}


def test_answers_echo_the_request_id_even_for_a_refusal(sock_dir: Path) -> None:
    def body(path: Path):
        lines = [{"id": 41, "cmd": "echo", "args": {"a": 1}}, {"id": 42, "cmd": "nope"},
                 {"id": 43, "cmd": "echo", "args": [1]}]
        return raw_exchange(path, b"".join(json.dumps(x).encode() + b"\n" for x in lines), 3)

    ok, refused, bad = serve(sock_dir / "r1.sock", body)
    assert ok == {"id": 41, "ok": True, "result": {"a": 1}}
    assert refused == {"id": 42, "ok": False, "error": "unknown command 'nope'"}
    assert bad["id"] == 43 and bad["ok"] is False


def test_missing_args_means_empty(sock_dir: Path) -> None:
    [answer] = serve(sock_dir / "r1.sock", lambda p: raw_exchange(p, b'{"id": 1, "cmd": "echo"}\n'))
    assert answer == {"id": 1, "ok": True, "result": {}}


def test_a_request_without_id_is_served_with_a_null_id(sock_dir: Path) -> None:
    """Hand-typed probes (and the sandbox test's raw socket) need not invent ids."""
    [answer] = serve(sock_dir / "r1.sock", lambda p: raw_exchange(p, b'{"cmd": "echo"}\n'))
    assert answer == {"id": None, "ok": True, "result": {}}


def test_concurrent_clients(sock_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def body(path: Path):
        with ThreadPoolExecutor(4) as pool:
            blocked = pool.submit(ControlClient(path).call, "wait")
            wait_until(lambda: ("wait", {}) in calls, 10, interval=0.005, what="the wait call")
            # served while "wait" is still pending: one client cannot stall the agent
            fast = [ControlClient(path).call("echo", i=i) for i in range(3)]
            assert not blocked.done()
            ControlClient(path).call("release")
            return fast, blocked.result(timeout=10)

    fast, blocked = serve(sock_dir / "r1.sock", body)
    assert fast == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert blocked == "released"


def test_client_without_server_raises_control_error(sock_dir: Path) -> None:
    with pytest.raises(ControlError, match="cannot reach agent"):
        ControlClient(sock_dir / "nobody.sock", timeout=1).call("echo")


@pytest.mark.parametrize("lie", [
    b"<html>not json</html>\n",
    b'{"ok": true, "result": 1}\n',             # no id
    b'{"id": 999999, "ok": true, "result": 1}\n',  # someone else's answer
    b'{"id": 1',                                 # cut short
])
def test_client_bad_answer_raises_control_error(sock_dir: Path, lie: bytes) -> None:
    path = sock_dir / "liar.sock"

    async def main() -> None:
        async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(lie)
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(liar, str(path))
        try:
            def body():
                with pytest.raises(ControlError, match="bad answer"):
                    ControlClient(path).call("echo")
            await asyncio.get_running_loop().run_in_executor(None, body)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_overlong_line_is_refused_and_server_keeps_serving(sock_dir: Path) -> None:
    def body(path: Path):
        big = json.dumps({"id": 1, "cmd": "echo", "args": {"pad": "x" * 4096}}).encode() + b"\n"
        small = json.dumps({"id": 2, "cmd": "echo", "args": {"same": "connection"}}).encode() + b"\n"
        answers = raw_exchange(path, big + small, 2)
        return answers, ControlClient(path).call("echo", small=1)

    [answer, same], after = serve(sock_dir / "r1.sock", body, request_limit=1024)
    assert answer["ok"] is False and "too long" in answer["error"]
    assert same == {"id": 2, "ok": True, "result": {"same": "connection"}}  # skipped to its end
    assert after == {"small": 1}
    assert [c for c, _ in calls] == ["echo", "echo"]


def test_the_control_request_limit_is_one_mib() -> None:
    from agent.core import rpc

    assert rpc.CONTROL_REQUEST_LIMIT == 1 << 20


def test_client_timeout_is_a_control_error(sock_dir: Path) -> None:
    def body(path: Path):
        with pytest.raises(ControlError, match="no answer to wait"):
            ControlClient(path, timeout=0.3).call("wait")
        ControlClient(path).call("release")
        return ControlClient(path).call("echo", n=3)

    assert serve(sock_dir / "r1.sock", body) == {"n": 3}
