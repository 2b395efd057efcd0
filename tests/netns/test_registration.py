"""Registration end to end in PatentTopo: real agents, real packets, real namespaces (issue 3)."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from agent.core.config import Credential
from packets import RegistrationReply, RegistrationRequest, ReplyCode
from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo

HOA = "r22b"


def bindings(m: MoatNetwork) -> list[dict]:
    return m.agent(HOA).call("bindings")


def stable(rows: list[dict]) -> list[tuple]:
    """What a binding is, without the fields that change with time."""
    return sorted((b["home_address"], b["care_of_address"], b["care_of_name"], b["gre_key"],
                   b["identification"]) for b in rows)


def last_attempt(m: MoatNetwork, router: str, name: str = "counter") -> dict:
    def done() -> dict | None:
        objs = [o for o in m.agent(router).call("objects") if o["name"] == name]
        attempts = objs[0]["attempts"] if objs else []
        return attempts[-1] if attempts and (attempts[-1]["code"] is not None or attempts[-1]["error"]) else None

    return m.wait_for(done, timeout=15)


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo(), trusted_foas=["r18a", "r18b"], advertise_interval=0.5) as m:
        yield m


@pytest.fixture(autouse=True)
def no_objects(net: MoatNetwork):
    """Each test starts with no object anywhere and no binding at the HOA."""
    yield
    for router in net.topo.router_names():
        for obj in net.agent(router).call("objects"):
            net.agent(router).call("object_stop", name=obj["name"], deregister=False)
    # Reset bindings by deregistering straight from home (lifetime 0, coa = home address).
    if bindings(net):
        net.start_object("counter", "r22c")
        net.wait_for(lambda: not bindings(net), timeout=15)
        net.agent("r22c").call("object_stop", name="counter", deregister=False)


def test_registration_from_net12_creates_binding_and_visitor(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b")
    # The object's client hears the reply last (HOA binding, then the FOA's visitor, then
    # the relay to the object): once it is registered, the others are there too.
    status = net.wait_for(lambda: next((o for o in net.agent("r18b").call("objects")
                                        if o["registration"]), None), timeout=15)
    rows = bindings(net)
    assert len(rows) == 1
    b = rows[0]
    assert b["home_address"] == "10.16.0.100"
    assert b["care_of_address"] in ("10.12.0.1", "10.12.0.2")
    foa = "r18a" if b["care_of_address"] == "10.12.0.1" else "r18b"
    assert b["care_of_name"] == f"counter.{foa}"
    assert b["gre_key"] >= 1 and b["nai"] == "counter@home.moat"
    visitors = net.agent(foa).call("visitors")
    assert [v["home_address"] for v in visitors] == ["10.16.0.100"]
    assert visitors[0]["local_address"] == "10.12.0.2"  # the router that runs the object
    assert status["registration"]["care_of_name"] == b["care_of_name"]
    # The home address and the object's mobile network prefix (NEMO), 10.16.0.224/30.
    assert net.agent(HOA).call("status")["proxy_arp"] == [
        "10.16.0.100", "10.16.0.224", "10.16.0.225", "10.16.0.226", "10.16.0.227"]


def test_wrong_mobile_foreign_key_gets_67_and_tries_other_foa(net: MoatNetwork) -> None:
    bad = Credential(1000, secrets.token_bytes(32))
    net.start_object("counter", "r18b", mobile_foreign=bad)
    attempt = last_attempt(net, "r18b")
    assert attempt["code"] == ReplyCode.FA_MN_FAILED_AUTH
    objs = net.agent("r18b").call("objects")[0]
    tried = {a["agent"] for a in objs["attempts"]}
    assert tried == {"10.12.0.1", "10.12.0.2"}, "the object must try the other FOA after a denial"
    assert bindings(net) == []


def test_wrong_mobile_home_key_gets_131(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b", mobile_home=Credential(256, secrets.token_bytes(32)))
    assert last_attempt(net, "r18b")["code"] == ReplyCode.HA_MN_FAILED_AUTH
    assert bindings(net) == []


def test_untrusted_foa_gets_132(net: MoatNetwork) -> None:
    net.start_object("counter", "r20a")  # r20a's Foreign-Home key is not trusted by the HOA
    assert last_attempt(net, "r20a")["code"] == ReplyCode.HA_FA_FAILED_AUTH
    assert bindings(net) == []


def test_unknown_home_address_gets_136(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b", home_address="10.16.0.150")
    assert last_attempt(net, "r18b")["code"] == ReplyCode.HA_UNKNOWN_HA_ADDRESS
    assert bindings(net) == []


def test_replayed_request_gets_133_and_changes_nothing(net: MoatNetwork) -> None:
    # In r18b's namespace on every interface: r18b is itself an FOA, and an object
    # registering through its own router's FOA crosses the loopback, not the LAN.
    with net.capture("any", "replay", node="r18b", bpf="udp dst port 434") as pcap:
        net.start_object("counter", "r18b")
        net.wait_for(lambda: bindings(net), timeout=15)
    before = stable(bindings(net))
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "mip.type == 1 && udp.dstport == 434",
                          "-T", "fields", "-e", "udp.payload", "-e", "ip.dst"],
                         capture_output=True, text=True, timeout=60, check=True)
    payload_hex, foa = out.stdout.splitlines()[0].split("\t")
    captured = RegistrationRequest.decode(bytes.fromhex(payload_hex.replace(":", "")))
    assert captured.home_address == "10.16.0.100"
    answer = net.probe("r18b", "udp", foa, "434", payload_hex.replace(":", ""))
    assert answer["reply"] is not None
    reply = RegistrationReply.decode(bytes.fromhex(answer["reply"]))
    assert reply.code == ReplyCode.HA_IDENTIFICATION_MISMATCH
    assert stable(bindings(net)) == before


def test_lifetime_expiry_removes_binding(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b", lifetime=2)
    net.wait_for(lambda: bindings(net), timeout=15)
    net.agent("r18b").call("object_stop", name="counter", deregister=False)  # no renewal
    net.wait_for(lambda: not bindings(net), timeout=10)
    assert net.agent(HOA).call("status")["proxy_arp"] == []


def test_deregistration_removes_binding(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b")
    net.wait_for(lambda: bindings(net), timeout=15)
    result = net.agent("r18b").call("deregister", name="counter")
    assert result["code"] == ReplyCode.ACCEPTED
    assert bindings(net) == []


def test_two_simultaneous_registrations_give_two_bindings(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b", simultaneous=True)
    net.wait_for(lambda: bindings(net), timeout=15)
    # A duplicate of the same object on the other FOA of net 12 (r20a's FOA is not trusted
    # by the HOA in this module's network).
    net.start_object("counter", "r18a", simultaneous=True, preferred_agent="10.12.0.2")
    rows = net.wait_for(lambda: len(bindings(net)) == 2 and bindings(net), timeout=15)
    assert {b["care_of_address"] for b in rows} == {"10.12.0.1", "10.12.0.2"}
    assert len({b["gre_key"] for b in rows}) == 2


def test_proxy_arp_seen_on_home_lan(net: MoatNetwork) -> None:
    hoa_mac = net.net[HOA].intfs[0].MAC()
    with net.capture("s16", "proxyarp", bpf="arp") as pcap:
        net.start_object("counter", "r18b")
        net.wait_for(lambda: bindings(net), timeout=15)
        answer = net.probe("r22a", "arp", "r22a-eth0", "10.16.0.100")
    assert answer["mac"] == hoa_mac
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "arp.src.proto_ipv4 == 10.16.0.100",
                          "-T", "fields", "-e", "arp.opcode", "-e", "arp.src.hw_mac"],
                         capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert ["2", hoa_mac] in rows, "a proxy ARP reply from the HOA"
    assert ["1", hoa_mac] in rows, "a gratuitous ARP from the HOA on the first binding"


def test_return_home_stops_proxy_arp_and_object_router_announces(net: MoatNetwork) -> None:
    net.start_object("counter", "r18b")
    net.wait_for(lambda: bindings(net), timeout=15)
    assert net.probe("r22a", "arp", "r22a-eth0", "10.16.0.100")["mac"] == net.net[HOA].intfs[0].MAC()
    net.agent("r18b").call("object_stop", name="counter", deregister=False)
    r22c_mac = net.net["r22c"].intfs[0].MAC()
    with net.capture("s16", "home", bpf="arp") as pcap:
        net.start_object("counter", "r22c")
        net.wait_for(lambda: not bindings(net), timeout=15)
        net.wait_for(lambda: net.agent("r22c").call("objects")[0]["at_home"], timeout=5)
        answer = net.probe("r22a", "arp", "r22a-eth0", "10.16.0.100", "--timeout", "1")
    assert answer["mac"] is None, "the HOA must stop answering for an object back home"
    assert net.agent(HOA).call("status")["proxy_arp"] == []
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "arp.isgratuitous == 1", "-T", "fields",
                          "-e", "arp.src.proto_ipv4", "-e", "arp.src.hw_mac"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert ["10.16.0.100", r22c_mac] in [line.split("\t") for line in out.stdout.splitlines()]
