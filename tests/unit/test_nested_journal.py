"""The nested home agent's bindings are durable (issue 13): an object's router is the home
agent of its secondaries (:mod:`agent.distribution.nested`), and a crash of its agent must
not make it forget them.

Driven with real RRQs through a real FOA (the helpers of test_nested_parts.py), a fake
tunnel and transport, the journal on a tmp_path and a fake monotonic clock: the binding is
on disk before the reply leaves; a new agent (the restarted one) gets it back with what is
left of its lifetime, its GRE key and the part's last Identification, and has the tunnel to
it before UDP 434 opens; expired bindings stay out; the router's ``PartMover`` resumes the
nested homes its predecessor kept, lets one go when its last binding does, keeps the files
when the agent stops and removes them when the object's VM goes.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.distribution import nested_store
from agent.distribution.nested import NestedHomeAgent
from agent.distribution.nested_store import NestedSpec, NestedSpecError
from agent.distribution.parts import PartMover
from agent.mobility.dataplane import DataPlane
from agent.mobility.journal import Journal, decode_line
from fakeclock import FakeClock
from packets import RegistrationReply, ReplyCode
from packets.codes import MIP_PORT
from test_nested_parts import (COA, FOA_UP, PARTS, ROUTER_KEY, FakeTransport, FakeTunnel, Nested,
                               part_configs, primary_config)

ROUTER = "r18b"
TALLY = "10.16.0.224"
GAUGE = "10.16.0.225"
BOOT = "boot-1"


def records(path: Path) -> list[dict[str, Any]]:
    return [decode_line(line + b"\n") for line in path.read_bytes().splitlines()]


def bindings_on_disk(path: Path) -> dict[str, dict[str, Any]]:
    """The live ``b`` records of a journal, by part address (replayed as a restore would)."""
    live: dict[str, dict[str, Any]] = {}
    for r in records(path):
        if r["t"] == "b":
            live[r["home_address"]] = r
        elif r["t"] == "-b":
            live.pop(r["home_address"], None)
    return live


class DiskTransport(FakeTransport):
    """UDP 434, recording what the journal held when each reply left."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.on_disk: list[dict[str, dict[str, Any]]] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.on_disk.append(bindings_on_disk(self.path))
        super().sendto(data, addr)


class Durable(Nested):
    """:class:`test_nested_parts.Nested` with its journal in ``run_dir`` on ``clock``."""

    def __init__(self, run_dir: Path, clock: FakeClock) -> None:
        super().__init__()
        self.run_dir, self.clock = run_dir, clock
        self.path = nested_store.journal_path(run_dir, ROUTER, "svc")
        nested_store.save_spec(run_dir, ROUTER, NestedSpec.of("pair", self.primary, self.parts))
        self.agent = NestedHomeAgent(self.primary, self.parts, ROUTER_KEY, "mnh0", vm="pair",
                                     journal=self.journal(), clock=clock)
        self.agent.restore()  # what start() does first: nothing to restore yet
        self.transport = DiskTransport(self.path)
        self.agent._transport = self.transport
        self.agent.dataplane = DataPlane(self.tunnel, set())

    def journal(self) -> Journal:
        return Journal(self.path, clock=self.clock, boot_id=BOOT)

    def restarted(self, **journal_kw: Any) -> tuple[NestedHomeAgent, FakeTunnel, list]:
        """The restarted agent's nested home: from the description on disk, started with a
        fake tunnel; what the tunnel held when UDP 434 opened."""
        (spec,) = nested_store.load_specs(self.run_dir, ROUTER)
        journal = Journal(self.path, clock=self.clock, boot_id=journal_kw.get("boot_id", BOOT))
        agent = NestedHomeAgent.from_spec(spec, ROUTER_KEY, "mnh0", journal=journal,
                                          clock=self.clock)
        tunnel = FakeTunnel()
        at_listen: list = []

        async def open_tunnel(backend: str, *, local: str, name: str) -> FakeTunnel:
            assert (backend, local, name) == ("userspace", "10.16.0.100", "mnh0")
            return tunnel

        async def listen() -> FakeTransport:
            at_listen.append(dict(tunnel.peers))
            return DiskTransport(self.path)

        agent._listen = listen  # type: ignore[method-assign]
        import agent.mobility.tunnel as tunnel_mod
        saved = tunnel_mod.open_tunnel
        tunnel_mod.open_tunnel = open_tunnel  # type: ignore[assignment]
        try:
            asyncio.run(agent.start())
        finally:
            tunnel_mod.open_tunnel = saved  # type: ignore[assignment]
        return agent, tunnel, at_listen


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def test_a_parts_binding_is_on_disk_before_its_reply_leaves(tmp_path: Path,
                                                           clock: FakeClock) -> None:
    env = Durable(tmp_path, clock)
    rrp, _ = env.register("tally", lifetime=60)
    assert rrp.code == ReplyCode.ACCEPTED
    (b,) = env.agent.bindings()
    (disk,) = env.transport.on_disk
    assert disk[TALLY]["gre_key"] == b["gre_key"] and disk[TALLY]["care_of_address"] == COA
    assert disk[TALLY]["part"] == "secondary" and disk[TALLY]["exp_mono"] == 1060.0
    assert oct(env.path.stat().st_mode & 0o777) == "0o600"
    spec = nested_store.spec_path(tmp_path, ROUTER, "svc")
    assert oct(spec.stat().st_mode & 0o777) == "0o600"
    # The description holds the parts' keys, not the object's own.
    text = spec.read_text()
    assert env.parts["tally"].mobile_home.key.hex() in text
    assert env.primary.mobile_home.key.hex() not in text
    # A deregistration is on disk before its reply too.
    rrp, _ = env.register("tally", lifetime=0)
    assert rrp.code == ReplyCode.ACCEPTED and env.transport.on_disk[-1] == {}


def test_a_restarted_agent_restores_the_binding_with_its_remaining_lifetime_and_key(
        tmp_path: Path, clock: FakeClock) -> None:
    env = Durable(tmp_path, clock)
    env.register("tally", lifetime=60)
    env.register("gauge", lifetime=30)
    before = {b["home_address"]: b for b in env.agent.bindings()}
    replayed = env.relayed(env.request("tally"))  # a request the part sent, to replay later
    env.decide(replayed)
    clock.advance(20.0)  # the agent dies (kill -9: nothing closed) and comes back 20 s later
    agent, tunnel, at_listen = env.restarted()
    after = {b["home_address"]: b for b in agent.bindings()}
    assert sorted(after) == [TALLY, GAUGE]
    assert after[TALLY]["remaining"] == pytest.approx(40.0)
    assert after[GAUGE]["remaining"] == pytest.approx(10.0)
    for home in (TALLY, GAUGE):
        assert after[home]["gre_key"] == before[home]["gre_key"]
        assert after[home]["care_of_address"] == COA
    # The tunnel to both parts was rebuilt before UDP 434 opened.
    assert at_listen == [{TALLY: [(COA, before[TALLY]["gre_key"])],
                          GAUGE: [(COA, before[GAUGE]["gre_key"])]}]
    # The replay check did not start from nothing: the old request is still a replay.
    agent._transport = FakeTransport()
    agent.on_datagram(replayed, (FOA_UP, MIP_PORT))
    (data, _), = agent._transport.sent
    assert RegistrationReply.decode(data).code == ReplyCode.HA_IDENTIFICATION_MISMATCH
    # It expires on time: 10 s later the gauge's binding goes, from the tunnel and the disk.
    clock.advance(10.5)
    agent.housekeeping()
    assert [b["home_address"] for b in agent.bindings()] == [TALLY]
    assert sorted(tunnel.peers) == [TALLY]
    assert sorted(bindings_on_disk(env.path)) == [TALLY]


def test_expired_bindings_are_not_restored_and_leave_the_journal(tmp_path: Path,
                                                                 clock: FakeClock) -> None:
    env = Durable(tmp_path, clock)
    env.register("tally", lifetime=60)
    env.register("gauge", lifetime=30)
    clock.advance(45.0)
    agent, tunnel, at_listen = env.restarted()
    assert [b["home_address"] for b in agent.bindings()] == [TALLY]
    assert agent.restored is not None and len(agent.restored.expired_bindings) == 1
    assert tunnel.peers == {TALLY: at_listen[0][TALLY]} and GAUGE not in at_listen[0]
    assert sorted(bindings_on_disk(env.path)) == [TALLY]  # the first snapshot dropped it


def test_another_boot_uses_the_wall_clock_and_never_lengthens_a_lifetime(
        tmp_path: Path, clock: FakeClock) -> None:
    env = Durable(tmp_path, clock)
    env.register("tally", lifetime=60)
    clock.now = 5.0  # the machine rebooted: its monotonic clock means nothing now
    agent, _, _ = env.restarted(boot_id="boot-2")
    (b,) = agent.bindings()
    assert 0 < b["remaining"] <= 60.0


def test_a_binding_of_an_address_that_is_no_part_is_dropped(tmp_path: Path,
                                                            clock: FakeClock) -> None:
    env = Durable(tmp_path, clock)
    env.register("tally", lifetime=60)
    env.register("gauge", lifetime=60)
    # The object now has one part only (its description says so).
    primary = env.primary
    nested_store.save_spec(tmp_path, ROUTER,
                           NestedSpec.of("pair", primary, part_configs(primary, ["tally"])))
    agent, _, _ = env.restarted()
    assert [b["home_address"] for b in agent.bindings()] == [TALLY]


# --- the descriptions ------------------------------------------------------------------------


def test_a_description_round_trips_and_is_checked(tmp_path: Path) -> None:
    primary = primary_config()
    spec = NestedSpec.of("pair", primary, part_configs(primary, PARTS))
    nested_store.save_spec(tmp_path, ROUTER, spec)
    assert nested_store.load_specs(tmp_path, ROUTER) == [spec]
    assert nested_store.load_specs(tmp_path, "r18") == []  # another router's files
    doc = spec.to_json()
    for path, value in ((("vm",), "../x"), (("home_address",), "not an address"),
                        (("parts", "tally", "nai"), "a nai with spaces"),
                        (("parts", "tally", "mobile_home", "key"), "zz" * 32),
                        (("parts", "tally", "mobile_home", "spi"), 5),
                        (("version",), 2)):
        bad = json.loads(json.dumps(doc))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(NestedSpecError):
            NestedSpec.from_json(bad)


def test_an_untrusted_or_garbled_description_is_not_restored_and_left_in_place(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    primary = primary_config()
    path = nested_store.save_spec(tmp_path, ROUTER,
                                  NestedSpec.of("pair", primary, part_configs(primary, PARTS)))
    os.chmod(path, 0o644)  # others could read the parts' keys: written by someone else
    assert nested_store.load_specs(tmp_path, ROUTER) == []
    assert "readable by it alone" in caplog.text and path.exists()
    os.chmod(path, 0o600)
    path.write_text("{not json")
    assert nested_store.load_specs(tmp_path, ROUTER) == [] and path.exists()
    # A description under another object's file name is not taken either.
    other = nested_store.spec_path(tmp_path, ROUTER, "svc2")
    nested_store.save_spec(tmp_path, ROUTER,
                           NestedSpec.of("pair", primary, part_configs(primary, PARTS)))
    os.replace(nested_store.spec_path(tmp_path, ROUTER, "svc"), other)
    assert nested_store.load_specs(tmp_path, ROUTER) == []


# --- the router's side: resume, let go, keep, remove -----------------------------------------


class Started:
    """NestedHomeAgent.start without a tunnel or a socket (what the unit tests can run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tunnels: list[FakeTunnel] = []

        async def start(agent: NestedHomeAgent) -> None:
            if agent.journal is not None and agent.restored is None:
                agent.restore()
            tunnel = FakeTunnel()
            self.tunnels.append(tunnel)
            agent.dataplane = DataPlane(tunnel, set())
            agent.sync()
            agent._transport = FakeTransport()  # type: ignore[assignment]

        monkeypatch.setattr(NestedHomeAgent, "start", start)


def journalled(run_dir: Path, lifetimes: dict[str, int]) -> dict[str, int]:
    """What a crashed agent left: the description and the parts' bindings (real clock);
    their GRE keys by address."""
    env = Nested()
    nested_store.save_spec(run_dir, ROUTER, NestedSpec.of("pair", env.primary, env.parts))
    env.agent = NestedHomeAgent(env.primary, env.parts, ROUTER_KEY, "mnh0", vm="pair",
                                journal=Journal(nested_store.journal_path(run_dir, ROUTER, "svc")))
    env.agent.restore()
    env.agent._transport = env.transport  # type: ignore[assignment]
    for part, lifetime in lifetimes.items():
        assert env.register(part, lifetime=lifetime)[0].code == ReplyCode.ACCEPTED
    return {b["home_address"]: b["gre_key"] for b in env.agent.bindings()}


def mover(run_dir: Path) -> PartMover:
    return PartMover(lambda: None, lambda: None, ROUTER_KEY, "10.12.0.2", run_dir=str(run_dir),
                     router=ROUTER)


def test_the_router_resumes_its_nested_home_after_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = journalled(tmp_path, {"tally": 60})
    started = Started(monkeypatch)
    parts = mover(tmp_path)

    async def run() -> None:
        assert await parts.resume() == ["pair"]
        agent = parts.nested["pair"]
        assert agent.tunnel_name == "mnh0" and parts.orphans == {"pair"}
        assert started.tunnels[0].peers == {TALLY: [(COA, keys[TALLY])]}
        assert [(b["home_address"], b["gre_key"]) for b in parts.bindings()["pair"]] == \
            [(TALLY, keys[TALLY])]
        # A second resume (a role started twice) starts nothing beside it.
        assert await parts.resume() == []
        # The agent stops: the files stay for the next start.
        await parts.close()
        assert parts.nested == {}
        assert nested_store.load_specs(tmp_path, ROUTER) != []
        assert bindings_on_disk(nested_store.journal_path(tmp_path, ROUTER, "svc"))

    asyncio.run(run())


def test_a_nested_home_with_no_binding_left_is_not_resumed_and_its_files_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journalled(tmp_path, {"tally": 60})
    # Its binding's lifetime ran out while no agent ran: the journal says 60 s from long ago.
    path = nested_store.journal_path(tmp_path, ROUTER, "svc")
    journal = Journal(path, clock=lambda: 1e9)
    assert journal.load().bindings == []
    Started(monkeypatch)
    parts = mover(tmp_path)
    monkeypatch.setattr(parts, "_journal",
                        lambda obj: Journal(nested_store.journal_path(tmp_path, ROUTER, obj),
                                            clock=lambda: 1e9))
    assert asyncio.run(parts.resume()) == []
    assert parts.nested == {}
    assert not path.exists() and not nested_store.spec_path(tmp_path, ROUTER, "svc").exists()


def test_a_resumed_nested_home_goes_with_its_last_binding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journalled(tmp_path, {"tally": 60})
    Started(monkeypatch)
    parts = mover(tmp_path)

    async def run() -> None:
        await parts.resume()
        agent = parts.nested["pair"]
        parts.housekeeping()
        assert "pair" in parts.nested  # its binding is live
        (binding,) = list(agent.home.bindings)
        agent.home.bindings.register(binding.home_address, binding.care_of_address, "", 0,
                                     False)  # the secondary deregistered (its VM went)
        parts.housekeeping()
        await asyncio.gather(*parts._tasks)
        assert parts.nested == {} and parts.orphans == set()

    asyncio.run(run())
    assert not nested_store.journal_path(tmp_path, ROUTER, "svc").exists()
    assert not nested_store.spec_path(tmp_path, ROUTER, "svc").exists()


def test_the_objects_vm_removed_takes_its_nested_homes_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journalled(tmp_path, {"tally": 60, "gauge": 60})
    Started(monkeypatch)
    parts = mover(tmp_path)

    async def run() -> None:
        await parts.resume()
        await parts.forget("pair")  # the VM's "removed" event

    asyncio.run(run())
    assert parts.nested == {}
    assert list(tmp_path.glob(f"{ROUTER}.nested-*")) == []
    assert asyncio.run(mover(tmp_path).resume()) == []


def test_a_tunnel_name_is_never_taken_twice() -> None:
    parts = mover(Path("/nonexistent"))

    class Named:
        def __init__(self, name: str) -> None:
            self.tunnel_name = name

    parts.nested = {"a": Named("mnh0"), "b": Named("mnh1")}  # type: ignore[dict-item]
    assert parts._tunnel_name() == "mnh2"
    del parts.nested["a"]
    assert parts._tunnel_name() == "mnh0"


def test_the_objects_vm_back_under_another_name_takes_the_resumed_bindings_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.vm.machine import VirtualMachine

    keys = journalled(tmp_path, {"tally": 60})
    started = Started(monkeypatch)
    parts = mover(tmp_path)
    primary = primary_config()
    tally = part_configs(primary, ["tally", "gauge"])
    vm = VirtualMachine(name="pair2", kind="service", service="pair-svc", address="0.0.0.0",
                        interface=None, port=4341, cpu=1.0, memory_mb=256, pids=64,
                        egress_kbit=None, authorized=[], policy={}, leased=True,
                        mobile={"counter": primary.to_json(),
                                **{n: c.to_json() for n, c in tally.items()}},
                        at_home=["gauge"], moved={"tally": "r20a"})

    async def run() -> NestedHomeAgent:
        await parts.resume()
        old = parts.nested["pair"]
        agent = await parts.nested_for(vm)
        assert agent is not old and old._transport is None and old.journal._fd is None
        return agent

    agent = asyncio.run(run())
    assert list(parts.nested) == ["pair2"] and parts.orphans == set()
    assert [(b["home_address"], b["gre_key"]) for b in agent.bindings()] == [(TALLY, keys[TALLY])]
    assert started.tunnels[-1].peers == {TALLY: [(COA, keys[TALLY])]}
    (spec,) = nested_store.load_specs(tmp_path, ROUTER)
    assert spec.vm == "pair2"


def test_a_resumed_nested_home_whose_vm_is_taken_over_stays_without_bindings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journalled(tmp_path, {"tally": 60})
    Started(monkeypatch)

    class Manager:
        vms: dict[str, Any] = {}

    parts = PartMover(lambda: Manager, lambda: None, ROUTER_KEY, "10.12.0.2",
                      run_dir=str(tmp_path), router=ROUTER)

    async def run() -> None:
        await parts.resume()
        Manager.vms = {"pair": object()}  # the VM role took the VM over after the roles started
        parts.housekeeping()
        (binding,) = list(parts.nested["pair"].home.bindings)
        parts.nested["pair"].home.bindings.register(binding.home_address,
                                                    binding.care_of_address, "", 0, False)
        parts.housekeeping()
        await asyncio.gather(*parts._tasks)

    asyncio.run(run())
    assert list(parts.nested) == ["pair"] and parts.orphans == set()
    assert nested_store.spec_path(tmp_path, ROUTER, "svc").exists()
