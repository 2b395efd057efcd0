"""Mobile objects run by the router VM (issue 5, lines 6 and 7, with issue 4's migration):
every object — placed by an experiment, provisioned from the remote site, or arriving by
migration — runs under controlled exec; a provisioned mobile object registers with its home
object agent, migrates with its VM's terms (the target fetches and verifies the code
itself), and when its lifecycle is used up it is removed together with its binding."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.hosting.object_uids import UID_FIRST, UID_LAST
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from vm_services import publish

HOA = "r22b"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    with MoatNetwork(PatentTopo(), objects=["counter", "svc1", "svc2"], advertise_interval=0.5) as m:
        publish(m, tmp_path_factory.mktemp("svc"), "counter-svc", m.provider_key)
        yield m


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def memory_limit(pid: int) -> int:
    """The memory limit of the process's cgroup (v1 memory controller or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
        if hierarchy == "0" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return int(Path(f"/sys/fs/cgroup{path}/memory.max").read_text())
    raise AssertionError(f"no memory cgroup for {pid}")


def assert_sandboxed(m: MoatNetwork, router: str, name: str, memory_mb: int) -> int:
    """The object's process: a uid of the object range (its own), a MOAT cgroup of this run with its
    memory limit; returns its pid."""
    objects = {o["name"]: o for o in m.agent(router).call("objects")}
    pid = objects[name]["pid"]
    assert pid and UID_FIRST <= uid_of(pid) <= UID_LAST
    assert m.run.run_id in Path(f"/proc/{pid}/cgroup").read_text()
    assert memory_limit(pid) == memory_mb << 20
    assert objects[name]["usage"]["memory_bytes"] > 0
    return pid


def count(m: MoatNetwork, name: str) -> int:
    return m.agent(m.where(name)).call("object_stats", name=name)["state"]["count"]


def binding_of(m: MoatNetwork, name: str) -> list[dict]:
    home = m.objects[name].home_address
    return [b for b in m.agent(HOA).call("bindings") if b["home_address"] == home]


def test_placed_object_runs_and_migrates_under_controlled_exec(net: MoatNetwork) -> None:
    net.place_object("counter", "r18b", resources={"memory_mb": 128})
    net.wait_for(lambda: binding_of(net, "counter"), timeout=15)
    old = assert_sandboxed(net, "r18b", "counter", 128)
    assert net.requests("co14", "counter", 10)["answered"] == 10
    report = net.migrate("counter", "r20a", "break-before-make")
    assert report["ok"], report
    # The source let go of it at once; its process ends after the report (off the move's path).
    net.wait_for(lambda: not Path(f"/proc/{old}").exists(), timeout=10)
    assert_sandboxed(net, "r20a", "counter", 128)  # its resources travelled with it
    assert count(net, "counter") == 10
    net.agent("r20a").call("object_stop", name="counter")


def test_provisioned_mobile_object_is_retired_with_its_binding(net: MoatNetwork) -> None:
    answer = net.provision("r18a", vm="m1", kind="service", service="counter-svc",
                           mobile={"counter": "svc1"}, policy={"max_transactions": 15})
    assert answer["ok"], answer
    assert answer["vm"]["mobile"]["counter"]["name"] == "svc1"
    assert "mobile_home" not in str(answer["vm"]), "credentials are never shown"
    bound = net.wait_for(lambda: binding_of(net, "svc1"), timeout=15)
    assert bound[0]["care_of_address"].startswith("10.12."), bound
    assert_sandboxed(net, "r18a", "svc1", 96)  # the manifest's memory, not the default
    # Served on its home address from another network, through the HOA's tunnel.
    assert net.requests("co14", "svc1", 10)["answered"] == 10
    assert net.agent("r18a").call("retired") == []
    assert net.requests("co14", "svc1", 5)["answered"] == 5
    retired = net.wait_for(lambda: net.agent("r18a").call("retired"), timeout=10)
    assert retired[0]["vm"] == "m1" and "15 of 15" in retired[0]["reason"]
    net.wait_for(lambda: not binding_of(net, "svc1"), timeout=10)  # deregistered, not expired
    assert net.where("svc1") is None and net.agent("r18a").call("vm") == []
    assert net.requests("co14", "svc1", 3)["answered"] == 0


def test_provisioned_mobile_object_migrates_with_its_vm(net: MoatNetwork) -> None:
    answer = net.provision("r18a", vm="m2", kind="service", service="counter-svc",
                           mobile={"counter": "svc2"}, policy={"max_transactions": 40})
    assert answer["ok"], answer
    net.wait_for(lambda: binding_of(net, "svc2"), timeout=15)
    assert net.requests("co14", "svc2", 10)["answered"] == 10

    report = net.migrate("svc2", "r20a", "make-before-break")
    assert report["ok"], report
    assert net.where("svc2") == "r20a"
    assert net.agent("r18a").call("vm") == [], "the source VM had nothing left: removed"
    vm = net.agent("r20a").call("vm")[0]
    steps = [s for s, _ in vm["steps"]]
    assert any(s.startswith("fetched") for s in steps) and any("verified" in s for s in steps)
    assert vm["policy"]["max_transactions"] == 40 and list(vm["objects"]) == ["counter"]
    assert_sandboxed(net, "r20a", "svc2", 96)
    assert count(net, "svc2") == 10
    assert net.requests("co14", "svc2", 10)["answered"] == 10

    # A move that breaks half-way leaves the object serving in its VM, with its state.
    net.agent("r18b").call("inject_fault", point="state_transfer")
    report = net.migrate("svc2", "r18b", "make-before-break")
    assert not report["ok"] and "injected fault" in report["error"]
    assert net.where("svc2") == "r20a" and net.agent("r18b").call("vm") == []
    assert count(net, "svc2") == 20
    net.wait_for(lambda: [b for b in binding_of(net, "svc2") if b["care_of_address"].startswith("10.14.")],
                 timeout=15)

    report = net.migrate("svc2", "r18a", "break-before-make")
    assert report["ok"], report
    assert net.requests("co14", "svc2", 10)["answered"] == 10
    assert count(net, "svc2") == 30
    # The transaction limit counts the service's use across its moves: 30 served so far.
    assert net.agent("r18a").call("retired") == [] or all(r["vm"] != "m2" for r in net.agent("r18a").call("retired"))
    assert net.requests("co14", "svc2", 10)["answered"] == 10
    retired = net.wait_for(lambda: [r for r in net.agent("r18a").call("retired") if r["vm"] == "m2"], timeout=10)
    assert "40 of 40" in retired[0]["reason"]
    net.wait_for(lambda: not binding_of(net, "svc2"), timeout=10)


def test_a_target_that_finds_the_code_tampered_refuses_the_arrival(net: MoatNetwork, tmp_path: Path) -> None:
    """The target checks the code like any provisioning: what it fetches from the remote
    site must verify there, else the move fails and the object stays where it was."""
    publish(net, tmp_path, "fragile-svc", net.provider_key)
    answer = net.provision("r18a", vm="m3", kind="service", service="fragile-svc",
                           mobile={"counter": "svc1"})
    assert answer["ok"], answer
    net.wait_for(lambda: binding_of(net, "svc1"), timeout=15)
    assert net.requests("co14", "svc1", 5)["answered"] == 5
    archive = next((Path(net.net[net.site].repo_root) / "fragile-svc").resolve().glob("*.tar.gz"))
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    report = net.migrate("svc1", "r20a", "make-before-break")
    assert not report["ok"] and "TamperedArchive" in report["error"], report
    assert net.where("svc1") == "r18a" and net.agent("r20a").call("vm") == []
    assert net.agent("r20a").call("errors")[-1]["vm"] == "m3"
    assert count(net, "svc1") == 5
    assert net.requests("co14", "svc1", 5)["answered"] == 5
    net.agent("r18a").call("vm_remove", name="m3")
    net.wait_for(lambda: not binding_of(net, "svc1"), timeout=10)


def test_a_mobile_object_is_upgraded_in_place_and_stays_registered(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path / "v1", "growing-svc", net.provider_key)
    answer = net.provision("r20a", vm="m4", kind="service", service="growing-svc",
                           mobile={"counter": "svc1"}, policy={"update_check_interval_s": 0.5})
    assert answer["ok"], answer
    before = net.wait_for(lambda: binding_of(net, "svc1"), timeout=15)
    assert net.requests("co14", "svc1", 5)["answered"] == 5
    old_pid = {o["name"]: o for o in net.agent("r20a").call("objects")}["svc1"]["pid"]
    publish(net, tmp_path / "v2", "growing-svc", net.provider_key, version="2.0")
    net.wait_for(lambda: [v for v in net.agent("r20a").call("vm")
                          if any("upgraded 1.0 -> 2.0" in s for s, _ in v["steps"])], timeout=20)
    new_pid = assert_sandboxed(net, "r20a", "svc1", 96)
    assert new_pid != old_pid
    # The same registration (not a new one): its care-of address and key did not change.
    after = binding_of(net, "svc1")
    assert [(b["care_of_address"], b["gre_key"]) for b in after] == \
        [(b["care_of_address"], b["gre_key"]) for b in before]
    assert count(net, "svc1") == 5
    assert net.requests("co14", "svc1", 5)["answered"] == 5
    assert count(net, "svc1") == 10
    net.agent("r20a").call("vm_remove", name="m4")
    net.wait_for(lambda: not binding_of(net, "svc1"), timeout=10)


def class_packets(m: MoatNetwork, router: str, dev: str, rate: str = "rate 1Mbit") -> int:
    """Packets sent through the VM's htb class (the one with ``rate``) on ``dev``."""
    blocks = m.net[router].cmd(f"tc -s class show dev {dev}").split("class htb ")
    ours = [b for b in blocks if rate in b]
    assert ours, blocks
    return int(ours[0].split("Sent ")[1].split(" bytes ")[1].split(" pkt")[0])


def test_the_egress_cap_holds_the_mobile_objects_replies(net: MoatNetwork) -> None:
    """A VM's cap matches its mobile object's home address (the object answers from it),
    not a port every object on the router shares."""
    answer = net.provision("r18a", vm="m5", kind="service", service="counter-svc",
                           mobile={"counter": "svc1"}, resources={"egress_kbit": 1000})
    assert answer["ok"], answer
    try:
        net.wait_for(lambda: binding_of(net, "svc1"), timeout=15)
        before = class_packets(net, "r18a", "r18a-eth1")
        assert net.requests("co14", "svc1", 10)["answered"] == 10
        assert class_packets(net, "r18a", "r18a-eth1") - before >= 10  # replies to net 14
        filters = net.net["r18a"].cmd("tc filter show dev r18a-eth1")
        home = bytes(int(x) for x in net.objects["svc1"].home_address.split(".")).hex()
        assert f"{home}/ffffffff at 12" in filters  # matched on svc1's home address
    finally:
        net.agent("r18a").call("vm_remove", name="m5")
    assert "rate 1Mbit" not in net.net["r18a"].cmd("tc class show dev r18a-eth1")


@pytest.mark.parametrize("extra, step, reason", [
    ({"mobile": {"counter": {"name": "svc1"}}}, "mobile objects", "bad object configuration"),
    ({"mobile": ["counter"]}, "message", "mobile must map"),
    ({"objects": ["no-such-object"]}, "manifest", "no object(s) ['no-such-object']"),
])
def test_a_bad_mobile_part_is_refused_and_leaves_nothing(net: MoatNetwork, extra: dict, step: str,
                                                         reason: str) -> None:
    answer = net.provision("r18b", vm="bad", kind="service", service="counter-svc", **extra)
    assert not answer["ok"] and reason in answer["error"], answer
    assert net.agent("r18b").call("errors")[-1]["step"] == step
    assert net.agent("r18b").call("vm") == [] and net.agent("r18b").call("objects") == []
