"""Files a run writes for its children, and the run client that reads them: names checked
before acting (no root: a fake run directory and fake agents)."""

from __future__ import annotations

import asyncio
import stat
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.core.config import Credential, ObjectConfig
from agent.core.control import ControlServer
from experiments import cli
from topologies.client import RunClient, write_objects
from topologies.errors import UnknownName
from topologies.run import Run


def test_private_files_are_new_owner_only_and_named_by_the_run(tmp_path: Path) -> None:
    run = Run("1126000000-abcd", root=tmp_path)
    run.dir.mkdir(parents=True)
    a = run.write_private("provision", '{"mobile": {"key": "secret"}}')
    b = run.write_private("provision", "{}")
    assert a != b and a.parent == b.parent == run.dir
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    assert a.read_text() == '{"mobile": {"key": "secret"}}'


@pytest.mark.parametrize("stem", ["../escape", "a/b", "", "x.json"])
def test_a_stem_cannot_name_another_place(tmp_path: Path, stem: str) -> None:
    run = Run("1126000000-abcd", root=tmp_path)
    run.dir.mkdir(parents=True)
    with pytest.raises(ValueError):
        run.write_private(stem, "{}")


# ------------------------------------------------------------------ the run client, by name
#
# A fake run directory (run.json, objects.json) and fake agents (control sockets answering
# from a table): what `moat` and MoatNetwork read, without root or Mininet.

RUN_ID = "0101000000-beef"
ROUTERS = ["r18a", "r18b", "r20a", "r22a", "r22b", "r22c"]
ADDRESSES = {"r18a": "10.12.0.1", "r18b": "10.12.0.2", "r20a": "10.14.0.1", "r22a": "10.16.0.1",
             "r22b": "10.16.0.2", "r22c": "10.16.0.3", "co14": "10.14.0.30", "site24": "10.16.0.24"}


class FakeAgents:
    """One real control server per router (agent.core.control, on an event loop of its own),
    answering each command from ``answers[router]`` and recording every call (router, cmd,
    args): the client is tested against the agents' own wire format."""

    def __init__(self, run: Run, answers: dict[str, dict[str, Any]]) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = [ControlServer(run.socket(r), self._handler(r, answers.get(r, {})))
                        for r in ROUTERS]
        for server in self.servers:
            asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(5)

    def _handler(self, router: str, table: dict[str, Any]) -> Any:
        async def handle(cmd: str, args: dict[str, Any]) -> Any:
            self.calls.append((router, cmd, args))
            return table.get(cmd, [])

        return handle

    def close(self) -> None:
        for server in self.servers:
            asyncio.run_coroutine_threadsafe(server.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _credential(spi: int) -> Credential:
    return Credential(spi, bytes(range(32)))


@pytest.fixture
def fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Run, FakeAgents]]:
    """A run as MoatNetwork leaves it once up: counter runs on r18b, r22a has VM vm1."""
    monkeypatch.setenv("MOAT_RUN_ROOT", str(tmp_path))
    run = Run(RUN_ID, root=tmp_path)
    run.create()
    run.state.status = "up"
    run.state.agents = {r: str(run.socket(r)) for r in ROUTERS}
    run.state.node_pids = {n: 1 for n in ADDRESSES}
    run.state.params = {"objects": {"counter": "10.16.0.100", "svc1": "10.16.0.101"},
                        "addresses": ADDRESSES, "site": "site24", "dns": "10.16.0.23", "hoa": "r22b"}
    run.save()
    write_objects(run, [ObjectConfig(n, a, "10.16.0.2", f"{n}@home.moat", _credential(256 + i),
                                     _credential(1000 + i))
                        for i, (n, a) in enumerate(run.state.params["objects"].items())])
    agents = FakeAgents(run, {
        "r18b": {"objects": [{"name": "counter"}], "migrate": {"ok": True, "steps": [], "error": None}},
        "r22a": {"vm": [{"name": "vm1"}], "vm_remove": {"removed": "vm1"}},
    })
    yield run, agents
    agents.close()


def test_client_reads_names_addresses_and_object_configs_from_the_run(fake_run) -> None:
    run, _ = fake_run
    client = RunClient.open(RUN_ID)
    assert client.routers() == ROUTERS and client.objects() == ["counter", "svc1"]
    assert client.address("r20a") == "10.14.0.1"
    cfg = client.object_config("svc1", simultaneous=True)
    assert (cfg.home_address, cfg.mobile_home.spi, cfg.simultaneous) == ("10.16.0.101", 257, True)
    assert stat.S_IMODE((run.dir / "objects.json").stat().st_mode) == 0o600  # credentials


def test_client_finds_the_object_and_migrates_it_to_the_router_address(fake_run) -> None:
    _, agents = fake_run
    client = RunClient.open(RUN_ID)
    assert client.where("counter") == "r18b" and client.where("svc1") is None
    report = client.migrate("counter", "r20a", "break-before-make")
    assert report["ok"] and report["source"] == "r18b"
    assert agents.calls[-1] == ("r18b", "migrate", {"name": "counter", "target": "10.14.0.1",
                                                    "mode": "break-before-make", "target_name": "r20a"})


@pytest.mark.parametrize("act, kind, name, known", [
    (lambda c: c.migrate("counter", "r99x"), "router", "r99x", ROUTERS),
    (lambda c: c.migrate("nosuch", "r20a"), "object", "nosuch", ["counter", "svc1"]),
    (lambda c: c.start_object("counter", "r99x"), "router", "r99x", ROUTERS),
    (lambda c: c.start_object("nosuch", "r18b"), "object", "nosuch", ["counter", "svc1"]),
    (lambda c: c.agent("r99x"), "router", "r99x", ROUTERS),
    (lambda c: c.remove_vm("r22a", "vm9"), "VM", "vm9", ["vm1"]),
    (lambda c: c.provision("r99x", {"vm": "v"}), "router", "r99x", ROUTERS),
    (lambda c: c.provision("r22a", {"vm": "v"}, mobile={"counter": "nosuch"}), "object", "nosuch",
     ["counter", "svc1"]),
    (lambda c: c.requests("co99", "counter"), "node", "co99", sorted(ADDRESSES)),
    (lambda c: c.probe("co99", "udp"), "node", "co99", sorted(ADDRESSES)),
])
def test_client_refuses_a_name_the_run_does_not_have_before_acting(fake_run, act, kind, name, known) -> None:
    _, agents = fake_run
    client = RunClient.open(RUN_ID)
    before = [c for c in agents.calls if c[1] not in ("objects", "vm")]
    with pytest.raises(UnknownName) as info:
        act(client)
    assert (info.value.kind, info.value.name, info.value.known) == (kind, name, known)
    assert [c for c in agents.calls if c[1] not in ("objects", "vm")] == before  # nothing acted on


def test_unknown_name_message_lists_the_known_names() -> None:
    exc = UnknownName("router", "r99x", ["r22b", "r18a"], "run x")
    assert str(exc) == "r99x is not a router of run x (routers: r18a, r22b)"
    assert str(UnknownName("object", "o", [], "run x")) == "o is not an object of run x (objects: none)"


@pytest.mark.parametrize("argv, expected", [
    (["migrate", "counter", "r99x"], "r99x is not a router of run {run} (routers: " + ", ".join(ROUTERS) + ")"),
    (["migrate", "nosuch", "r20a"], "nosuch is not an object of run {run} (objects: counter, svc1)"),
    (["object", "start", "nosuch", "r18b"], "nosuch is not an object of run {run} (objects: counter, svc1)"),
    (["object", "start", "counter", "r99x"], "r99x is not a router of run {run} (routers: " + ", ".join(ROUTERS) + ")"),
    (["show", "log", "r99x"], "r99x is not a router of run {run} (routers: " + ", ".join(ROUTERS) + ")"),
    (["show", "agents", "r99x"], "r99x is not a router of run {run} (routers: " + ", ".join(ROUTERS) + ")"),
    (["vm", "remove", "r22a", "vm9"], "vm9 is not a VM of router r22a (VMs: vm1)"),
    (["vm", "remove", "r99x", "vm1"], "r99x is not a router of run {run} (routers: " + ", ".join(ROUTERS) + ")"),
])
def test_moat_names_the_known_names_in_one_line_and_exits_1(fake_run, capsys, argv, expected) -> None:
    assert cli.main([*argv, "--run", RUN_ID]) == 1
    out, err = capsys.readouterr()
    assert err == f"moat: {expected.format(run=RUN_ID)}\n" and out == ""


def test_moat_without_such_a_run_says_so(fake_run, capsys) -> None:
    assert cli.main(["migrate", "counter", "r20a", "--run", "no-such-run"]) == 1
    assert capsys.readouterr().err.startswith("moat: no run no-such-run")


def test_moat_vm_remove_asks_the_router(fake_run, capsys) -> None:
    _, agents = fake_run
    assert cli.main(["vm", "remove", "r22a", "vm1", "--run", RUN_ID]) == 0
    assert ("r22a", "vm_remove", {"name": "vm1"}) in agents.calls
    assert "vm1 removed from r22a" in capsys.readouterr().out
