"""Lease-driven distribution on real namespaces (patent Fig. 12, steps 208-230): PatentTopo
with the broker and the HOA on r22b, a leased counter service whose mobile object ``svc``
runs as the primary on r18b (net 12).

A lease that does not fit grows the service: r18b finds room on r20a (net 14, the CO's own
network), starts a duplicate there from the primary's checkpoint, and the HOA holds two
bindings for the one home address and bicasts; every request is answered exactly once, by
the instance its credential names. Cancelling the duplicate's only lease releases it (VM,
process, cgroup, binding) while the primary serves on without losing a request. Every
failure to grow (no room, a target that refuses the reservation, a duplicate that cannot
start, every foreign network already served) refuses the lease ``no_capacity`` with why and
leaves the service as it was.

The tests share one network and run in file order: the duplicate made by the first is the
one the second and third look at, and the fourth releases it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.distribution.capacity import MAX_RESERVATIONS
from topologies.client import BrokerRefusal
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from vm_services import cgroup_dirs, last_error, publish

HOA = "r22b"  # also the broker
SERVICE = "count-svc"
#: The primary's VM terms: one core of r18b's two, so a 60 % lease and its 0.6 CPU fill it.
RESOURCES = {"cpu": 1.0, "memory_mb": 256, "pids": 64}
#: Requests the primary serves before the duplicate is made (its checkpoint's count).
BEFORE = 7
R18A, R20A = "10.12.0.1", "10.14.0.1"  # the FOAs: the care-of addresses of nets 12 and 14


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):
    with MoatNetwork(PatentTopo(), objects=["svc", "svc2"]) as m:
        publish(m, tmp_path_factory.mktemp("svc"), SERVICE, m.provider_key)
        yield m


@pytest.fixture(scope="module")
def primary(net: MoatNetwork) -> dict:
    """The primary on r18b, leased 60 % by co12 (long enough for the whole module), having
    served BEFORE requests of that lease."""
    answer = net.provision("r18b", vm="cnt", kind="service", service=SERVICE,
                           mobile={"counter": "svc"}, leased=True, resources=RESOURCES)
    assert answer["ok"], answer
    net.wait_for(lambda: instances(net, SERVICE), 15)
    net.wait_for(lambda: binding_of(net, "svc"), 15)
    g1 = net.client.lease_request("co12", SERVICE, 60, 0.6, 300)
    hop = g1["hops"][0]
    assert hop["instance"].startswith("r18b/cnt@"), hop
    served = net.client.leased_requests(hop["lease_id"], BEFORE, 100)
    assert_answered_once(served, "r18b", first=1)
    return {"lease": hop["lease_id"], "instance": hop["instance"],
            "home": net.objects["svc"].home_address}


@pytest.fixture(scope="module")
def grown(net: MoatNetwork, primary: dict) -> dict:
    """co14's 60 % lease, which the primary cannot also take: the broker grows the service."""
    started = time.monotonic()
    g2 = net.client.lease_request("co14", SERVICE, 60, 0.6, 300)
    return {"lease": g2["hops"][0]["lease_id"], "hop": g2["hops"][0],
            "seconds": time.monotonic() - started}


# --- helpers ---------------------------------------------------------------------------------


def instances(m: MoatNetwork, service: str) -> dict[str, dict]:
    """The broker's instances of ``service``, by id."""
    return {i["instance_id"]: i for s in m.client.services() if s["service"] == service
            for i in s["instances"]}


def binding_of(m: MoatNetwork, name: str) -> list[dict]:
    home = m.objects[name].home_address
    return [b for b in m.agent(HOA).call("bindings") if b["home_address"] == home]


def parts(m: MoatNetwork, name: str) -> list[tuple[str, str]]:
    return sorted((b["part"], b["care_of_address"]) for b in binding_of(m, name))


def stats(m: MoatNetwork, router: str, name: str) -> dict:
    return m.agent(router).call("object_stats", name=name)


def assert_answered_once(summary: dict, router: str, first: int) -> None:
    """Every request answered exactly once, by ``router``, and the counter went on from
    ``first`` without a gap (the instance's state is exact)."""
    n = summary["sent"]
    assert n > 0 and summary["answered"] == n, summary
    assert [by for _, by in summary["replies"]] == [[router]] * n, summary["replies"]
    assert summary["results"] == [{"count": first + i} for i in range(n)], summary["results"]


# --- growing -----------------------------------------------------------------------------------


def test_a_lease_that_does_not_fit_grows_a_duplicate_on_the_cos_network(
        net: MoatNetwork, primary: dict, grown: dict) -> None:
    hop = grown["hop"]
    dup = hop["instance"]
    assert dup.startswith("r20a/cnt-d"), hop  # net 14: co14's own network, r18b's net excluded
    assert hop["address"] == primary["home"] and grown["seconds"] < 10, grown
    # The broker: the duplicate is an instance of its own, registered by its router.
    found = instances(net, SERVICE)
    assert {i: d["part"] for i, d in found.items()} == {primary["instance"]: "primary",
                                                        dup: "duplicate"}
    assert found[dup]["router"] == "r20a" and found[dup]["router_address"] == R20A
    assert (found[dup]["used_share"], found[dup]["leases"]) == (60, 1)
    # The HOA: two bindings for the one home address, each with its part and care-of address.
    assert parts(net, "svc") == [("duplicate", R20A), ("primary", R18A)]
    # The broker's record of the growth, with the primary's router's steps.
    (record,) = [r for r in net.agent(HOA).call("growth") if r.get("instance") == dup]
    assert record["from"] == primary["instance"] and record["router"] == "r20a", record
    assert record["tried"] == [{"router": "r20a", "refused": ""}], record
    steps = [s for s, _ in record["steps"]]
    # r20a (net 14, co14's own) before r18a (the FOA in front of the primary): fewer hops.
    assert steps[0].startswith("asked ") and steps[1] == "candidates: ['r20a', 'r18a']", steps
    assert steps[2:] == ["reserved 1 CPU, 256 MiB on r20a",
                         "took the primary's checkpoint (it serves on)",
                         "duplicate serves on r20a, registered with S"], steps
    # The target: a duplicate VM with the primary's terms, fetched and verified by r20a itself;
    # its reservation gave way to the VM.
    (vm,) = net.agent("r20a").call("vm")
    assert (vm["part"], vm["service"], vm["leased"], vm["cpu"], vm["memory_mb"]) == \
        ("duplicate", SERVICE, True, 1.0, 256)
    vm_steps = [s for s, _ in vm["steps"]]
    assert any(s.startswith("fetched") for s in vm_steps) and any("verified" in s for s in vm_steps)
    room = net.agent("r20a").call("room")
    assert room["reservations"] == [] and room["free_cpu"] == pytest.approx(1.0), room
    assert room["stats"]["duplicates_hosted"] == 1


def test_each_lease_is_answered_once_by_its_own_instance_and_the_duplicate_had_the_state(
        net: MoatNetwork, primary: dict, grown: dict) -> None:
    """co12's and co14's requests reach the instance on their own network (their FOA holds
    the visitor); the duplicate started from the primary's checkpoint, and from then on each
    instance counts only what it serves."""
    dup = net.client.leased_requests(grown["lease"], 20, 100)
    assert_answered_once(dup, "r20a", first=BEFORE + 1)
    prim = net.client.leased_requests(primary["lease"], 20, 100)
    assert_answered_once(prim, "r18b", first=BEFORE + 1)
    after = {r: stats(net, r, "svc") for r in ("r18b", "r20a")}
    assert after["r18b"]["credentials"]["part"] == "primary"
    assert after["r20a"]["credentials"]["part"] == "duplicate"
    assert after["r20a"]["by_network"] == {"10.14.0.0/24": 20}, after["r20a"]


def test_a_request_through_the_home_network_is_bicast_and_answered_once(
        net: MoatNetwork, primary: dict, grown: dict) -> None:
    """From the home network (site24 as the CO) a request reaches the HOA, which bicasts it
    to both care-of addresses: the instance the credential names answers, the other leaves
    it unanswered ("wrong_instance" is never answered)."""
    hop = net.client.lease_request("site24", SERVICE, 20, 0.2, 60)["hops"][0]
    try:
        router = hop["instance"].split("/")[0]
        other = {"r18b": "r20a", "r20a": "r18b"}[router]
        before = {r: stats(net, r, "svc") for r in ("r18b", "r20a")}
        load = net.client.leased_requests(hop["lease_id"], 20, 100)
        assert_answered_once(load, router, first=before[router]["state"]["count"] + 1)
        after = {r: stats(net, r, "svc") for r in ("r18b", "r20a")}
    finally:
        net.client.lease_cancel(hop["lease_id"])
    b, a = before[other], after[other]
    assert a["left_to_sibling"] - b["left_to_sibling"] == 20, a
    assert a["credentials"]["refused"].get("wrong_instance", 0) - \
        b["credentials"]["refused"].get("wrong_instance", 0) == 20, a
    assert a["state"] == b["state"] and a["served"] == b["served"], a
    assert after[router]["left_to_sibling"] == before[router]["left_to_sibling"]
    # Its lease was not the duplicate's last: the duplicate stays.
    assert len(instances(net, SERVICE)) == 2 and len(binding_of(net, "svc")) == 2


def test_a_third_request_is_refused_when_no_router_that_could_take_it_has_room(
        net: MoatNetwork, primary: dict, grown: dict) -> None:
    """Asked from the home network (site24), whose requests the HOA bicasts to every
    instance: neither has 60 % free, net 14 runs an instance already, and r18a — net 12's
    FOA, which could run a second instance in front of the primary — has its room held."""
    net.agent("r18a").call("room_hold", cpu=2.0, memory_mb=1, seconds=5.0)
    leases = sorted(lease["lease_id"] for lease in net.client.leases())
    with pytest.raises(BrokerRefusal) as err:
        net.client.lease_request("site24", SERVICE, 60, 0.6, 60)
    assert err.value.reason == "no_capacity", err.value.answer
    assert "no router on a foreign network without svc" in err.value.detail, err.value.detail
    error = last_error(net, "r18b")
    assert error["step"] == "grow" and "no router on a foreign network" in error["reason"], error
    assert net.agent(HOA).call("growth")[-1].get("error"), "the refused growth is recorded"
    # Nothing changed: the same leases, instances, bindings and VMs.
    assert sorted(lease["lease_id"] for lease in net.client.leases()) == leases
    assert set(instances(net, SERVICE)) == {primary["instance"], grown["hop"]["instance"]}
    assert parts(net, "svc") == [("duplicate", R20A), ("primary", R18A)]
    assert len(net.agent("r20a").call("vm")) == 1 and len(net.agent("r18b").call("vm")) == 1


# --- releasing ---------------------------------------------------------------------------------


def test_cancelling_the_duplicates_only_lease_releases_it_and_the_primary_loses_nothing(
        net: MoatNetwork, primary: dict, grown: dict) -> None:
    (vm,) = net.agent("r20a").call("vm")
    pid = vm["objects"]["counter"]["pid"]
    cgroups = cgroup_dirs(pid, net.run.run_id)
    assert cgroups, f"no cgroup of run {net.run.run_id} for the duplicate's process {pid}"
    count = stats(net, "r18b", "svc")["state"]["count"]
    load: dict = {}
    runner = threading.Thread(target=lambda: load.update(
        net.client.leased_requests(primary["lease"], 150, 50)))  # 3 s of the primary's lease
    runner.start()
    try:
        # The load is under way (the primary counts it) before the duplicate goes ...
        net.wait_for(lambda: stats(net, "r18b", "svc")["state"]["count"] > count, 10)
        net.client.lease_cancel(grown["lease"])
        net.wait_for(lambda: net.agent("r20a").call("vm") == [], 5)
        # ... and still under way once it has gone.
        assert runner.is_alive(), "the release did not happen while the primary was loaded"
        released_bindings = net.wait_for(lambda: parts(net, "svc") == [("primary", R18A)], 2)
        assert released_bindings
    finally:
        runner.join(60)
    assert_answered_once(load, "r18b", first=count + 1)  # not one request lost or doubled
    # The duplicate is gone with everything it held.
    assert not Path(f"/proc/{pid}").exists()
    assert [d for d in cgroups if d.exists()] == []
    assert net.agent("r20a").call("objects") == []
    room = net.agent("r20a").call("room")
    assert room["free_cpu"] == pytest.approx(2.0) and room["stats"]["released"] == 1, room
    assert set(instances(net, SERVICE)) == {primary["instance"]}
    assert net.agent(HOA).call("status")["broker_stats"]["release_sent"] >= 1
    # The primary keeps its lease and its exact state.
    after = net.client.leased_requests(primary["lease"], 5, 100)
    assert_answered_once(after, "r18b", first=count + 151)


# --- failures leave things as they were ------------------------------------------------------


def test_a_duplicate_that_fails_at_the_target_leaves_nothing_there(
        net: MoatNetwork, tmp_path: Path) -> None:
    """r20a fetches the service from the remote site itself and checks it: a tampered
    archive fails the duplicate, r20a undoes it, and the primary serves on."""
    publish(net, tmp_path, "fragile-svc", net.provider_key)
    answer = net.provision("r18a", vm="frag", kind="service", service="fragile-svc",
                           mobile={"counter": "svc2"}, leased=True, resources=RESOURCES)
    assert answer["ok"], answer
    try:
        net.wait_for(lambda: instances(net, "fragile-svc"), 15)
        net.wait_for(lambda: binding_of(net, "svc2"), 15)
        lease = net.client.lease_request("co12", "fragile-svc", 60, 0.6, 300)["hops"][0]["lease_id"]
        assert_answered_once(net.client.leased_requests(lease, 5, 100), "r18a", first=1)
        archive = next((Path(net.net[net.site].repo_root) / "fragile-svc").resolve()
                       .glob("*.tar.gz"))
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 0xFF
        archive.write_bytes(bytes(data))

        with pytest.raises(BrokerRefusal) as err:
            net.client.lease_request("co14", "fragile-svc", 60, 0.6, 60)
        assert err.value.reason == "no_capacity", err.value.answer
        assert "the duplicate on r20a failed" in err.value.detail, err.value.detail
        # The target undid it all and says why; the primary's router says the growth failed.
        assert net.agent("r20a").call("vm") == [] and net.agent("r20a").call("objects") == []
        error = last_error(net, "r20a")
        assert error["vm"].startswith("frag-d") and error["service"] == "fragile-svc", error
        room = net.agent("r20a").call("room")
        assert room["reservations"] == [] and room["free_cpu"] == pytest.approx(2.0), room
        error = last_error(net, "r18a")
        assert error["step"] == "grow" and "the duplicate on r20a failed" in error["reason"]
        # The service is as it was: one instance, one binding, the lease served, state exact.
        assert [d["part"] for d in instances(net, "fragile-svc").values()] == ["primary"]
        assert parts(net, "svc2") == [("primary", R18A)]
        assert_answered_once(net.client.leased_requests(lease, 5, 100), "r18a", first=6)
        net.client.lease_cancel(lease)
    finally:
        net.agent("r18a").call("vm_remove", name="frag")
    net.wait_for(lambda: not binding_of(net, "svc2"), 10)


def test_a_dependency_the_target_cannot_fetch_refuses_the_duplicate(
        net: MoatNetwork, tmp_path: Path) -> None:
    """Step 214: needy-svc's object requires base-svc. r18a fetched and verified both when it
    was provisioned; once base-svc is gone from the remote site, r20a cannot resolve the
    dependency, refuses the duplicate at step ``dependencies``, and the primary serves on."""
    import json
    import shutil

    from agent.vm.repository import package_service, publish_service
    from experiments.counter_service import counter_source

    publish(net, tmp_path / "base", "base-svc", net.provider_key)
    src = counter_source(tmp_path / "needy")
    doc = json.loads((src / "counter" / "object.json").read_text())
    (src / "counter" / "object.json").write_text(json.dumps(dict(doc, requires=["base-svc"])))
    signed = package_service(src, "needy-svc", "1.0", "acme", net.provider_key, tmp_path / "out")
    assert signed.manifest.requires == ("base-svc",)
    publish_service(signed.path, net.net[net.site].repo_root)
    answer = net.provision("r18a", vm="needy", kind="service", service="needy-svc",
                           mobile={"counter": "svc2"}, leased=True, resources=RESOURCES)
    assert answer["ok"], answer
    try:
        steps = [s for s, _ in answer["vm"]["steps"]]
        assert any(s.startswith("dependency base-svc 1.0 fetched and verified") for s in steps), \
            steps
        net.wait_for(lambda: instances(net, "needy-svc"), 15)
        net.wait_for(lambda: binding_of(net, "svc2"), 15)
        lease = net.client.lease_request("co12", "needy-svc", 60, 0.6, 300)["hops"][0]["lease_id"]
        published = Path(net.net[net.site].repo_root) / "base-svc"  # a link to its version
        target = published.resolve()
        published.unlink()
        shutil.rmtree(target)

        with pytest.raises(BrokerRefusal) as err:
            net.client.lease_request("co14", "needy-svc", 60, 0.6, 60)
        assert err.value.reason == "no_capacity", err.value.answer
        assert "the duplicate on r20a failed" in err.value.detail, err.value.detail
        error = [e for e in net.agent("r20a").call("errors") if e["service"] == "needy-svc"][0]
        assert error["step"] == "dependencies" and "requires base-svc" in error["reason"], error
        assert net.agent("r20a").call("vm") == [] and len(binding_of(net, "svc2")) == 1
        assert_answered_once(net.client.leased_requests(lease, 5, 100), "r18a", first=1)
        net.client.lease_cancel(lease)
    finally:
        net.agent("r18a").call("vm_remove", name="needy")
    net.wait_for(lambda: not binding_of(net, "svc2"), 10)


def test_a_target_without_room_is_no_candidate_and_one_that_refuses_is_passed_over(
        net: MoatNetwork, primary: dict) -> None:
    """r20a's room held (as if VMs were about to arrive): first all of it, so r20a offers too
    little and is no candidate; then its reservation table full, so it offers the room but
    refuses to reserve it. Either way the lease is refused and nothing changes."""
    assert net.agent("r20a").call("vm") == [], "the release test left r20a empty"
    leases = sorted(lease["lease_id"] for lease in net.client.leases())
    held = net.agent("r20a").call("room_hold", cpu=2.0, memory_mb=1, seconds=5.0)
    assert held["reservation"].startswith("held-")
    # r18a, in front of the primary, could take a second instance of net 12: no room there.
    net.agent("r18a").call("room_hold", cpu=2.0, memory_mb=1, seconds=10.0)
    with pytest.raises(BrokerRefusal) as err:
        net.client.lease_request("co14", SERVICE, 60, 0.6, 60)
    assert err.value.reason == "no_capacity", err.value.answer
    assert "no router on a foreign network without svc has 1 CPU and 256 MiB free" \
        in err.value.detail, err.value.detail
    error = last_error(net, "r18b")
    assert error["step"] == "grow" and "no router on a foreign network" in error["reason"]
    net.wait_for(lambda: net.agent("r20a").call("room")["reservations"] == [], 8)

    for _ in range(MAX_RESERVATIONS):
        net.agent("r20a").call("room_hold", cpu=0.001, memory_mb=1, seconds=10.0)
    with pytest.raises(BrokerRefusal) as err:
        net.client.lease_request("co14", SERVICE, 60, 0.6, 60)
    assert err.value.reason == "no_capacity", err.value.answer
    assert "every candidate refused: r20a: no room on r20a" in err.value.detail, err.value.detail
    error = last_error(net, "r18b")
    assert error["step"] == "grow" and "every candidate refused" in error["reason"], error
    room = net.agent("r20a").call("room")
    assert room["stats"]["reservations_refused"] == 1 and len(room["reservations"]) == \
        MAX_RESERVATIONS, room["stats"]
    # As it was: the primary's lease alone, one binding, no VM on r20a, the primary serves.
    assert sorted(lease["lease_id"] for lease in net.client.leases()) == leases
    assert set(instances(net, SERVICE)) == {primary["instance"]}
    assert parts(net, "svc") == [("primary", R18A)]
    assert net.agent("r20a").call("vm") == []
    count = stats(net, "r18b", "svc")["state"]["count"]
    assert_answered_once(net.client.leased_requests(primary["lease"], 5, 100), "r18b",
                         first=count + 1)


# --- three instances: two on one foreign network (patent 104, 108, 110) ----------------------


def test_a_third_instance_runs_on_the_foa_in_front_of_the_primary_at_a_second_care_of(
        net: MoatNetwork, primary: dict) -> None:
    """With the rooms free again: dns23 (home network) takes 30 % beside co12 on the
    primary; co14's and site24's 60 % do not fit, and net 14 and then r18a — the FOA of the
    primary's network — each run a duplicate, r18a at its second care-of address
    (10.255.0.2). The HOA holds three bindings and bicasts; r18a delivers the primary's
    packets to r18b as frames by GRE key, answers its own, and takes over co12's lease (co12
    now reaches it first). Every lease is answered once, by the instance that holds it."""
    for router in ("r18a", "r20a"):  # the holds of the tests above run out
        net.wait_for(lambda: net.agent(router).call("room")["reservations"] == [], 20)
    dns = net.client.lease_request("dns23", SERVICE, 30, 0.3, 120)["hops"][0]
    assert dns["instance"] == primary["instance"], dns
    asked = [net.client.lease_request(co, SERVICE, 60, 0.6, 120)["hops"][0]["lease_id"]
             for co in ("co14", "site24")]
    found = instances(net, SERVICE)
    assert sorted(i["router"] for i in found.values()) == ["r18a", "r18b", "r20a"], found
    assert sorted(b["care_of_address"] for b in binding_of(net, "svc")) == \
        ["10.12.0.1", "10.14.0.1", "10.255.0.2"]
    home = primary["home"]
    visitors = sorted((v["care_of_address"], v["local_address"])
                      for v in net.agent("r18a").call("visitors") if v["home_address"] == home)
    assert visitors == [("10.12.0.1", "10.12.0.2"), ("10.255.0.2", "10.12.0.1")]
    holders = {lease["lease_id"]: lease["instance"].split("/")[0]
               for lease in net.client.leases()}
    assert holders[primary["lease"]] == "r18a", "co12's lease follows its network's instance"
    assert holders[dns["lease_id"]] == "r18b"

    def once_by(lease: str, router: str) -> None:
        summary = net.client.leased_requests(lease, 10, 100)
        assert summary["answered"] == summary["sent"] == 10, summary
        assert [by for _, by in summary["replies"]] == [[router]] * 10, summary["replies"]

    once_by(dns["lease_id"], "r18b")  # bicast from home; r18a hands it to r18b as frames
    for lease in [primary["lease"], *asked]:
        once_by(lease, holders[lease])
    for lease in [primary["lease"], *asked]:
        net.client.lease_cancel(lease)
    net.wait_for(lambda: len(binding_of(net, "svc")) == 1, 15)
    assert [(v["care_of_address"], v["local_address"]) for v in net.agent("r18a").call("visitors")
            if v["home_address"] == home] == [("10.12.0.1", "10.12.0.2")]
    once_by(dns["lease_id"], "r18b")  # routed to r18b again
