"""agent.vm.manager.VmManager without root or network: who may provision (signed PROVISION),
the Fig. 5 steps and their refusals, and lifecycle enforcement on a fake clock.

Real: Ed25519 keys, the signed service directory (package_service), its verification and
all-or-nothing install into a temporary directory, the manifest. Faked: the SFTP fetch (a
copy of the packaged service), the object processes (no sandbox, no child), the agent that
hosts mobile objects, the cgroups, netlink address changes, and the manager's clock.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time as real_time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.core import netlink
from agent.core.errors import AgentError
from agent.core.msgauth import sign_ed25519
from agent.hosting import runtime
from agent.vm import fetch as fetch_mod
from agent.vm import manager as manager_mod
from agent.vm.errors import ServiceNotFound
from agent.vm.manager import ProvisionError, SiteAccess, VmBaseline, VmManager
from agent.vm.repository import package_service
from agent.vm.signing import generate_keypair, key_id, load_private_key, load_public_key
from packets import ControlMessage, ControlType
from fakeclock import FakeClock

SERVICE = "counter-svc"
ROUTER = "r2"
T0 = 1_800_000_000.0

OBJECTS = {
    "counter": {"entry": "counter:Counter", "resources": {"cpu": 0.25, "memory_mb": 32, "pids": 8}},
    "logger": {"entry": "logger:Logger", "resources": {"cpu": 0.25, "memory_mb": 32, "pids": 8}},
}


# --- fakes ---------------------------------------------------------------------------------------


class FakeProcess:
    """Stands in for agent.hosting.runtime.ObjectProcess: records what the manager asked."""

    journal: list[tuple[str, str]]  # shared with the test: (event, object label)
    fail_start: set[str]  # object names whose start fails
    served: dict[str, int]  # object name -> transactions served (its "stats")

    def __init__(self, name: str, spec: str, address: str, port: int, router: str,
                 **kw: Any) -> None:
        self.name, self.spec, self.address, self.port, self.router = name, spec, address, port, router
        self.kw = kw
        self.started = False
        self.stopped = False
        self.journal.append(("created", kw.get("label", name)))

    @property
    def object_name(self) -> str:
        return str(self.kw.get("label", self.name)).split("-", 1)[-1]

    @property
    def pid(self) -> int | None:
        return 4242 if self.started and not self.stopped else None

    def usage(self) -> dict[str, Any]:
        return {}

    def exit_info(self) -> dict[str, Any] | None:
        return None

    async def start(self, warm: bool = False, state: Any = None) -> None:
        if self.object_name in self.fail_start:
            raise runtime.ObjectProcessError(f"cannot start object {self.name}: broken on purpose")
        self.started = True
        self.journal.append(("started", self.kw.get("label", self.name)))

    async def stop(self) -> Any:
        self.stopped = True
        self.journal.append(("stopped", self.kw.get("label", self.name)))
        return {"checkpoint": self.name}

    async def call(self, cmd: str, timeout: float = 0, **args: Any) -> Any:
        assert cmd == "stats"
        return {"served": self.served.get(self.object_name, 0)}


class FakeHost:
    """The ObjectHost protocol: hosts mobile objects (their registration clients)."""

    def __init__(self) -> None:
        self.hosted: dict[str, Any] = {}
        self.registering: dict[str, bool] = {}
        self.stopped: list[tuple[str, bool]] = []
        self.calls: list[dict[str, Any]] = []

    async def host_object(self, config: Any, process: Any, *, warm: bool, state: Any,
                          vm: tuple[str, str] | None, register: bool = True) -> dict[str, Any]:
        await process.start(warm=warm, state=state)
        self.hosted[config.name] = process
        self.registering[config.name] = register
        self.calls.append({"config": config, "vm": vm, "warm": warm})
        return {}

    async def cmd_object_stop(self, name: str, deregister: bool = True) -> dict[str, Any]:
        self.stopped.append((name, deregister))
        self.hosted.pop(name, None)
        return {}

    def hosted_process(self, name: str) -> Any:
        return self.hosted.get(name)

    def replace_process(self, name: str, process: Any) -> None:
        self.hosted[name] = process


class FakeTime:
    """The manager module's ``time``: ``time()`` is the fake clock, the rest is real."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock.now

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)


class Env:
    """A VmManager with a baseline that authorizes provider "acme" (and "beta"), a remote
    site holding packaged services, and every part that needs root or a network faked."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.acme = generate_keypair(tmp / "keys", "acme")
        self.beta = generate_keypair(tmp / "keys", "beta")
        self.mallory = generate_keypair(tmp / "keys", "mallory")  # not in the baseline
        self.site: dict[str, Path] = {}  # service name -> its signed directory
        self._published = 0
        self.fetches: list[str] = []
        self.journal: list[tuple[str, str]] = []
        self.served: dict[str, int] = {}
        self.fail_start: set[str] = set()
        self.addresses: list[tuple[str, str, int, str]] = []  # (add|del, address, prefix, dev)
        self.clock = FakeClock(T0)
        self.host = FakeHost()
        self.cgroups = object()

        FakeProcess.journal, FakeProcess.served, FakeProcess.fail_start = \
            self.journal, self.served, self.fail_start
        monkeypatch.setattr(runtime, "ObjectProcess", FakeProcess)
        monkeypatch.setattr(fetch_mod, "fetch_service", self._fetch)
        monkeypatch.setattr(manager_mod, "time", FakeTime(self.clock))

        async def address_add(address: str, prefix: int, dev: str, *a: Any, **kw: Any) -> None:
            self.addresses.append(("add", address, prefix, dev))

        async def address_del(address: str, prefix: int, dev: str, *a: Any, **kw: Any) -> None:
            self.addresses.append(("del", address, prefix, dev))

        monkeypatch.setattr(netlink, "address_add", address_add)
        monkeypatch.setattr(netlink, "address_del", address_del)

        self.baseline = VmBaseline(
            authorized_keys=[str(self.acme[1]), str(self.beta[1])], storage=str(tmp / "storage"),
            site=SiteAccess("10.0.9.9", str(tmp / "site_host_key.pub"), str(tmp / "client.key")),
            cpu=1.0, memory_mb=512, pids=128)
        self.manager = VmManager(self.baseline, ROUTER, "run1", {"eth1": "10.0.2.2"},
                                 cgroups=self.cgroups, host=self.host)
        self.publish()

    def publish(self, service: str = SERVICE, signer: Path | None = None, version: str = "1.0",
                policy: dict[str, Any] | None = None) -> None:
        self._published += 1
        src = self.tmp / f"src-{service}-{self._published}"
        for name, obj in OBJECTS.items():
            (src / name).mkdir(parents=True)
            (src / name / f"{name}.py").write_text(f"class {name.title()}: pass\n")
            (src / name / "object.json").write_text(json.dumps(obj))
        out = self.tmp / f"svc-{service}-{self._published}"
        package_service(src, service, version, "acme", signer or self.acme[0], out, policy=policy)
        self.site[service] = out

    def _fetch(self, address: str, port: int, user: str, client_key: str, known_host_key: str,
               service: str, dest: Path, **kw: Any) -> Any:
        self.fetches.append(service)
        if service not in self.site:
            raise ServiceNotFound(f"no service {service} at {address}")
        shutil.copytree(self.site[service], dest)
        return SimpleNamespace(bytes_downloaded=1234, cached=[])

    def body(self, **kw: Any) -> dict[str, Any]:
        return {"vm": "v1", "kind": "service", "service": SERVICE, **kw}

    def provision(self, **kw: Any) -> dict[str, Any]:
        return asyncio.run(self.manager.provision(self.body(**kw)))

    def refused(self, **kw: Any) -> ProvisionError:
        with pytest.raises(ProvisionError) as info:
            self.provision(**kw)
        return info.value

    @property
    def storage(self) -> Path:
        return Path(self.baseline.storage)

    def leftovers(self, *dirs: str) -> list[str]:
        """What stayed under storage's installed/ (and the other ``dirs``)."""
        return sorted(str(p.relative_to(self.storage)) for d in ("installed", *dirs)
                      if (self.storage / d).exists() for p in (self.storage / d).iterdir())

    def running(self) -> list[str]:
        started = [label for ev, label in self.journal if ev == "started"]
        stopped = [label for ev, label in self.journal if ev == "stopped"]
        return [label for label in started if label not in stopped]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


# --- authorization of PROVISION --------------------------------------------------------------


def wire(body: dict[str, Any], txid: int = 7) -> ControlMessage:
    """A PROVISION as the receiver decodes it."""
    return ControlMessage.decode(ControlMessage(ControlType.PROVISION, txid, body).encode())


def signed(env: Env, key: Path, kid: str | None = None, txid: int = 7, now: float | None = None,
           to: str = "10.0.2.2", **body: Any) -> ControlMessage:
    pub = load_public_key(Path(str(key)[:-4] + ".pub"))
    return wire(sign_ed25519(ControlType.PROVISION, txid, env.body(**body), load_private_key(key),
                             kid or key_id(pub), now=now, to=to), txid)


def test_authorize_accepts_a_provision_signed_by_an_authorized_provider(env: Env) -> None:
    """Protects the positive case: a baseline provider's signature is accepted and named
    (so a refusal in the other tests is for the reason they test)."""
    kid = env.manager.authorize(signed(env, env.acme[0]))
    assert kid == key_id(load_public_key(env.acme[1]))
    assert env.manager.authorize(signed(env, env.beta[0], txid=8)) == key_id(load_public_key(env.beta[1]))
    assert env.manager.errors == []


def refusal(env: Env, msg: ControlMessage, reason: str) -> None:
    before = len(env.manager.errors)
    with pytest.raises(ProvisionError, match=reason) as info:
        env.manager.authorize(msg)
    assert info.value.step == "authorization"
    assert len(env.manager.errors) == before + 1
    rec = env.manager.errors[-1]
    assert (rec["step"], rec["vm"], rec["service"]) == ("authorization", "v1", SERVICE)


def test_authorize_refuses_an_unsigned_provision(env: Env) -> None:
    """Protects the router against anyone on TCP 4340 configuring a VM."""
    refusal(env, wire(env.body()), "no authenticator")


def test_authorize_refuses_a_signer_the_baseline_does_not_authorize(env: Env) -> None:
    """Protects against a provider not in the baseline: under its own key id (unknown), and
    claiming an authorized provider's key id (the signature does not verify)."""
    mallory_id = key_id(load_public_key(env.mallory[1]))
    refusal(env, signed(env, env.mallory[0]), "not authorized")
    acme_id = key_id(load_public_key(env.acme[1]))
    assert acme_id != mallory_id
    refusal(env, signed(env, env.mallory[0], kid=acme_id), "bad signature")


def test_authorize_refuses_a_tampered_provision(env: Env) -> None:
    """Protects the body: a signed PROVISION whose resources were raised in transit."""
    msg = signed(env, env.acme[0], resources={"cpu": 0.5})
    body = dict(msg.body, resources={"cpu": 8.0})
    refusal(env, wire(body), "bad signature")


def test_authorize_refuses_a_replayed_provision(env: Env) -> None:
    """Protects against a captured PROVISION sent again (its nonce was seen)."""
    msg = signed(env, env.acme[0])
    env.manager.authorize(msg)
    refusal(env, msg, "replayed")


def test_authorize_refuses_a_provision_signed_for_another_router(env: Env) -> None:
    """Issue 12: a PROVISION names the router it is for (the address it is sent to)."""
    refusal(env, signed(env, env.acme[0], to="10.0.9.9"), "not for this receiver")
    assert env.manager.vms == {}


def test_authorize_refuses_a_stale_or_future_provision(env: Env) -> None:
    """Protects the clock window: issued long ago (or far ahead), even if never seen."""
    now = real_time.time()
    refusal(env, signed(env, env.acme[0], now=now - 3600), "window")
    refusal(env, signed(env, env.acme[0], txid=9, now=now + 3600), "window")


def test_authorize_refuses_when_the_baseline_key_file_is_unreadable(env: Env) -> None:
    """Protects fail-closed behaviour: a missing provider key file refuses, not grants."""
    env.baseline.authorized_keys = [str(env.tmp / "gone.pub")]
    with pytest.raises(ProvisionError) as info:
        env.manager.authorize(signed(env, env.acme[0]))
    assert info.value.step == "authorization"


# --- Fig. 5: the steps in order, and each refusal -------------------------------------------


def step_names(env: Env, vm: dict[str, Any]) -> list[str]:
    return [name.split(" (")[0].split(" ")[0] for name, _ in vm["steps"]]


def test_provision_runs_the_fig5_steps_in_order(env: Env) -> None:
    """Protects the happy path of Fig. 5: configured, fetched, resources checked, verified and
    installed (naming the signer), every object started in its sandbox (the manager's
    cgroups, the manifest's limits, the installed code), then initialised; the VM's policy
    overrides the provider's; nothing fetched stays behind."""
    vm = env.provision(policy={"max_transactions": 50}, port=9000)
    names = [name for name, _ in vm["steps"]]
    assert step_names(env, vm) == ["configured", "fetched", "resources", "verified", "initialised"]
    acme_id = key_id(load_public_key(env.acme[1]))
    assert names[3] == f"verified and installed {SERVICE} 1.0 (signer {acme_id})"
    times = [t for _, t in vm["steps"]]
    assert times == sorted(times) and times[0] == env.clock.now
    assert env.fetches == [SERVICE]
    assert [ev for ev in env.journal] == [("created", "v1-counter"), ("started", "v1-counter"),
                                          ("created", "v1-logger"), ("started", "v1-logger")]
    proc = env.manager.vms["v1"].objects["counter"]
    assert (proc.address, proc.port, proc.router) == ("0.0.0.0", 9000, ROUTER)
    assert proc.kw["cgroups"] is env.cgroups
    limits = proc.kw["limits"]
    assert (limits.cpu_quota, limits.memory_bytes, limits.pids_max) == (0.25, 32 * 1024 * 1024, 8)
    installed = Path(vm["installed"])
    assert proc.kw["code_dir"] == str(installed / "counter")
    assert (installed / "manifest.json").exists() and (installed / "counter" / "counter.py").exists()
    assert vm["version"] == "1.0" and vm["running_since"] == env.clock.now
    assert vm["policy"]["max_transactions"] == 50
    assert env.leftovers("fetched") == ["installed/v1"]
    assert env.manager.errors == [] and env.addresses == []


def test_virtual_interface_gets_its_address_and_loses_it_on_removal(env: Env) -> None:
    """Protects step 66 and its undo: the address goes on the named interface, and off
    again when the VM is removed (netlink faked)."""
    vm = env.provision(kind="interface", interface="eth1", address="10.0.2.77")
    assert vm["address"] == "10.0.2.77"
    assert env.addresses == [("add", "10.0.2.77", 32, "eth1")]
    assert env.manager.vms["v1"].objects["counter"].address == "10.0.2.77"
    asyncio.run(env.manager.remove("v1"))
    assert env.addresses[-1] == ("del", "10.0.2.77", 32, "eth1")
    assert env.running() == [] and env.leftovers() == []


def assert_refused_cleanly(env: Env, exc: ProvisionError, step: str) -> None:
    assert exc.step == step, exc
    rec = env.manager.errors[-1]
    assert (rec["step"], rec["vm"], rec["service"]) == (step, "v1", SERVICE)
    assert rec["reason"] == exc.reason
    assert env.manager.vms == {}
    assert env.running() == []
    assert env.leftovers() == []
    adds = [a for a in env.addresses if a[0] == "add"]
    dels = [a for a in env.addresses if a[0] == "del"]
    assert len(adds) == len(dels)


@pytest.mark.parametrize("body, step, reason", [
    ({"kind": "container"}, "message", "kind"),
    ({"kind": "interface", "interface": "eth9", "address": "10.0.2.77"}, "virtual interface", "eth9"),
    ({"kind": "interface", "interface": "eth1"}, "virtual interface", "needs an address"),
    ({"mobile": {"counter": {"name": "cam"}}}, "mobile objects", "counter"),
])
def test_message_refusals_come_before_any_fetch(env: Env, body: dict[str, Any], step: str,
                                                 reason: str) -> None:
    """Protects step 1's checks: a malformed PROVISION is refused before anything is
    fetched, with the step recorded."""
    exc = env.refused(**body)
    assert reason in exc.reason
    assert_refused_cleanly(env, exc, step)
    assert env.fetches == []


def test_credentials_may_only_restrict_the_baseline(env: Env) -> None:
    """Protects step 68: a PROVISION cannot add a provider key the baseline does not list."""
    exc = env.refused(credentials=[str(env.acme[1]), str(env.mallory[1])])
    assert str(env.mallory[1]) in exc.reason
    assert_refused_cleanly(env, exc, "credentials")
    assert env.fetches == []


def test_a_service_from_an_unauthorized_signer_is_refused(env: Env) -> None:
    """Protects steps 80-82: the fetched service is signed by a key the baseline does not
    authorize; it is refused at the credentials step, after the resource check, and nothing
    is installed or started."""
    env.site.clear()
    env.publish(signer=env.mallory[0])
    exc = env.refused()
    assert "UnknownSigner" in exc.reason or "BadSignature" in exc.reason
    assert_refused_cleanly(env, exc, "credentials")
    assert env.fetches == [SERVICE]
    assert env.journal == []


def test_a_restricted_vm_refuses_a_signer_the_baseline_would_accept(env: Env) -> None:
    """Protects the restriction taking effect: this VM authorizes only beta, so acme's
    service (valid for the baseline) is refused."""
    exc = env.refused(credentials=[str(env.beta[1])])
    assert_refused_cleanly(env, exc, "credentials")
    assert env.journal == []


def test_insufficient_resources_are_refused_before_install(env: Env) -> None:
    """Protects step 78: two objects of 0.25 CPU do not fit a VM of 0.4."""
    exc = env.refused(resources={"cpu": 0.4})
    assert "0.5" in exc.reason
    assert_refused_cleanly(env, exc, "resources")


def test_a_refusal_before_install_leaves_no_fetched_copy(env: Env) -> None:
    """Protects "a refusal leaves nothing behind" for the fetched, unverified files."""
    env.refused(resources={"cpu": 0.4})
    assert env.leftovers("fetched") == []


def test_an_unknown_service_is_refused_at_fetch(env: Env) -> None:
    exc = env.refused(service="nope-svc")
    assert exc.step == "fetch" and "ServiceNotFound" in exc.reason
    assert env.manager.vms == {} and env.leftovers() == []


def test_an_object_the_manifest_lacks_is_refused_at_manifest(env: Env) -> None:
    """Protects the manifest check of a partial (``objects``) provisioning."""
    exc = env.refused(objects=["counter", "ghost"])
    assert "ghost" in exc.reason
    assert_refused_cleanly(env, exc, "manifest")


def test_an_object_that_fails_to_start_undoes_everything(env: Env) -> None:
    """Protects step 90 and the all-or-nothing rule: the second object fails to start; the
    first is stopped, the address removed, the installed files deleted."""
    env.fail_start.add("logger")
    exc = env.refused(kind="interface", interface="eth1", address="10.0.2.77")
    assert "logger" in exc.reason
    assert_refused_cleanly(env, exc, "initialise")
    assert ("stopped", "v1-counter") in env.journal
    assert env.addresses == [("add", "10.0.2.77", 32, "eth1"), ("del", "10.0.2.77", 32, "eth1")]


def test_a_mobile_object_is_handed_to_the_host_and_deregisters_on_removal(env: Env) -> None:
    """Protects the mobile part: the object named in ``mobile`` is hosted by the agent (its
    registration client) on its home address; on removal it is stopped through the host,
    with deregistration."""
    cfg = {"name": "cam", "home_address": "10.0.1.10", "home_agent": "10.0.1.1",
           "nai": "cam@home.moat", "mobile_home": {"spi": 4097, "key": "aa" * 16},
           "mobile_foreign": {"spi": 8194, "key": "bb" * 16}}
    vm = env.provision(mobile={"counter": cfg})
    [call] = env.host.calls
    assert call["config"].name == "cam" and call["vm"] == ("v1", "counter")
    assert env.host.hosted_process("cam").address == "10.0.1.10"
    shown = json.dumps(vm)
    assert "aa" * 16 not in shown and "bb" * 16 not in shown  # no credentials on the screen
    asyncio.run(env.manager.remove("v1"))
    assert env.host.stopped == [("cam", True)]
    assert env.running() == []


# --- lifecycle -----------------------------------------------------------------------------


def enforce(env: Env) -> list[dict[str, Any]]:
    return asyncio.run(env.manager.enforce())


def test_a_duration_limit_retires_the_vm_when_used_up(env: Env) -> None:
    """Protects max_duration_s: the VM runs until 60 s after it started, then is removed
    (objects stopped, files gone) and the retirement recorded."""
    env.provision(policy={"max_duration_s": 60})
    env.clock.advance(59.9)
    assert enforce(env) == []
    assert "v1" in env.manager.vms and env.running() == ["v1-counter", "v1-logger"]
    env.clock.advance(0.1)
    [entry] = enforce(env)
    assert (entry["vm"], entry["service"]) == ("v1", SERVICE) and "duration" in entry["reason"]
    assert entry["at"] == env.clock.now
    assert env.manager.vms == {} and env.manager.retired == [entry]
    assert env.running() == [] and env.leftovers() == []


def test_a_migrated_vm_keeps_the_age_of_its_service(env: Env) -> None:
    """Protects running_since in a PROVISION: the duration counts from the service's first
    start, so a VM that arrives 50 s into a 60 s life retires 10 s later."""
    env.provision(policy={"max_duration_s": 60}, running_since=env.clock.now - 50)
    env.clock.advance(9.9)
    assert enforce(env) == []
    env.clock.advance(0.1)
    assert [e["vm"] for e in enforce(env)] == ["v1"]


def test_a_transaction_limit_counts_every_object_and_retires(env: Env) -> None:
    """Protects max_transactions: transactions of all the VM's objects add up; one short of
    the limit it stays, at the limit it is retired."""
    env.provision(policy={"max_transactions": 10})
    env.served.update(counter=4, logger=5)
    assert enforce(env) == []
    assert "v1" in env.manager.vms
    env.served["logger"] = 6
    [entry] = enforce(env)
    assert entry["reason"] == "10 of 10 transactions used"
    assert env.manager.vms == {} and env.running() == []


def test_without_limits_nothing_is_retired(env: Env) -> None:
    """Protects VMs without a usage limit from being retired by time or traffic."""
    env.provision()
    env.served.update(counter=10**6)
    env.clock.advance(10**6)
    assert enforce(env) == []
    assert "v1" in env.manager.vms


def test_an_object_that_does_not_answer_its_stats_does_not_block_enforcement(env: Env) -> None:
    """Protects enforcement against one dead object: its count is skipped, the others'
    still retire the VM."""
    env.provision(policy={"max_transactions": 3})
    env.served["counter"] = 3

    async def dead(cmd: str, timeout: float = 0, **args: Any) -> Any:
        raise AgentError("no answer")

    env.manager.vms["v1"].objects["logger"].call = dead  # type: ignore[method-assign]
    assert [e["vm"] for e in enforce(env)] == ["v1"]


def test_the_other_objects_of_an_object_with_a_mobile_network_run_as_its_parts(env: Env) -> None:
    """Protects NEMO parts (issue 11): with a mobile network prefix, the service's other
    objects serve on the prefix's addresses, with the object as their home agent and a
    Mobile-Home key derived from its own, and do not register while they run beside it."""
    cfg = {"name": "cam", "home_address": "10.0.1.10", "home_agent": "10.0.1.1",
           "nai": "cam@home.moat", "mobile_home": {"spi": 4097, "key": "aa" * 16},
           "mobile_foreign": {"spi": 8194, "key": "bb" * 16},
           "network_prefix": "10.0.1.224/30"}
    env.provision(mobile={"counter": cfg})
    vm = env.manager.vms["v1"]
    assert vm.at_home == ["logger"] and vm.primary_object()[0] == "counter"
    part = vm.mobile["logger"]
    assert (part["home_address"], part["home_agent"], part["part"]) == \
        ("10.0.1.224", "10.0.1.10", "secondary")
    assert part["mobile_foreign"]["spi"] == 8194 and part["mobile_home"]["key"] != "aa" * 16
    assert env.host.registering == {"cam": True, "logger": False}
    assert env.host.hosted_process("logger").address == "10.0.1.224"


def test_without_a_mobile_network_the_other_objects_serve_on_the_vm(env: Env) -> None:
    cfg = {"name": "cam", "home_address": "10.0.1.10", "home_agent": "10.0.1.1",
           "nai": "cam@home.moat", "mobile_home": {"spi": 4097, "key": "aa" * 16},
           "mobile_foreign": {"spi": 8194, "key": "bb" * 16}}
    env.provision(mobile={"counter": cfg})
    assert env.manager.vms["v1"].at_home == [] and env.host.registering == {"cam": True}


@pytest.mark.parametrize("name", ["../victim", "a/b", "", ".hidden", "x" * 65, "v1\n"])
def test_a_vm_name_that_could_name_another_directory_is_refused_and_touches_nothing(
        env: Env, name: str) -> None:
    """Issue 12: a VM's name becomes directories the router removes and replaces as root."""
    victim = env.storage / "victim"
    victim.mkdir(parents=True)
    (victim / "keep").write_text("mine")
    err = env.refused(vm=name)
    assert err.step == "message" and "must match" in err.reason
    assert (victim / "keep").read_text() == "mine" and env.manager.vms == {}
    assert env.running() == [] and env.leftovers("fetched") == []
