"""The router VM in the patent's topology (issue 5, lines 1, 2, 4, 7, 8): a provisioning
message from the remote site makes a router fetch a signed service over SFTP, check it step
by step (Fig. 5) and run its object sandboxed; refusals are recorded and leave nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.vm.repository import package_service, publish_service
from agent.vm.signing import generate_keypair
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from site_control import kill_sshd
from vm_services import counter_source, publish


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo()) as m:
        yield m


def test_provision_virtual_interface_runs_signed_counter(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path, "counter-svc", net.provider_key)
    answer = net.provision("r22a", vm="vm1", kind="interface", interface="r22a-eth0",
                           address="10.16.0.201", service="counter-svc",
                           resources={"cpu": 0.5, "memory_mb": 256, "pids": 64})
    assert answer["ok"], answer
    vm = answer["vm"]
    assert vm["version"] == "1.0" and [s for s, _ in vm["steps"]][-1] == "initialised"
    # The service answers on its virtual interface's address, from another network.
    got = net.requests_at("co14", "10.16.0.201", count=20)
    assert got["answered"] == got["sent"] == 20
    shown = net.agent("r22a").call("vm")[0]["objects"]["counter"]
    assert shown["usage"]["cpu_seconds"] > 0 and shown["usage"]["memory_bytes"] > 0
    net.agent("r22a").call("vm_remove", name="vm1")
    assert net.requests_at("co14", "10.16.0.201", count=5)["answered"] == 0
    assert "10.16.0.201" not in net.net["r22a"].cmd("ip -o addr")


def test_refusals_are_recorded_and_leave_nothing(net: MoatNetwork, tmp_path: Path) -> None:
    stranger, _pub = generate_keypair(tmp_path / "stranger", "stranger")
    publish(net, tmp_path / "a", "unsigned-svc", stranger)
    publish(net, tmp_path / "b", "greedy-svc", net.provider_key, cpu=2.0)
    cases = [
        ({"service": "unsigned-svc"}, "credentials", "UnknownSigner"),
        ({"service": "greedy-svc"}, "resources", "needs cpu 2.0"),
        ({"service": "no-such-svc"}, "fetch", "ServiceNotFound"),
        ({"service": "unsigned-svc", "credentials": ["/etc/passwd"]}, "credentials", "only restrict"),
    ]
    for i, (body, step, reason) in enumerate(cases):
        answer = net.provision("r18b", vm=f"bad{i}", kind="service", **body)
        assert not answer["ok"] and reason in answer["error"], (body, answer)
        assert net.agent("r18b").call("errors")[-1]["step"] == step
    assert net.agent("r18b").call("vm") == []
    storage = net.run.dir / "vm" / "r18b"
    assert not (storage / "installed").exists() or not any((storage / "installed").iterdir())


def test_reprovision_of_the_same_version_fetches_no_archive(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path, "cached-svc", net.provider_key)
    body = dict(vm="c1", kind="service", service="cached-svc", port=5001)
    first = net.provision("r20a", **body)
    assert first["ok"], first
    net.agent("r20a").call("vm_remove", name="c1")
    again = net.provision("r20a", **body)
    assert again["ok"], again
    fetched = [s for s, _ in again["vm"]["steps"] if s.startswith("fetched")]
    assert fetched and "1 cached" in fetched[0], fetched
    first_fetch = [s for s, _ in first["vm"]["steps"] if s.startswith("fetched")][0]
    assert "0 cached" in first_fetch
    net.agent("r20a").call("vm_remove", name="c1")


def test_virtual_service_stays_reachable_when_an_interface_goes_down(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path, "vs-svc", net.provider_key)
    answer = net.provision("r18a", vm="vs", kind="service", service="vs-svc", port=5002)
    assert answer["ok"], answer
    try:
        assert net.requests_at("co12", "10.12.0.1", count=5, port=5002)["answered"] == 5
        assert net.requests_at("co14", "10.255.0.2", count=5, port=5002)["answered"] == 5
        net.net["r18a"].cmd("ip link set r18a-eth0 down")  # net 12's side of the router
        assert net.requests_at("co14", "10.255.0.2", count=5, port=5002)["answered"] == 5
    finally:
        net.net["r18a"].cmd("ip link set r18a-eth0 up")
        net.agent("r18a").call("vm_remove", name="vs")


def test_transaction_limit_retires_the_service(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path, "limited-svc", net.provider_key)
    answer = net.provision("r20a", vm="lim", kind="service", service="limited-svc", port=5003,
                           policy={"max_transactions": 10})
    assert answer["ok"], answer
    assert answer["vm"]["policy"]["max_transactions"] == 10
    assert net.requests_at("co14", "10.14.0.1", count=10, port=5003)["answered"] == 10
    retired = net.wait_for(lambda: net.agent("r20a").call("retired"), timeout=10)
    assert retired[0]["vm"] == "lim" and "10 of 10 transactions" in retired[0]["reason"]
    assert net.agent("r20a").call("vm") == []
    assert net.requests_at("co14", "10.14.0.1", count=3, port=5003)["answered"] == 0


def test_new_version_is_picked_up_without_losing_state(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path / "v1", "upgrading-svc", net.provider_key)
    answer = net.provision("r22c", vm="up", kind="service", service="upgrading-svc", port=5004,
                           policy={"update_check_interval_s": 0.5})
    assert answer["ok"], answer
    assert net.requests_at("co14", "10.16.0.3", count=5, port=5004, client="c")["answered"] == 5
    signed = package_service(counter_source(tmp_path / "v2"), "upgrading-svc", "2.0", "acme",
                             net.provider_key, tmp_path / "v2" / "out")
    publish_service(signed.path, net.net[net.site].repo_root)
    net.wait_for(lambda: [v for v in net.agent("r22c").call("vm")
                          if any("upgraded 1.0 -> 2.0" in s for s, _ in v["steps"])], timeout=20)
    stats = net.agent("r22c").call("vm")[0]["objects"]["counter"]
    assert stats["pid"] is not None
    # The count goes on from the state the old version had: 5 before, then the next one.
    reply = net.probe("co14", "service", "10.16.0.3", "5004", json.dumps({"op": "incr"}))
    assert reply["ok"] and reply["result"]["count"] == 6, reply
    net.agent("r22c").call("vm_remove", name="up")


def test_two_vms_on_one_router_and_a_non_extensible_service(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path / "a", "svc-a", net.provider_key)
    publish(net, tmp_path / "b", "svc-b", net.provider_key)
    a = net.provision("r18a", vm="va", kind="interface", interface="r18a-eth0", address="10.12.0.201",
                      service="svc-a", resources={"cpu": 0.3, "memory_mb": 128, "pids": 32})
    b = net.provision("r18a", vm="vb", kind="service", service="svc-b", port=5005,
                      policy={"extensible": False})
    assert a["ok"] and b["ok"], (a, b)
    try:
        assert {v["name"] for v in net.agent("r18a").call("vm")} == {"va", "vb"}
        assert net.probe("co14", "service", "10.12.0.201", "4341", json.dumps({}))["ok"]
        assert net.probe("co14", "service", "10.12.0.1", "5005", json.dumps({}))["ok"]
        refused = net.probe("co14", "service", "10.12.0.1", "5005", json.dumps({"from_service": "svc-a"}))
        assert not refused["ok"] and "not extensible" in refused["error"]
    finally:
        net.agent("r18a").call("vm_remove", name="va")
        net.agent("r18a").call("vm_remove", name="vb")


def test_egress_cap_classifies_the_vms_traffic_into_its_htb_class(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path / "e", "capped-svc", net.provider_key)
    answer = net.provision("r18a", vm="cap", kind="service", service="capped-svc", port=5006,
                           resources={"cpu": 0.5, "memory_mb": 256, "pids": 64, "egress_kbit": 1000})
    assert answer["ok"], answer
    try:
        step = [s for s, _ in answer["vm"]["steps"] if s.startswith("egress capped")][0]
        assert "r18a-eth0" in step and "r18a-eth1" in step
        r18a = net.net["r18a"]
        # The backbone end keeps Mininet's htb root (5:) and gains the VM's class beside its own.
        assert "rate 1Mbit" in r18a.cmd("tc class show dev r18a-eth1")
        assert "rate 1Mbit" in r18a.cmd("tc class show dev r18a-eth0")
        assert net.requests_at("co12", "10.12.0.1", count=10, port=5006)["answered"] == 10
        stats = r18a.cmd("tc -s class show dev r18a-eth0")
        block = stats.split("class htb ")
        ours = [b for b in block if "rate 1Mbit" in b][0]
        sent = int(ours.split("Sent ")[1].split(" bytes ")[1].split(" pkt")[0])
        assert sent >= 10, ours  # the replies went through the VM's class
        # ... and so do replies over TCP (same port: a second u32 filter).
        assert net.probe("co12", "service", "10.12.0.1", "5006", json.dumps({}), "--tcp")["ok"]
        after = [b for b in r18a.cmd("tc -s class show dev r18a-eth0").split("class htb ") if "rate 1Mbit" in b][0]
        assert int(after.split("Sent ")[1].split(" bytes ")[1].split(" pkt")[0]) >= sent + 2, after
    finally:
        net.agent("r18a").call("vm_remove", name="cap")
    assert "rate 1Mbit" not in net.net["r18a"].cmd("tc class show dev r18a-eth0")
    assert "rate 1Mbit" not in net.net["r18a"].cmd("tc class show dev r18a-eth1")
    assert "htb 77:" not in net.net["r18a"].cmd("tc qdisc show dev r18a-eth0"), "MOAT's own root goes too"
    assert "htb 5:" in net.net["r18a"].cmd("tc qdisc show dev r18a-eth1"), "Mininet's stays"


def test_duration_limit_retires_the_service(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path, "brief-svc", net.provider_key)
    answer = net.provision("r22c", vm="brief", kind="service", service="brief-svc", port=5007,
                           policy={"max_duration_s": 1})
    assert answer["ok"], answer
    retired = net.wait_for(lambda: [r for r in net.agent("r22c").call("retired") if r["vm"] == "brief"],
                           timeout=10)
    assert "duration of 1 s used up" in retired[0]["reason"]
    assert [v for v in net.agent("r22c").call("vm") if v["name"] == "brief"] == []


def test_tampered_archive_on_the_site_is_refused(net: MoatNetwork, tmp_path: Path) -> None:
    publish(net, tmp_path, "tampered-svc", net.provider_key)
    store = Path(net.net[net.site].repo_root) / "tampered-svc"
    archive = next(store.resolve().glob("*.tar.gz"))
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    answer = net.provision("r20a", vm="t", kind="service", service="tampered-svc", port=5008)
    assert not answer["ok"] and "TamperedArchive" in answer["error"], answer
    assert net.agent("r20a").call("errors")[-1]["vm"] == "t"
    assert net.agent("r20a").call("vm") == []


def test_only_a_signed_provision_from_an_authorized_provider_configures_a_vm(net: MoatNetwork, tmp_path: Path) -> None:
    """TCP 4340 is open to every host: the router checks who sent the PROVISION (the
    provider's Ed25519 signature), refuses a replay of one it accepted, and refuses a
    MIGRATE that does not carry the routers' key."""
    from agent.core.msgauth import sign_ed25519
    from agent.vm.signing import key_id, load_private_key
    from packets import ControlType

    publish(net, tmp_path, "guarded-svc", net.provider_key)
    target = str(net.topo.addresses("r20a")[0].ip)
    body = {"vm": "g", "kind": "service", "service": "guarded-svc", "port": 5009}

    def send(from_host: str, ctype: str, payload: dict, *extra: str) -> dict:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(payload))
        return net.probe(from_host, "control", target, ctype, f"@{path}", *extra)

    unsigned = send(net.site, "provision", body)
    assert not unsigned["ok"] and "no authenticator" in unsigned["error"], unsigned
    stranger, _ = generate_keypair(tmp_path / "stranger", "stranger")
    forged = send(net.site, "provision", body, "--sign-key", str(stranger))
    assert not forged["ok"] and "not authorized" in forged["error"], forged
    assert [e["step"] for e in net.agent("r20a").call("errors")[-2:]] == ["authorization"] * 2
    assert net.agent("r20a").call("vm") == []

    key = load_private_key(net.provider_key)
    signed = sign_ed25519(ControlType.PROVISION, 0, body, key, key_id(key.public_key()), to=target)
    assert send(net.site, "provision", signed)["ok"]
    replayed = send("co12", "provision", signed)  # captured on the wire, sent again
    assert not replayed["ok"] and "replayed" in replayed["error"], replayed
    assert [v["name"] for v in net.agent("r20a").call("vm")] == ["g"]
    net.agent("r20a").call("vm_remove", name="g")

    # A MIGRATE without the routers' key is refused (one that carries an object's keys is not
    # even sent: no secret crosses the wire in clear, issue 12).
    cfg = net.object_config("counter").to_json()
    held = send("co12", "migrate", {"action": "start", "spec": "agent.objects.counter:Counter",
                                    "warm": False, "config": cfg})
    assert not held["ok"] and "not sent" in held["error"], held
    intruder = send("co12", "migrate", {"action": "cancel", "name": "counter"})
    assert not intruder["ok"] and "MIGRATE refused" in intruder["error"], intruder
    assert net.agent("r20a").call("objects") == []


def test_zz_unreachable_site_is_refused(net: MoatNetwork, tmp_path: Path) -> None:
    """Last in the module: it stops the remote site's sshd. A service the router never fetched
    is refused at step fetch; one it holds in its version cache starts from there, verified,
    and its steps say so (issue 14: warm provisioning)."""
    publish(net, tmp_path / "a", "counter-svc", net.provider_key)
    publish(net, tmp_path / "b", "fresh-svc", net.provider_key)
    held = net.provision("r22a", vm="held", kind="service", service="counter-svc", port=5009)
    assert held["ok"], held
    net.agent("r22a").call("vm_remove", name="held")
    kill_sshd(net.net[net.site])  # its sessions too: r22a keeps one
    answer = net.provision("r22a", vm="u", kind="service", service="fresh-svc", port=5009)
    assert not answer["ok"] and "SiteUnreachable" in answer["error"], answer
    assert net.agent("r22a").call("errors")[-1]["step"] == "fetch"
    answer = net.provision("r22a", vm="u", kind="service", service="counter-svc", port=5009)
    assert answer["ok"], answer
    assert any("site unreachable" in step for step, _ in answer["vm"]["steps"]), answer
    net.agent("r22a").call("vm_remove", name="u")
