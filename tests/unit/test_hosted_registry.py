"""The hosted-object registry, the channel a new agent resumes, and the take-over at start
(issue 13, item 3), with fakes: no root, no processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.core import rpc
from agent.core.config import Credential, ObjectConfig
from agent.hosting import objects as objects_mod
from agent.hosting.hosted_registry import HostedRegistry, RegistryError
from agent.hosting.objects import HostingRole
from agent.hosting.runtime import ObjectProcessError


def entry(n: int = 1) -> dict[str, Any]:
    return {"config": {"name": f"o{n}"}, "checkpoint": {"object": {"count": n}}}


# --- the registry ---------------------------------------------------------------------------


def test_the_registry_is_private_and_survives_a_reload(tmp_path: Path) -> None:
    reg = HostedRegistry(tmp_path / "r1-hosted")
    reg.put("counter", entry(3))
    assert stat.S_IMODE(os.stat(reg.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(reg.path).st_mode) == 0o600
    again = HostedRegistry(tmp_path / "r1-hosted")
    assert again.load() == {"counter": entry(3)}
    again.update("counter", register=False)
    again.remove("missing")  # nothing there: nothing happens
    assert HostedRegistry(tmp_path / "r1-hosted").load()["counter"]["register"] is False
    again.remove("counter")
    assert HostedRegistry(tmp_path / "r1-hosted").load() == {}


def test_a_write_replaces_the_file_at_once_and_leaves_no_temporary(tmp_path: Path) -> None:
    reg = HostedRegistry(tmp_path / "h")
    reg.put("a", entry(1))
    inode = os.stat(reg.path).st_ino
    reg.put("b", entry(2))
    assert os.stat(reg.path).st_ino != inode, "a new file renamed over the old one"
    assert sorted(p.name for p in reg.directory.iterdir()) == ["objects.json"]


def test_a_failed_write_keeps_the_previous_registry(tmp_path: Path, monkeypatch) -> None:
    reg = HostedRegistry(tmp_path / "h")
    reg.put("a", entry(1))

    def refuse(*_a: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(RegistryError, match="No space left"):
        reg.put("b", entry(2))
    monkeypatch.undo()
    assert HostedRegistry(tmp_path / "h").load() == {"a": entry(1)}
    assert sorted(p.name for p in reg.directory.iterdir()) == ["objects.json"]


@pytest.mark.parametrize("text", ['{"version": 1, "objects": {"a": {"conf', "", "[1, 2]",
                                  '{"version": 99, "objects": {}}',
                                  '{"version": 1, "objects": {"a": 3}}'])
def test_a_torn_or_foreign_registry_is_ignored_and_kept_aside(tmp_path: Path, text: str) -> None:
    reg = HostedRegistry(tmp_path / "h")
    reg.put("a", entry(1))
    reg.path.write_text(text)
    assert HostedRegistry(tmp_path / "h").load() == {}
    names = [p.name for p in reg.directory.iterdir()]
    assert "objects.json" not in names and any(n.startswith("objects.json.bad-") for n in names)


def test_a_registry_entry_that_is_not_json_is_refused_and_nothing_written(tmp_path: Path) -> None:
    reg = HostedRegistry(tmp_path / "h")
    reg.put("a", entry(1))
    with pytest.raises(RegistryError):
        reg.put("b", {"checkpoint": float("nan")})
    reg.entries.pop("b")
    assert HostedRegistry(tmp_path / "h").load() == {"a": entry(1)}


def test_a_registry_directory_others_may_enter_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "h"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with pytest.raises(RegistryError, match="private"):
        HostedRegistry(d).put("a", entry(1))


# --- resuming a channel a dead agent left -----------------------------------------------------


def test_a_resumed_channel_skips_what_the_dead_client_left() -> None:
    """The dead agent left half a request on the wire and an answer unread (with the id the
    new client's first call will use); the resumed client's calls get their own answers."""

    async def main() -> None:
        agent_end, object_end = socket.socketpair()
        server = rpc.RpcServer(rpc.command_table({"stats": lambda a: {"n": a.get("n")},
                                                  "ping": lambda a: "pong"}),
                               request_limit=1 << 20)
        serving = asyncio.create_task(server.serve_socket(object_end))
        # The dead agent: a full request (id 1) whose answer it never read, then half a line.
        agent_end.sendall(b'{"id": 1, "cmd": "stats", "args": {"n": "stale"}}\n{"id": 2, "cmd": "st')
        await asyncio.sleep(0.05)
        client = await rpc.RpcClient.resume(agent_end, name="object", limit=1 << 20, timeout=2)
        assert await client.call("stats", {"n": "fresh"}, timeout=2) == {"n": "fresh"}
        assert await client.call("stats", {"n": 2}, timeout=2) == {"n": 2}
        await client.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    asyncio.run(main())


def test_resuming_a_silent_channel_times_out() -> None:
    async def main() -> None:
        agent_end, object_end = socket.socketpair()
        with pytest.raises(rpc.RpcTimeout):
            await rpc.RpcClient.resume(agent_end, name="object", limit=1 << 20, timeout=0.2)
        object_end.close()

    asyncio.run(main())


# --- taking objects over at start -------------------------------------------------------------


def object_config(name: str) -> dict[str, Any]:
    cred = Credential(300, b"k" * 16)
    return ObjectConfig(name, "10.16.0.100", "10.16.0.2", f"{name}@home.moat", cred, cred).to_json()


class FakeProcess:
    def __init__(self, record: dict[str, Any]) -> None:
        self.name = record["name"]
        self.relay_dir = Path("/nonexistent")
        self.pid = record["relay"]["object_pid"]
        self.started_with: Any = None
        self.running = True

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "relay": {"object_pid": self.pid}}

    async def start(self, warm: bool = False, state: Any = None) -> None:
        self.started_with = state

    async def call(self, cmd: str, **_kw: Any) -> Any:
        return {"object": {"count": 7}} if cmd == "get_state" else {}

    async def stop(self, kill: bool = False) -> Any:
        self.running = False
        return None

    def usage(self) -> dict:
        return {}


class FakeAgent:
    def __init__(self, run_dir: Path) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(run_id="t", name="r1", run_dir=str(run_dir),
                                      addresses=set(), object_resources={})

    def role(self, _cls: type) -> None:
        return None


def process_entry(name: str, pid: int, checkpoint: Any = None) -> dict[str, Any]:
    return {"config": object_config(name), "home_address": "10.16.0.100", "register": False,
            "resources": None, "checkpoint": checkpoint,
            "process": {"name": name, "relay": {"object_pid": pid}}}


@pytest.fixture
def hosting(tmp_path: Path, monkeypatch) -> HostingRole:
    alive = {"alive": 41}  # the processes still there, by name: object pid
    discarded: list[Any] = []
    addresses: list[tuple[str, bool]] = []

    async def adopt(record: dict[str, Any], **_kw: Any) -> FakeProcess:
        if alive.get(record["name"]) != record["relay"]["object_pid"]:
            raise ObjectProcessError(f"object {record['name']} cannot be taken over: gone")
        return FakeProcess(record)

    def from_record(record: dict[str, Any], **_kw: Any) -> FakeProcess:
        return FakeProcess({"name": record["name"], "relay": {"object_pid": 99}})

    async def discard(_self: HostingRole, record: dict[str, Any]) -> None:
        discarded.append(record["name"])

    async def home_address(_self: HostingRole, address: str, add: bool) -> None:
        addresses.append((address, add))

    monkeypatch.setattr(objects_mod.ObjectProcess, "adopt", staticmethod(adopt))
    monkeypatch.setattr(objects_mod.ObjectProcess, "from_record", staticmethod(from_record))
    monkeypatch.setattr(HostingRole, "_discard", discard)
    monkeypatch.setattr(HostingRole, "_home_address", home_address)
    monkeypatch.setattr(objects_mod, "check_home_address", lambda *_a: None)
    role = HostingRole(FakeAgent(tmp_path))
    role.test_discarded, role.test_addresses = discarded, addresses  # type: ignore[attr-defined]
    return role


def test_start_takes_over_live_objects_restarts_dead_ones_and_lets_go_of_the_rest(
        hosting: HostingRole) -> None:
    hosting.registry.put("alive", process_entry("alive", 41))
    hosting.registry.put("dead", process_entry("dead", 42, checkpoint={"object": {"count": 5}}))
    hosting.registry.put("lost", process_entry("lost", 43))
    hosting.registry.put("reused", process_entry("reused", 44))  # pid now someone else's
    asyncio.run(hosting.start())
    assert hosting.recovered == {"adopted": ["alive"], "restarted": ["dead"],
                                 "lost": ["lost", "reused"]}
    assert hosting.objects["alive"].process.pid == 41
    assert hosting.objects["dead"].process.started_with == {"object": {"count": 5}}
    assert set(hosting.objects) == {"alive", "dead"}
    assert sorted(hosting.test_discarded) == ["dead", "lost", "reused"]  # type: ignore[attr-defined]
    on_disk = HostedRegistry(hosting.hosted_dir).load()
    assert set(on_disk) == {"alive", "dead"}
    assert on_disk["dead"]["checkpoint"] == {"object": {"count": 5}}


def test_checkpoints_are_kept_and_a_stopped_object_is_forgotten(hosting: HostingRole) -> None:
    hosting.registry.put("alive", process_entry("alive", 41))

    async def main() -> None:
        await hosting.start()
        await hosting.checkpoint_all()
        assert HostedRegistry(hosting.hosted_dir).load()["alive"]["checkpoint"] == {"object": {"count": 7}}
        await hosting.cmd_object_stop("alive", deregister=False)

    asyncio.run(main())
    assert HostedRegistry(hosting.hosted_dir).load() == {}


def test_a_bad_entry_loses_only_that_object(hosting: HostingRole) -> None:
    hosting.registry.put("alive", process_entry("alive", 41))
    hosting.registry.put("bad", {"config": {"name": "bad"}})
    asyncio.run(hosting.start())
    assert list(hosting.objects) == ["alive"] and hosting.recovered["lost"] == ["bad"]
    assert set(json.loads(hosting.registry.path.read_text())["objects"]) == {"alive"}


# --- the relay's side (the launcher's code, in a forked process) -----------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the relay serves root only")
def test_the_relay_hands_the_channel_to_each_agent_and_tells_how_the_object_ended(tmp_path: Path) -> None:
    import signal

    from agent.hosting import sandbox_exec

    agent_end, object_end = socket.socketpair()
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "relay.sock"
    listen.bind(str(path))
    listen.listen(4)
    relay = os.fork()
    if relay == 0:  # the relay: its object is a child that waits for a signal
        try:
            obj = os.fork()
            if obj == 0:  # as the launcher's object does: no fd of the agent's or relay's
                for s in (agent_end, object_end, listen):
                    s.close()
                signal.alarm(30)  # never outlives the test for long
                signal.pause()
                os._exit(0)
            sandbox_exec.relay(obj, listen.fileno(), agent_end.fileno())
        finally:
            os._exit(127)
    listen.close()
    agent_end.close()  # the agent has died: only the relay holds its end now

    def attach() -> tuple[socket.socket, dict, socket.socket | None]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(path))
        data, fds, _f, _a = socket.recv_fds(s, 4096, 1)
        return s, json.loads(data), (socket.socket(fileno=fds[0]) if fds else None)

    try:
        first, hello, channel = attach()
        assert hello["relay"] == relay and hello["channel"] is True and channel is not None
        channel.sendall(b"ping\n")  # the agent's end, handed over: the object reads it
        object_end.settimeout(5)
        assert object_end.recv(16) == b"ping\n"
        second, hello2, channel2 = attach()  # a newer agent replaces the first
        assert hello2["pid"] == hello["pid"] and channel2 is not None
        assert first.recv(64) == b"", "the older agent's connection is closed"
        second.sendall(b"release\n")
        third, hello3, channel3 = attach()
        assert hello3["channel"] is False and channel3 is None, "let go: not handed out again"
        channel.close()
        channel2.close()
        assert object_end.recv(16) == b"", "end of stream once no agent holds the channel"
        os.kill(hello["pid"], signal.SIGKILL)
        third.settimeout(5)
        assert json.loads(third.recv(256)) == {"exit": -9}
        _, status = os.waitpid(relay, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finally:
        try:
            os.kill(hello["pid"], signal.SIGKILL)
        except (ProcessLookupError, NameError):
            pass
        try:
            os.kill(relay, signal.SIGKILL)
            os.waitpid(relay, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
