"""Files a run writes for its children, and the run client that reads them: names checked
before acting (no root: a fake run directory and fake agents)."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.core.config import Credential, ObjectConfig
from agent.core.control import ControlServer
from experiments import cli
from topologies.client import BrokerRefusal, RunClient, write_objects
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


SERVICES = [{"service": "text2html", "instances": [{
    "service": "text2html", "instance_id": "r22a/th", "address": "10.16.0.1", "port": 5101,
    "router": "r22a", "share": 100.0, "cpu": 1.0, "objects": ["text2html"], "consumes": "text",
    "produces": "html", "lifecycle": {"max_duration_s": None, "uptime_s": 3.0, "remaining_s": None},
    "processing_cost": 1.0, "used_share": 10.0, "used_cpu": 0.1, "free_share": 90.0,
    "free_cpu": 0.9, "alive": True, "leases": 1}]}]
LEASE_ROW = {"lease_id": "L1", "holder": "co14", "service": "text2html", "instance": "r22a/th",
             "share": 10.0, "cpu": 0.1, "granted_s": 60.0, "remaining": 59.25}


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
                        "addresses": ADDRESSES, "site": "site24", "dns": "10.16.0.23", "hoa": "r22b",
                        "broker": "r22b", "broker_address": "10.16.0.2",
                        "co_hosts": ["co14", "site24"]}
    run.save()
    write_objects(run, [ObjectConfig(n, a, "10.16.0.2", f"{n}@home.moat", _credential(256 + i),
                                     _credential(1000 + i))
                        for i, (n, a) in enumerate(run.state.params["objects"].items())])
    agents = FakeAgents(run, {
        "r18b": {"objects": [{"name": "counter"}], "migrate": {"ok": True, "steps": [], "error": None}},
        "r22a": {"vm": [{"name": "vm1"}], "vm_remove": {"removed": "vm1"}},
        "r22b": {"services": SERVICES, "leases": [LEASE_ROW]},
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


# ------------------------------------------------------------------ the service broker


def hop(lease_id: str, service: str = "text2html", granted_s: float = 60.0) -> dict:
    return {"service": service, "instance": f"r22a/{service}", "address": "10.16.0.1",
            "port": 5101, "credential": f"cred-{lease_id}", "lease_id": lease_id,
            "granted_s": granted_s, "expires_at": 2e9, "consumes": "text", "produces": "html"}


class FakeCo:
    """Stands in for ``python -m nodetools.co`` inside a host: records each run and answers
    like the tool (one JSON object, ``ok`` false with a reason for a refusal)."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, tuple[str, ...]]] = []
        self.answers: dict[str, dict] = {}

    def __call__(self, node: str, module: str, *args: str, timeout: float = 60.0) -> dict:
        assert module == "nodetools.co"
        self.runs.append((node, args))
        return self.answers[args[0]]


@pytest.fixture
def fake_co(fake_run, monkeypatch) -> FakeCo:
    tool = FakeCo()
    monkeypatch.setattr(RunClient, "tool", lambda self, node, module, *a, **kw: tool(node, module, *a, **kw))
    return tool


def test_show_services_and_leases_ask_the_broker_router(fake_run, capsys) -> None:
    _, agents = fake_run
    assert cli.main(["show", "services", "--json", "--run", RUN_ID]) == 0
    assert json.loads(capsys.readouterr().out) == SERVICES
    assert cli.main(["show", "leases", "--run", RUN_ID]) == 0
    table = capsys.readouterr().out
    assert "L1" in table and "co14" in table and "59.25" in table  # the broker's "remaining"
    assert cli.main(["service", "list", "--run", RUN_ID]) == 0
    table = capsys.readouterr().out
    assert "r22a/th" in table and "text" in table and "used_share" in table
    assert [(r, c) for r, c, _ in agents.calls if c in ("services", "leases")] == \
        [("r22b", "services"), ("r22b", "leases"), ("r22b", "services")]


def test_request_keeps_the_grant_root_only_and_names_no_key(fake_run, fake_co, capsys) -> None:
    run, _ = fake_run
    grant = {"target": "text -> rtf", "group": "G1", "hops": [hop("L1"), hop("L2", "html2rtf")]}
    fake_co.answers["request"] = {"ok": True, "grant": grant}
    assert cli.main(["service", "request", "text -> rtf", "--from", "co14", "--share", "20",
                     "--cpu", "0.5", "--duration", "30", "--run", RUN_ID]) == 0
    out = capsys.readouterr().out
    assert "L1" in out and "L2" in out and "2 hop(s)" in out
    node, args = fake_co.runs[-1]
    assert node == "co14" and args == ("request", "--co", "co14", "--keys",
                                       str(run.dir / "co_keys.json"), "--broker", "10.16.0.2",
                                       "text -> rtf", "--share", "20.0", "--cpu", "0.5",
                                       "--duration", "30")
    kept = run.dir / "grants" / "G1.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert json.loads(kept.read_text()) == {"host": "co14", "grant": grant}

    fake_co.answers["renew"] = {"ok": True, "hop": hop("L2", "html2rtf", 90.0)}
    assert cli.main(["lease", "renew", "L2", "--duration", "90", "--run", RUN_ID]) == 0
    assert "lease L2 renewed: 90 s" in capsys.readouterr().out
    assert json.loads(kept.read_text())["grant"]["hops"][1]["granted_s"] == 90.0
    fake_co.answers["cancel"] = {"ok": True, "lease_id": "L1"}
    assert cli.main(["lease", "cancel", "L1", "--run", RUN_ID]) == 0
    assert [h["lease_id"] for h in json.loads(kept.read_text())["grant"]["hops"]] == ["L2"]
    assert cli.main(["lease", "cancel", "L2", "--run", RUN_ID]) == 0
    assert not kept.exists()
    assert fake_co.runs[-1][1][-1] == "L2" and fake_co.runs[-1][0] == "co14"


def test_a_call_with_a_goal_leases_for_it_and_cancels_after(fake_run, fake_co, tmp_path, capsys) -> None:
    run, _ = fake_run
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    fake_co.answers.update(
        request={"ok": True, "grant": {"target": "text -> rtf", "group": "G2",
                                       "hops": [hop("L3"), hop("L4", "html2rtf")]}},
        call={"ok": True, "hops": ["text2html", "html2rtf"], "format": "rtf", "bytes": 9,
              "text": "{\\rtf1 x}"},
        cancel={"ok": True})
    assert cli.main(["service", "call", "text -> rtf", str(doc), "--from", "co14",
                     "--run", RUN_ID]) == 0
    captured = capsys.readouterr()
    assert captured.out == "{\\rtf1 x}" and "text2html -> html2rtf" in captured.err
    commands = [args[0] for _, args in fake_co.runs]
    assert commands == ["request", "call", "cancel", "cancel"]
    assert fake_co.runs[1][1][-2:] == (str(run.dir / "grants" / "G2.json"), str(doc))
    assert not (run.dir / "grants" / "G2.json").exists()


@pytest.mark.parametrize("argv, expected", [
    (["service", "request", "text2html", "--from", "co99"],
     "co99 is not a corresponding object host of run {run} (corresponding object hosts: co14, site24)"),
    (["lease", "cancel", "nosuch"], "nosuch is not a lease of run {run} (leases: none)"),
    (["service", "call", "nosuch", "/dev/null", "--from", "co14"],
     "nosuch is not a lease or service of run {run} (lease or services: text2html)"),
    (["service", "request", "text2html"], "moat service request needs --from HOST (hosts: co14, site24)"),
])
def test_broker_commands_check_names_first(fake_run, fake_co, capsys, argv, expected) -> None:
    assert cli.main([*argv, "--run", RUN_ID]) == 1
    out, err = capsys.readouterr()
    assert err == f"moat: {expected.format(run=RUN_ID)}\n" and out == ""
    assert fake_co.runs == []


def test_a_refusal_is_one_line_with_the_brokers_words(fake_run, fake_co, capsys) -> None:
    fake_co.answers["request"] = {"ok": False, "error": "broker refused: unknown_service (no "
                                  "instance offers nosuch)", "reason": "unknown_service"}
    assert cli.main(["service", "request", "nosuch", "--from", "co14", "--run", RUN_ID]) == 1
    assert capsys.readouterr().err == \
        "moat: broker refused: unknown_service (no instance offers nosuch)\n"
    with pytest.raises(BrokerRefusal) as info:
        RunClient.open(RUN_ID).lease_request("co14", "nosuch", 1, 0.1)
    assert info.value.reason == "unknown_service"


def test_a_run_without_a_broker_says_so(fake_run, capsys) -> None:
    run, _ = fake_run
    run.state.params["broker"] = None
    run.save()
    assert cli.main(["show", "leases", "--run", RUN_ID]) == 1
    assert capsys.readouterr().err == f"moat: run {RUN_ID} has no service broker (started with --broker none)\n"


def test_up_refuses_an_unknown_broker_router_before_starting(capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "_require_root", lambda: None)
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **kw: pytest.fail("started"))
    assert cli.main(["up", "--broker", "r99x"]) == 1
    assert capsys.readouterr().err.startswith("moat: r99x is not a router of topology patent (routers: r18a")
    assert cli.broker_router("patent", None) == "r22b"
    assert cli.broker_router("patent", "none") is None
