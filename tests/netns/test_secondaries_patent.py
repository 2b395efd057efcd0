"""Secondary mobile objects on real namespaces (patent Fig. 12 step 218; NEMO for Mobile IPv4,
RFC 5177): PatentTopo with the HOA and the broker on r22b, a leased two-object service
``pair-svc`` whose mobile object ``svc`` (the counter) runs as the primary on r18b (net 12),
with its part ``tally`` beside it on the first address of its mobile network prefix
(10.16.0.224/30).

The HOA keeps one binding, the object's, with its prefix. A lease for the part that does not
fit moves the part (not the service) to r20a (net 14) as a *secondary*: it registers through
r20a's FOA with the object's home address as its home agent, and r18b (the object's router)
decides and tunnels to it — a packet for the part from the home network crosses two GRE
tunnels, which the backbone captures show. Its state goes with it, no request is lost while
it moves; cancelling its last lease gives the part back to r18b with its state. A move that
cannot be made (no room, the final state cannot be delivered) leaves the part serving at home.

The tests share one network and run in file order: the secondary made by the first is the one
the next three look at, the fifth releases it, the next two fail to move it again, and the last
moves it once more and gives it back while it is loaded, with every request answered once
and the state exact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from experiments.counter_service import publish_pair
from topologies.client import BrokerRefusal
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo
from vm_services import cgroup_dirs, last_error

HOA = "r22b"  # also the broker
SERVICE = "pair-svc"
PART = "tally"
RESOURCES = {"cpu": 1.0, "memory_mb": 256, "pids": 64}
HOME = "10.16.0.100"  # svc's home address: the nested home agent's address
HOA_ADDRESS = "10.16.0.2"
PREFIX = "10.16.0.224/30"  # svc's mobile network prefix
PART_ADDRESS = "10.16.0.224"  # the part's address: the first of the prefix
R18A, R20A = "10.12.0.1", "10.14.0.1"  # the FOAs: care-of addresses of nets 12 and 14
R18B = "10.12.0.2"  # the primary's router
#: The FOAs' backbone addresses: where they relay registrations from.
R18A_UP, R20A_UP = "10.255.0.2", "10.255.0.6"
DNS23 = "10.16.0.23"
#: r22a's backbone interfaces: toward r18a (net 12) and toward r20a (net 14).
TO_NET12, TO_NET14 = "r22a-eth1", "r22a-eth2"
#: Requests the part serves at home before it moves (its checkpoint's count).
BEFORE = 10
LUA = Path(__file__).resolve().parents[2] / "packets" / "wireshark" / "moat.lua"
NESTED_HOME_SPI = 3000  # agent.mobility.foreign.NESTED_HOME_SPI
PART_SPI = 0x10000  # agent.distribution.nested.PART_SPI_BASE + the part's index (0)


@pytest.fixture(scope="module")
def net():
    if shutil.which("tshark") is None or shutil.which("tcpdump") is None:
        pytest.skip("tshark and tcpdump are needed (scripts/bootstrap.sh installs them)")
    with MoatNetwork(PatentTopo(), objects=["svc", "svc2"]) as m:
        publish_pair(m, SERVICE)
        yield m


@pytest.fixture(scope="module")
def primary(net: MoatNetwork) -> dict:
    """The primary on r18b, its registration captured on the backbone; dns23 (on the home
    network) leases the part, which serves BEFORE requests at home."""
    with net.capture(TO_NET12, "secondaries-primary-rrq", node="r22a",
                     bpf="udp port 434") as pcap:
        answer = net.provision("r18b", vm="pair", kind="service", service=SERVICE,
                               mobile={"counter": "svc"}, leased=True, resources=RESOURCES)
        assert answer["ok"], answer
        net.wait_for(lambda: instances(net), 15)
        net.wait_for(lambda: net.agent(HOA).call("bindings"), 15)
        time.sleep(0.3)  # the HOA's reply reaches the capture
    g1 = net.client.lease_request("dns23", PART, 60, 0.6, 300)
    hop = g1["hops"][0]
    assert hop["instance"].startswith("r18b/pair@") and hop["address"] == PART_ADDRESS, hop
    assert_answered_once(net.client.leased_requests(hop["lease_id"], BEFORE, 50), ["r18b"],
                         first=1)
    return {"lease": hop["lease_id"], "instance": hop["instance"], "rrq_pcap": pcap}


@pytest.fixture(scope="module")
def moved(net: MoatNetwork, primary: dict) -> dict:
    """co14's lease for the part, which the primary cannot also take: the part moves to r20a
    as a secondary, while dns23 loads it with g1's credential (the backbone captured)."""
    load: dict = {}
    runner = threading.Thread(target=lambda: load.update(
        net.client.leased_requests(primary["lease"], 250, 50)))  # 5 s
    with net.capture(TO_NET12, "secondaries-move-12", node="r22a",
                     bpf="udp port 434 or proto 47") as pcap12, \
            net.capture(TO_NET14, "secondaries-move-14", node="r22a",
                        bpf="udp port 434 or proto 47") as pcap14:
        runner.start()
        try:
            net.wait_for(lambda: part_count(net, "r18b") > BEFORE + 10, 10)
            started = time.monotonic()
            g2 = net.client.lease_request("co14", PART, 60, 0.6, 300)
            seconds = time.monotonic() - started
            moving_under_load = runner.is_alive()
        finally:
            runner.join(60)
    return {"lease": g2["hops"][0]["lease_id"], "hop": g2["hops"][0], "seconds": seconds,
            "load": load, "under_load": moving_under_load, "pcap12": pcap12, "pcap14": pcap14}


# --- helpers ---------------------------------------------------------------------------------


def instances(m: MoatNetwork) -> dict[str, dict]:
    """The broker's instances of the service, by id."""
    return {i["instance_id"]: i for s in m.client.services() if s["service"] == SERVICE
            for i in s["instances"]}


def hoa_bindings(m: MoatNetwork) -> list[tuple[str, str, str, str]]:
    return sorted((b["home_address"], b["care_of_address"], b["network_prefix"], b["part"])
                  for b in m.agent(HOA).call("bindings"))


def nested(m: MoatNetwork) -> list[tuple[str, str, str]]:
    """r18b's nested home agent's bindings: (part address, care-of address, part)."""
    table = m.agent("r18b").call("nested")
    assert set(table) <= {"pair"}, table
    return sorted((b["home_address"], b["care_of_address"], b["part"])
                  for b in table.get("pair", []))


def part_count(m: MoatNetwork, router: str) -> int:
    return m.agent(router).call("object_stats", name=PART)["state"]["count"]


def primary_vm(m: MoatNetwork) -> dict:
    (vm,) = m.agent("r18b").call("vm")
    return vm


def assert_answered_once(summary: dict, routers: list[str], first: int) -> list[str]:
    """Every request answered exactly once, by ``routers`` in that order (each serving a run
    of them, none empty), and the part's count went on from ``first`` without a gap or a
    repeat (its state is exact). Returns who served each request."""
    n = summary["sent"]
    assert n > 0 and summary["answered"] == n, {k: summary[k] for k in ("sent", "answered")}
    served = []
    for seq, by in summary["replies"]:
        assert len(by) == 1, f"request {seq} answered {len(by)} times: {by}"
        served.append(by[0])
    runs = [r for i, r in enumerate(served) if i == 0 or served[i - 1] != r]
    assert runs == routers, f"served by {runs}, not {routers}"
    assert summary["results"] == [{"count": first + i} for i in range(n)], summary["results"]
    return served


def tshark(pcap: Path, home: Path, dfilter: str, *fields: str) -> list[list[str]]:
    """``fields`` of the frames of ``pcap`` that match ``dfilter``, with MOAT's Lua dissector
    (in a private HOME, so no user profile changes what is read)."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), LC_ALL="C.UTF-8")
    env.pop("WIRESHARK_CONFIG_DIR", None)
    argv = ["tshark", "-n", "-X", f"lua_script:{LUA}", "-r", str(pcap), "-Y", dfilter,
            "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in fields:
        argv += ["-e", f]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "Lua:" not in done.stderr, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines() if line.strip()]


def numbers(field: str) -> list[int]:
    return [int(x, 0) for x in field.split(",") if x]


@contextlib.contextmanager
def refused_at(m: MoatNetwork, node: str, match: str):
    """``node`` resets every TCP connection to its agent whose data carries ``match``."""
    rule = ["INPUT", "-p", "tcp", "--dport", "4340", "-m", "string", "--algo", "bm",
            "--string", match, "-j", "REJECT", "--reject-with", "tcp-reset"]
    added = m.net[node].popen(["iptables", "-w", "5", "-I", *rule], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    out = added.communicate(timeout=30)[0]
    if added.returncode != 0:
        pytest.skip(f"iptables string match unavailable in {node}: {out.decode(errors='replace')}")
    try:
        yield
    finally:
        m.net[node].popen(["iptables", "-w", "5", "-D", *rule]).wait(30)


# --- moving the part -------------------------------------------------------------------------


def test_the_part_moves_as_a_secondary_and_its_home_agent_is_the_object(
        net: MoatNetwork, primary: dict, moved: dict) -> None:
    hop = moved["hop"]
    sec = hop["instance"]
    # The part's lease: an instance of its own on r20a, at the part's address.
    assert sec.startswith("r20a/pair-s") and hop["address"] == PART_ADDRESS, hop
    assert moved["seconds"] < 10, moved["seconds"]
    found = instances(net)
    assert {i: d["part"] for i, d in found.items()} == {primary["instance"]: "primary",
                                                        sec: "secondary"}
    assert (found[sec]["router"], found[sec]["router_address"], found[sec]["address"],
            found[sec]["objects"]) == ("r20a", R20A, PART_ADDRESS, [PART]), found[sec]
    assert (found[sec]["used_share"], found[sec]["leases"]) == (60, 1), found[sec]
    # The primary no longer offers the part (its object serves on, its lease stays there).
    prim = found[primary["instance"]]
    assert (prim["objects"], prim["object_addresses"], prim["leases"]) == (["svc"], {}, 1), prim
    # The HOA: still one binding, the object's, with its prefix; it never heard of the part.
    assert hoa_bindings(net) == [(HOME, R18A, PREFIX, "primary")]
    status = net.agent(HOA).call("status")
    assert status["bindings"] == 1, status
    assert set(status["home_stats"]) == {"ACCEPTED"}, status["home_stats"]
    # The object's router is the part's home agent: its binding, care-of r20a.
    assert nested(net) == [(PART_ADDRESS, R20A, "secondary")]
    (visitor,) = net.agent("r20a").call("visitors")
    assert (visitor["home_address"], visitor["home_agent"], visitor["network_prefix"]) == \
        (PART_ADDRESS, HOME, ""), visitor
    # r18a routes the object's prefix to r18b; r18b tunnels the part's address to r20a.
    (v18,) = net.agent("r18a").call("visitors")
    assert (v18["home_address"], v18["network_prefix"]) == (HOME, PREFIX), v18
    assert f"via {R18B}" in net.net["r18a"].cmd(f"ip route show {PREFIX}")
    assert "dev mnh" in net.net["r18b"].cmd(f"ip route get {PART_ADDRESS}")
    assert PART_ADDRESS not in net.net["r18b"].cmd("ip -4 addr show dev lo")
    vm = primary_vm(net)
    assert (vm["at_home"], vm["moved"], sorted(vm["objects"])) == ([], {PART: "r20a"},
                                                                   ["counter"]), vm
    # The secondary VM: the part only, with its parent.
    (svm,) = net.agent("r20a").call("vm")
    assert (svm["part"], svm["only"], svm["parent_router"], svm["parent_instance"]) == \
        ("secondary", [PART], R18B, primary["instance"]), svm
    # The broker's record of the growth, with r18b's steps.
    (record,) = [r for r in net.agent(HOA).call("growth") if r.get("instance") == sec]
    assert record["from"] == primary["instance"] and record["router"] == "r20a", record
    assert record["tried"] == [{"router": "r20a", "refused": ""}], record
    steps = [s for s, _ in record["steps"]]
    assert steps[0].startswith("asked ") and steps[0].endswith("for part tally, 6 answered"), steps
    assert steps[1:] == [
        "candidates: ['r20a']",
        "reserved 1 CPU, 256 MiB on r20a",
        "nested home agent listening on the object's home address",
        "secondary tally registered on r20a with the nested home agent",
        "tally stopped here with its final checkpoint (its address is now tunnelled)",
        "secondary tally restored its state and serves"], steps
    room = net.agent("r18b").call("room")
    assert room["stats"]["parts_moved"] == 1 and room["stats"]["grown"] == 0, room["stats"]


def test_no_request_is_lost_or_doubled_while_the_part_moves(
        net: MoatNetwork, primary: dict, moved: dict) -> None:
    """dns23 loaded the part (g1, the primary's lease) all through the move: every request
    was answered once, first at home on r18b, then by the secondary on r20a, and the count
    went on without a gap — the secondary started from the part's final checkpoint."""
    assert moved["under_load"], "the move ended after the load: it was not under load"
    served = assert_answered_once(moved["load"], ["r18b", "r20a"], first=BEFORE + 1)
    assert served.count("r20a") >= 10, served
    count = BEFORE + moved["load"]["sent"]
    stats = net.agent("r20a").call("object_stats", name=PART)
    assert stats["state"]["count"] == count, stats
    assert stats["credentials"]["part"] == "secondary", stats
    # The secondary answers its own lease (co14, net 14) and the primary's (g1, whose
    # credential names the primary's instance: only the secondary gets the part's address).
    assert_answered_once(net.client.leased_requests(moved["lease"], 10, 50), ["r20a"],
                         first=count + 1)
    assert_answered_once(net.client.leased_requests(primary["lease"], 10, 50), ["r20a"],
                         first=count + 11)
    # The object itself still serves on r18b.
    assert net.agent("r18b").call("object_stats", name="svc")["credentials"]["part"] == "primary"


def test_a_packet_for_the_secondary_crosses_two_tunnels(
        net: MoatNetwork, primary: dict, moved: dict, tmp_path: Path) -> None:
    """From the home network: the HOA tunnels the part's address where it tunnels the
    object's (to r18a), and r18b, the part's home agent, tunnels it on to r20a with the
    object's home address as the outer source and the nested binding's key."""
    n = 10
    with net.capture(TO_NET12, "secondaries-gre-12", node="r22a", bpf="proto 47") as pcap12, \
            net.capture(TO_NET14, "secondaries-gre-14", node="r22a", bpf="proto 47") as pcap14:
        load = net.client.leased_requests(primary["lease"], n, 50)
        time.sleep(0.3)
    assert load["answered"] == load["sent"] == n, load
    hoa_key = net.agent(HOA).call("bindings")[0]["gre_key"]
    (nested_binding,) = net.agent("r18b").call("nested")["pair"]
    fields = ("ip.src", "ip.dst", "gre.key", "udp.dstport")
    toward12 = tshark(pcap12, tmp_path / "home", "gre", *fields)
    toward14 = tshark(pcap14, tmp_path / "home", "gre", *fields)
    hoa_hop = [r for r in toward12 if r[0] == f"{HOA_ADDRESS},{DNS23}"]
    nested12 = [r for r in toward12 if r[0] == f"{HOME},{DNS23}"]
    nested14 = [r for r in toward14 if r[0] == f"{HOME},{DNS23}"]
    # First tunnel: HOA -> the object's FOA, the inner packet for the part (UDP 4341).
    assert len(hoa_hop) == n, toward12
    assert all(r[1] == f"{R18A},{PART_ADDRESS}" and numbers(r[2]) == [hoa_key]
               and r[3] == "4341" for r in hoa_hop), hoa_hop
    # Second tunnel: from the object's home address (r18b) -> the part's FOA, seen leaving
    # net 12 and entering net 14, under the nested binding's key.
    for rows in (nested12, nested14):
        assert len(rows) == n, (toward12, toward14)
        assert all(r[1] == f"{R20A},{PART_ADDRESS}" and r[3] == "4341"
                   and numbers(r[2]) == [nested_binding["gre_key"]] for r in rows), rows
    # Nothing else is tunnelled toward net 14: the HOA has no binding there.
    assert len(toward14) == n, toward14


def test_the_registrations_carry_the_prefix_and_the_nested_home_agents_signature(
        net: MoatNetwork, primary: dict, moved: dict, tmp_path: Path) -> None:
    """The object registers its prefix with the HOA (the mobile-network NVSE, read by the Lua
    dissector); the part registers through r20a with the object's home address as its home
    agent, whose reply r18b signs under the nested home agents' SPI; a prefix that is not
    the registering object's own is refused 142."""
    home = tmp_path / "home"
    rrq = tshark(primary["rrq_pcap"], home, "mip.type == 1 && mip.homeaddr == 10.16.0.100",
                 "ip.src", "ip.dst", "mip.haaddr", "moat.nvse.mobile_network.prefix",
                 "moat.nvse.mobile_network.length")
    assert rrq, "no registration of svc crossed the backbone"
    assert all(r == [R18A_UP, HOA_ADDRESS, HOA_ADDRESS, PART_ADDRESS, "30"] for r in rrq), rrq
    rrp = tshark(primary["rrq_pcap"], home, "mip.type == 3 && mip.homeaddr == 10.16.0.100",
                 "mip.code")
    assert rrp and all(r == ["0"] for r in rrp), rrp

    fields = ("ip.src", "ip.dst", "mip.type", "mip.haaddr", "mip.code", "mip.auth.spi",
              "moat.nvse.mobile_network.prefix")
    part = "mip.homeaddr == 10.16.0.224"
    # On net 14's side: r20a relays the part's request to the object's home address; the
    # reply comes from there, signed Mobile-Home (the part's SPI) and Foreign-Home (3000).
    (req14,) = tshark(moved["pcap14"], home, f"{part} && mip.type == 1", *fields)
    assert req14[:5] == [R20A_UP, HOME, "1", HOME, ""] and req14[6] == "", req14
    (rep14,) = tshark(moved["pcap14"], home, f"{part} && mip.type == 3", *fields)
    assert rep14[:5] == [HOME, R20A_UP, "3", HOME, "0"], rep14
    assert numbers(rep14[5]) == [PART_SPI, NESTED_HOME_SPI], rep14
    # On net 12's side: the request reached the object through the HOA's tunnel (inside GRE
    # to r18a), the reply left r18b directly.
    (req12,) = tshark(moved["pcap12"], home, f"{part} && mip.type == 1 && gre", *fields)
    assert req12[:3] == [f"{HOA_ADDRESS},{R20A_UP}", f"{R18A},{HOME}", "1"], req12
    (rep12,) = tshark(moved["pcap12"], home, f"{part} && mip.type == 3", *fields)
    assert rep12[:5] == [HOME, R20A_UP, "3", HOME, "0"], rep12

    # svc2 claims svc's prefix: the HOA refuses it and serves nothing new.
    served = net.agent(HOA).call("status")["proxy_arp"]
    assert served == sorted([HOME, "10.16.0.224", "10.16.0.225", "10.16.0.226", "10.16.0.227"])
    net.start_object("svc2", "r20a", network_prefix=PREFIX)
    try:
        attempts = net.wait_for(lambda: [a for a in net.agent("r20a").call("objects")
                                         if a["name"] == "svc2" and a["attempts"]], 10)
        assert {a["code"] for a in attempts[0]["attempts"]} == {142}, attempts
    finally:
        net.agent("r20a").call("object_stop", name="svc2", deregister=False)
    assert net.agent(HOA).call("status")["home_stats"].get("HA_PREFIX_NOT_AUTHORIZED", 0) >= 1
    assert hoa_bindings(net) == [(HOME, R18A, PREFIX, "primary")]
    assert net.agent(HOA).call("status")["proxy_arp"] == served


# --- giving the part back --------------------------------------------------------------------


def test_cancelling_the_secondarys_last_lease_gives_the_part_back_with_its_state(
        net: MoatNetwork, primary: dict, moved: dict) -> None:
    (svm,) = net.agent("r20a").call("vm")
    pid = svm["objects"][PART]["pid"]
    cgroups = cgroup_dirs(pid, net.run.run_id)
    assert cgroups, f"no cgroup of run {net.run.run_id} for the secondary's process {pid}"
    count = part_count(net, "r20a")
    net.client.lease_cancel(moved["lease"])
    net.wait_for(lambda: net.agent("r20a").call("vm") == [], 10)
    # The secondary is gone with everything it held: its VM, process, cgroups, its
    # registration (the nested binding and the FOA's visitor) and its instance.
    net.wait_for(lambda: nested(net) == [], 5)
    net.wait_for(lambda: net.agent("r20a").call("visitors") == [], 5)
    # (The VM leaves r20a's table before its process has stopped.)
    net.wait_for(lambda: not Path(f"/proc/{pid}").exists(), 5)
    net.wait_for(lambda: [d for d in cgroups if d.exists()] == [], 5)
    assert net.agent("r20a").call("objects") == []
    room = net.agent("r20a").call("room")
    assert room["free_cpu"] == pytest.approx(2.0) and room["stats"]["released"] == 1, room
    found = instances(net)
    assert list(found) == [primary["instance"]], found
    prim = found[primary["instance"]]
    assert (sorted(prim["objects"]), prim["object_addresses"]) == \
        (["svc", PART], {PART: PART_ADDRESS}), prim
    # The part runs beside its object again, on its address, from the secondary's state.
    vm = primary_vm(net)
    assert (vm["at_home"], vm["moved"], sorted(vm["objects"])) == ([PART], {},
                                                                   ["counter", PART]), vm
    assert PART_ADDRESS in net.net["r18b"].cmd("ip -4 addr show dev lo")
    assert "dev mnh" not in net.net["r18b"].cmd(f"ip route show {PART_ADDRESS}")
    assert part_count(net, "r18b") == count
    assert_answered_once(net.client.leased_requests(primary["lease"], 10, 50), ["r18b"],
                         first=count + 1)
    # The HOA's table never changed: the object's binding, its prefix.
    assert hoa_bindings(net) == [(HOME, R18A, PREFIX, "primary")]
    assert net.agent(HOA).call("status")["broker_stats"]["release_sent"] >= 1


# --- failures leave the part serving at home -------------------------------------------------


def test_a_target_without_room_leaves_the_part_at_home(net: MoatNetwork, primary: dict) -> None:
    assert net.agent("r20a").call("vm") == [], "the release test left r20a empty"
    count = part_count(net, "r18b")
    leases = sorted(lease["lease_id"] for lease in net.client.leases())
    net.agent("r20a").call("room_hold", cpu=2.0, memory_mb=1, seconds=3.0)
    with pytest.raises(BrokerRefusal) as err:
        net.client.lease_request("co14", PART, 60, 0.6, 60)
    assert err.value.reason == "no_capacity", err.value.answer
    assert "no router on another foreign network has 1 CPU and 256 MiB free for part tally" \
        in err.value.detail, err.value.detail
    error = last_error(net, "r18b")
    assert error["step"] == "grow" and "for part tally" in error["reason"], error
    # As it was: the same leases, one instance, one HOA binding, no secondary, the part here.
    assert sorted(lease["lease_id"] for lease in net.client.leases()) == leases
    assert list(instances(net)) == [primary["instance"]]
    assert hoa_bindings(net) == [(HOME, R18A, PREFIX, "primary")]
    assert nested(net) == [] and net.agent("r20a").call("vm") == []
    vm = primary_vm(net)
    assert (vm["at_home"], vm["moved"]) == ([PART], {}), vm
    assert_answered_once(net.client.leased_requests(primary["lease"], 5, 50), ["r18b"],
                         first=count + 1)
    net.wait_for(lambda: net.agent("r20a").call("room")["reservations"] == [], 6)


def test_a_state_that_cannot_reach_the_target_restarts_the_part_at_home(
        net: MoatNetwork, primary: dict) -> None:
    """r20a resets the connection that carries the part's final checkpoint (``restore``):
    the part had already stopped at home, so r18b cancels the secondary and restarts the part
    here from that checkpoint; the lease is refused with why."""
    count = part_count(net, "r18b")
    leases = sorted(lease["lease_id"] for lease in net.client.leases())
    with refused_at(net, "r20a", '"restore"'):
        with pytest.raises(BrokerRefusal) as err:
            net.client.lease_request("co14", PART, 60, 0.6, 60)
    assert err.value.reason == "no_capacity", err.value.answer
    assert "the state of tally did not reach r20a" in err.value.detail, err.value.detail
    assert "it serves here again" in err.value.detail, err.value.detail
    error = last_error(net, "r18b")
    assert error["step"] == "grow" and "did not reach r20a" in error["reason"], error
    # The secondary was started, then cancelled: nothing of it is left on r20a, and its
    # binding went with its deregistration.
    assert net.agent("r20a").call("vm") == [] and net.agent("r20a").call("objects") == []
    room = net.agent("r20a").call("room")
    assert room["reservations"] == [] and room["free_cpu"] == pytest.approx(2.0), room
    net.wait_for(lambda: nested(net) == [], 5)
    net.wait_for(lambda: net.agent("r20a").call("visitors") == [], 5)
    # The part serves here again, from its final checkpoint.
    vm = primary_vm(net)
    assert (vm["at_home"], vm["moved"], sorted(vm["objects"])) == ([PART], {},
                                                                   ["counter", PART]), vm
    assert PART_ADDRESS in net.net["r18b"].cmd("ip -4 addr show dev lo")
    assert part_count(net, "r18b") == count
    assert sorted(lease["lease_id"] for lease in net.client.leases()) == leases
    assert list(instances(net)) == [primary["instance"]]
    assert hoa_bindings(net) == [(HOME, R18A, PREFIX, "primary")]
    assert_answered_once(net.client.leased_requests(primary["lease"], 5, 50), ["r18b"],
                         first=count + 1)


# --- and again -------------------------------------------------------------------------------


def test_after_the_failures_the_part_moves_again_and_comes_back_under_load(
        net: MoatNetwork, primary: dict) -> None:
    """Nothing the failed moves left behind is in the way of the next (a new secondary, a new
    nested binding); and giving the part back while dns23 loads it answers every request
    once, first on r20a, then at home."""
    count = part_count(net, "r18b")
    hop = net.client.lease_request("co14", PART, 60, 0.6, 60)["hops"][0]
    assert hop["instance"].startswith("r20a/pair-s") and hop["address"] == PART_ADDRESS, hop
    assert nested(net) == [(PART_ADDRESS, R20A, "secondary")]
    assert hoa_bindings(net) == [(HOME, R18A, PREFIX, "primary")]
    assert_answered_once(net.client.leased_requests(hop["lease_id"], 5, 50), ["r20a"],
                         first=count + 1)
    count += 5
    load: dict = {}
    runner = threading.Thread(target=lambda: load.update(
        net.client.leased_requests(primary["lease"], 200, 50)))  # 4 s
    runner.start()
    try:
        net.wait_for(lambda: part_count(net, "r20a") > count + 10, 10)
        net.client.lease_cancel(hop["lease_id"])
        net.wait_for(lambda: net.agent("r20a").call("vm") == [], 10)
        released_under_load = runner.is_alive()
    finally:
        runner.join(60)
    assert released_under_load, "the part came back after the load: not under load"
    net.wait_for(lambda: nested(net) == [], 5)
    assert hoa_bindings(net) == [(HOME, R18A, PREFIX, "primary")]
    vm = primary_vm(net)
    assert (vm["at_home"], vm["moved"]) == ([PART], {}), vm
    # Every request answered once: by the secondary until the part was back, then at home.
    n = load["sent"]
    assert n > 0 and load["answered"] == n, {k: load[k] for k in ("sent", "answered")}
    assert all(len(by) == 1 for _, by in load["replies"]), load["replies"]
    served = [by[0] for _, by in load["replies"]]
    runs = [r for i, r in enumerate(served) if i == 0 or served[i - 1] != r]
    assert runs == ["r20a", "r18b"], runs
    # ... and the state is exact: the part came back warm, got the secondary's final
    # checkpoint, then replayed what it had queued (the move in reverse).
    counts = [r["count"] for r in load["results"]]
    assert counts == list(range(count + 1, count + n + 1)), counts
