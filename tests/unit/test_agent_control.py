"""agent.core.control: the JSON-lines control socket, served by asyncio, called by the blocking client.

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
import time
from pathlib import Path
from typing import Any, Callable

import pytest

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


def serve(path: Path, body: Callable[[Path], Any]) -> Any:
    """Start a server at ``path``, run blocking ``body(path)`` in a thread, stop the server."""

    async def main() -> Any:
        gate["event"] = asyncio.Event()
        server = ControlServer(path, handler)
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
        return raw_exchange(path, b"garbage\n" + json.dumps({"cmd": "echo", "args": {"k": 1}}).encode() + b"\n", 2)

    first, second = serve(sock_dir / "r1.sock", body)
    assert first["ok"] is False
    assert second == {"ok": True, "result": {"k": 1}}


def test_missing_args_means_empty(sock_dir: Path) -> None:
    [answer] = serve(sock_dir / "r1.sock", lambda p: raw_exchange(p, b'{"cmd": "echo"}\n'))
    assert answer == {"ok": True, "result": {}}


def test_concurrent_clients(sock_dir: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def body(path: Path):
        with ThreadPoolExecutor(4) as pool:
            blocked = pool.submit(ControlClient(path).call, "wait")
            deadline = time.monotonic() + 10
            while ("wait", {}) not in calls and time.monotonic() < deadline:
                time.sleep(0.005)
            assert ("wait", {}) in calls
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


def test_client_bad_answer_raises_control_error(sock_dir: Path) -> None:
    path = sock_dir / "liar.sock"

    async def main() -> None:
        async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"<html>not json</html>\n")
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


def test_overlong_line_is_refused_and_server_keeps_serving(sock_dir: Path, monkeypatch) -> None:
    import agent.core.control

    monkeypatch.setattr(agent.core.control, "MAX_LINE", 1024)

    def body(path: Path):
        big = json.dumps({"cmd": "echo", "args": {"pad": "x" * 4096}}).encode() + b"\n"
        [answer] = raw_exchange(path, big)
        return answer, ControlClient(path).call("echo", small=1)

    answer, after = serve(sock_dir / "r1.sock", body)
    assert answer["ok"] is False and "too long" in answer["error"]
    assert after == {"small": 1}
    assert [c for c, _ in calls] == ["echo"]
