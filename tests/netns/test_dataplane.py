"""The data plane end to end (issue 4, lines 2, 6, 7): reverse tunnelling, nothing sent for an
expired binding, a registration denied at the target, and the return home. One network for
the module, in which the HOA does not trust net 14's FOA (r20a)."""

from __future__ import annotations

import ipaddress

import subprocess

import pytest

from topologies.moatnet import MoatNetwork
from topologies.patent import PatentTopo


@pytest.fixture(scope="module")
def net():
    with MoatNetwork(PatentTopo(), objects=["counter", "echo"], advertise_interval=0.5,
                     trusted_foas=["r18a", "r18b"]) as m:
        yield m


def gre_rows(pcap) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "gre", "-T", "fields", "-e", "ip.src",
                          "-e", "ip.dst", "-e", "gre.key"], capture_output=True, text=True,
                         timeout=60, check=True)
    return [line.split("\t") for line in out.stdout.splitlines()]


def test_reverse_tunnel_carries_replies_to_the_home_agent(net: MoatNetwork) -> None:
    net.place_object("echo", "r18b", reverse_tunnel=True)
    try:
        net.wait_for(lambda: net.agent("r22b").call("bindings"), timeout=15)
        with net.capture("r22a-eth1", "reverse", node="r22a", bpf="proto 47") as pcap:
            assert net.requests("co14", "echo")["answered"] > 0
        home = net.objects["echo"].home_address
        rows = gre_rows(pcap)
        assert any(r[0] == f"10.12.0.1,{home}" and r[1] == "10.16.0.2,10.14.0.30" for r in rows), \
            "replies from the home address travel in GRE from the FOA to the HOA"
    finally:
        net.agent("r18b").call("object_stop", name="echo", deregister=True)


def test_nothing_is_tunnelled_for_an_expired_binding(net: MoatNetwork) -> None:
    net.place_object("echo", "r18b", lifetime=2)
    try:
        net.wait_for(lambda: net.agent("r22b").call("bindings"), timeout=15)
        assert net.requests("co14", "echo", count=10)["answered"] == 10
        # Stop renewing (the object keeps running on r18b) and let the binding run out.
        net.agent("r18b").call("client_stop", name="echo")
        net.wait_for(lambda: not net.agent("r22b").call("bindings"), timeout=10)
        with net.capture("r22a-eth1", "expired", node="r22a", bpf="proto 47") as pcap:
            assert net.requests("co14", "echo", count=10)["answered"] == 0
        assert gre_rows(pcap) == []
        assert net.agent("r22b").call("status")["proxy_arp"] == []
    finally:
        net.agent("r18b").call("object_stop", name="echo", deregister=False)


def test_denied_registration_at_target_keeps_object_at_origin(net: MoatNetwork) -> None:
    net.place_object("counter", "r18b")
    try:
        net.wait_for(lambda: net.agent("r22b").call("bindings"), timeout=15)
        assert net.requests("co14", "counter")["answered"] > 0
        report = net.migrate("counter", "r20a", "make-before-break")  # r20a is not trusted: 132
        assert not report["ok"] and "132" in report["error"], report
        assert net.where("counter") == "r18b"
        assert net.requests("co14", "counter")["answered"] > 0
    finally:
        if net.where("counter"):
            net.agent(net.where("counter")).call("object_stop", name="counter", deregister=True)


def test_returning_home_removes_every_binding_and_proxy_arp(net: MoatNetwork) -> None:
    net.place_object("counter", "r18b", simultaneous=True)
    net.wait_for(lambda: net.agent("r22b").call("bindings"), timeout=15)
    counter = net.objects["counter"]
    # Its home address and its mobile network prefix's (NEMO): the HOA answers for both.
    assert sorted(net.agent("r22b").call("status")["proxy_arp"]) == sorted(
        [counter.home_address, *map(str, ipaddress.IPv4Network(counter.network_prefix))])
    report = net.migrate("counter", "r22c", "make-before-break")
    assert report["ok"], report
    assert net.agent("r22b").call("bindings") == []
    assert net.agent("r22b").call("status")["proxy_arp"] == []
    answer = net.requests("co14", "counter")
    assert answer["answered"] == answer["sent"]
    net.agent("r22c").call("object_stop", name="counter", deregister=True)
